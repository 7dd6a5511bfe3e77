"""Host memory of DeepSpeed ZeRO-1/2/3 phase by phase on CPU workers, outside Ray and raylm's loop: what
each forward, backward and optimizer step adds to a rank's resident memory, against the terms of
`raylm.planning.memory.estimate`. It attributes the estimate's DeepSpeed terms; `memory_estimate.py`
measures raylm's whole run.

    python benchmarks/zero_phases.py                      # ZeRO-2, fp32 and bf16 weights
    python benchmarks/zero_phases.py --stage 3 --precisions bf16

Two processes (gloo, one thread each) build the 40.6M-parameter Llama of memory_estimate.py, in the
precision's dtype, and initialise DeepSpeed with the config raylm generates for it (torch's AdamW), then
run 3 steps of batch 4 x 128. Per phase: the resident size after it and the peak during it (Linux's
VmHWM, reset before each phase), relative to the resident size before the model was built, rank 0.
Written to --out (default benchmarks/results/zero_phases.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from scratch import scratch_dir

sys.path.insert(0, str(Path(__file__).parent))  # memory_estimate's model
sys.path.insert(0, str(Path(__file__).parent.parent))  # raylm from this checkout

MiB = 2**20


def _resident() -> tuple[int, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def rank_main(rank: int, stage: int, precision: str, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank)
    )
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    import deepspeed
    from memory_estimate import ARCH, BATCH, SEQ
    from transformers import LlamaConfig, LlamaForCausalLM

    from raylm.spec.sections import TrainSpec
    from raylm.spec.strategies import DeepSpeedStrategy
    from raylm.train.strategies.deepspeed import config

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model_config = LlamaConfig(
        vocab_size=2048,
        hidden_size=ARCH["hidden"],
        intermediate_size=ARCH["intermediate"],
        num_hidden_layers=ARCH["layers"],
        num_attention_heads=ARCH["heads"],
        max_position_embeddings=ARCH["context"],
    )
    phases = []
    base = _resident()[0]

    def record(name: str) -> None:
        now, peak = _resident()
        phases.append({"phase": name, "resident_mib": (now - base) / MiB, "peak_mib": (peak - base) / MiB})
        _reset_peak()

    _reset_peak()
    torch.set_default_dtype(dtype)
    model = LlamaForCausalLM(model_config)
    torch.set_default_dtype(torch.float32)
    record("build")
    settings = config(
        DeepSpeedStrategy(name="deepspeed", stage=stage),
        TrainSpec(batch_size=BATCH, precision=precision),
        precision,
        ARCH["hidden"],
    )
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=list(model.parameters()), config=settings, dist_init_required=False
    )
    record("initialize")
    ids = torch.randint(0, 2048, (BATCH, SEQ))
    for step in range(3):
        loss = engine(input_ids=ids, labels=ids).loss
        record(f"forward {step}")
        engine.backward(loss)
        record(f"backward {step}")
        engine.step()
        record(f"step {step}")
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        Path(out).write_text(json.dumps({"params": params, "phases": phases}))
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, default=2, choices=[1, 2, 3])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "zero_phases.json"))
    args = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # as memory_estimate.py: freed blocks go back at once
    import socket

    import torch.multiprocessing as mp
    from memory_estimate import estimated, job_spec

    from raylm.spec.loading import validate_dict

    results = []
    for precision in args.precisions:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        scratch = str(scratch_dir("raylm-zero-phases-"))
        rank0 = os.path.join(scratch, "rank0.json")
        mp.spawn(rank_main, args=(args.stage, precision, port, rank0), nprocs=2)
        measured = json.loads(Path(rank0).read_text())
        strategy = {"name": "deepspeed", "stage": args.stage}
        job = validate_dict(job_spec(strategy, precision, os.path.join(scratch, "spec")))
        terms = estimated(job, precision)
        results.append(
            {
                "stage": args.stage,
                "precision": precision,
                **measured,
                "estimate_mib": {k: v / MiB for k, v in terms.as_dict().items() if not isinstance(v, bool)},
            }
        )
        print(json.dumps(results[-1]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
