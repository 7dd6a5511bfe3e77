"""`raylm estimate` against the measured peak host memory per worker, for each strategy and precision.

    python benchmarks/memory_estimate.py                # ddp, ZeRO-1/2/3 (2 and 3 also offloaded), fsdp x fp32, bf16
    python benchmarks/memory_estimate.py --strategies fsdp --precisions bf16

Each cell is one `raylm` pretraining job (2 CPU workers, 3 steps) of a 40M-parameter Llama (12
layers, hidden 512, vocab 2048, batch 4 x 128). Measured: the most host memory a worker's process
added from just before it built the model to the end of training (Linux's peak-RSS counter, reset
then; raylm reports it per rank in summary.json's host_memory.train), the larger of the two ranks.
glibc returns large freed blocks at once (MALLOC_MMAP_THRESHOLD_=65536), so the peak follows live
memory. Predicted: raylm.planning.memory.estimate for the same strategy, precision, model.dtype,
attention kernel, 2 workers, batch and sequence, unadjusted (with optimizer offload, its host term too: on a
CPU worker the host is the device). bf16 runs load the weights in bfloat16 (model.dtype), but ddp's (autocast over float32 weights).
Written to --out (default benchmarks/results/memory_estimate.json; BENCHMARKS.md's files are per precision).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from scratch import scratch_dir

STRATEGIES = {
    "ddp": "ddp",
    "zero1": {"name": "deepspeed", "stage": 1},
    "zero2": {"name": "deepspeed", "stage": 2},
    "zero2-offload": {"name": "deepspeed", "stage": 2, "offload_optimizer": True},
    "zero3": {"name": "deepspeed", "stage": 3},
    "zero3-offload": {"name": "deepspeed", "stage": 3, "offload_optimizer": True},
    "fsdp": "fsdp",
}
ARCH = {"family": "llama", "layers": 12, "heads": 8, "hidden": 512, "intermediate": 1408, "context": 128}
BATCH, SEQ = 4, 128


def job_spec(strategy, precision: str, output: str) -> dict:
    return {
        "kind": "pretrain",
        "model": {
            "architecture": {**ARCH, "vocab_size": 2048},
            # ddp keeps no fp32 master copy, so raylm refuses it bf16 weights: autocast over fp32 ones
            "dtype": "bfloat16" if precision == "bf16" and strategy != "ddp" else "float32",
        },
        "tokenizer": {"train": {"type": "char"}},
        "data": {"generate": {"documents": 2000}, "seq_len": SEQ},
        "train": {
            "max_steps": 3,
            "batch_size": BATCH,
            "precision": precision,
            "eval_every": 3,
            "eval_batches": 1,
            "checkpoint_every": 3,
        },
        "resources": {"num_workers": 2},
        "strategy": strategy,
        "output": output,
    }


def estimated(job, precision: str):
    """raylm's estimate for a benchmark job: its strategy, precision, model.dtype, 2 workers, batch and
    sequence, unadjusted."""
    from raylm.planning.memory import estimate, shape_of_job
    from raylm.planning.plan import deepspeed_terms, flash_attention
    from raylm.spec.strategies import memory_key

    return estimate(
        shape_of_job(job),
        memory_key(job.strategy),
        precision,
        2,
        BATCH,
        SEQ,
        flash_attention=flash_attention(job),  # SDPA: torch's CPU flash kernel keeps no seq^2 scores
        dtype=job.model.dtype,
        **deepspeed_terms(job.strategy),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory_estimate.json"))
    args = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # before Ray starts: its workers inherit it

    from raylm.planning.memory import shape_of_job
    from raylm.spec.loading import validate_dict
    from raylm.submit import run_here

    scratch = scratch_dir("raylm-memory-")
    cells = []
    for precision in args.precisions:
        for name in args.strategies:
            job = validate_dict(job_spec(STRATEGIES[name], precision, str(scratch / f"{name}-{precision}")))
            summary = run_here(job)
            measured = max(summary["host_memory"]["train"])
            terms = estimated(job, precision)
            predicted = terms.total + terms.host  # a CPU worker's host memory is its device memory
            cells.append(
                {
                    "strategy": name,
                    "precision": precision,
                    "dtype": job.model.dtype,
                    "measured_bytes": measured,
                    "per_rank_bytes": summary["host_memory"]["train"],
                    "estimate_bytes": predicted,
                    "measured_over_estimate": measured / predicted,
                }
            )
            print(json.dumps(cells[-1]), flush=True)
    shape = shape_of_job(validate_dict(job_spec("ddp", "fp32", str(scratch / "probe"))))
    result = {
        "model": {**ARCH, "vocab_size": 2048, "params": shape.params},
        "batch": BATCH,
        "seq_len": SEQ,
        "workers": 2,
        "cells": cells,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    for cell in cells:
        print(
            f"{cell['strategy']:<14} {cell['precision']:<5} measured {cell['measured_bytes'] / 2**20:8.0f} MiB"
            f"  estimate {cell['estimate_bytes'] / 2**20:8.0f} MiB  ratio {cell['measured_over_estimate']:.2f}"
        )


if __name__ == "__main__":
    main()
