"""Preference tuning against supervised fine-tuning on the same task and budget, and the memory of a
full fine-tuning DPO run with a live reference copy against `precompute_reference`, each against the
estimate.

    python benchmarks/preference.py                       # both parts: benchmarks/results/preference.json
    python benchmarks/preference.py --parts quality --steps 120

Quality: the generated copy task ("17. Say: kite\\nA:" -> " kite"; DPO's rejected answer is the word
misspelt). A 4-layer Llama pretrained on the generated stories (BPE 512, set-up, not measured), then
100 steps of full supervised fine-tuning on the chosen answers: the common starting point. From it, with the same budget
(steps x 16 examples, LoRA r 8, one worker with 2 CPUs, the same lr): more supervised fine-tuning on the
chosen answers; DPO; DPO + the chosen answers' NLL (sft_weight 1, RPO). Measured here, the same way for
every run, with transformers + PEFT on 400 pairs of a seed no run trained on (their words are the
training data's): exact match of greedy answers (generate, up to 6 tokens) against the chosen ones,
and reward accuracy (the share of pairs whose chosen answer gains more log-probability over the
starting point than the rejected one, ties half); and the runs' training tokens/s and examples/s (a
DPO example is two sequences, and the live reference adds a forward pass).

Memory: a 40.6M-parameter Llama (12 layers, hidden 512, vocab 2048), full fine-tuning with DPO, 2 CPU
workers under ddp, batch 4 pairs x 128 tokens padded to the full length, 3 steps: the reference as a
live frozen copy on each worker, and precomputed. Measured: the peak host memory a worker added from
just before it built the model to the end of training (summary.json's host_memory.train, the larger
rank; MALLOC_MMAP_THRESHOLD_=65536 so freed blocks return); predicted: raylm's estimate for the same
job (raylm.planning.plan: two sequences per example, the reference copy), unadjusted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_methods import pretrain_base  # noqa: E402  (the same base as the methods benchmark)
from scratch import scratch_dir

LR = 2e-3
START_STEPS = 100  # full fine-tuning on the chosen answers: the supervised starting point
ARCH = {"family": "llama", "layers": 12, "heads": 8, "hidden": 512, "intermediate": 1408, "context": 128}
BATCH, SEQ = 4, 128


def finetune(base: Path, folder: Path, steps: int, data: dict, **sections) -> dict:
    return {
        "kind": "finetune",
        "model": {"path": str(base)},
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"generate": {"task": "copy", "examples": 4000}, "seq_len": 16, **data},
        "train": {
            "max_steps": steps,
            "batch_size": 16,
            "lr": LR,
            "eval_every": steps,
            "checkpoint_every": steps,
            "log_every": 20,
        },
        "eval": {"exact_match_examples": 200, "max_new_tokens": 6},
        "resources": {"num_workers": 1, "cpus_per_worker": 2},
        "output": str(folder),
        **sections,
    }


def run(job: dict, folder: Path) -> dict:
    output = Path(job["output"]["path"] if isinstance(job["output"], dict) else job["output"])
    path = folder / f"{output.name}.yaml"
    path.write_text(yaml.safe_dump(job))
    done = subprocess.run([sys.executable, "-m", "raylm", "run", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    return json.loads((output / "summary.json").read_text())


def held_out_pairs(tokenizer, count: int):
    """Pairs of a seed no run trained on (its words are the training data's: a run that has seen
    none of a prompt's word cannot copy it), as examples and as preference rows (torch tensors)."""
    import numpy as np
    import torch

    from raylm.data.preference import generated, preference_rows
    from raylm.data.tasks import generate
    from raylm.spec.sft import SFTDataSpec

    spec = SFTDataSpec(generate={"task": "copy"}, format="preference", seq_len=16, val_fraction=0.0)
    rows = generated(generate("copy", count, 12345, 2), spec)
    batch = {k: np.asarray([r[k] for r in rows], dtype=object) for k in rows[0]}
    (out,) = preference_rows(batch, tokenizer, spec)
    keys = ("input_ids", "labels", "attention_mask")
    return rows, {k: torch.from_numpy(v).long() for k, v in out.items() if k in keys}


def answer_logps(model, pairs):
    """Summed log-probabilities of both answers of every pair, with transformers alone."""
    import torch

    ids, labels, mask = pairs["input_ids"], pairs["labels"], pairs["attention_mask"]
    b, c, length = ids.shape
    with torch.no_grad():
        logits = model(
            input_ids=ids.reshape(b * c, length), attention_mask=mask.reshape(b * c, length)
        ).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    target = labels.reshape(b * c, length)[:, 1:]
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (target != -100)
    return picked.sum(-1).reshape(b, c)


def exact_match(model, tokenizer, rows: list[dict]) -> float:
    """Greedy answers (transformers' generate, up to 6 tokens or EOS) equal to the chosen answers."""
    import torch

    right = 0
    for row in rows:
        ids = torch.tensor(
            [[tokenizer.bos_token_id, *tokenizer(row["prompt"], add_special_tokens=False).input_ids]]
        )
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=0
            )
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        right += answer.strip() == row["chosen"].strip()
    return right / len(rows)


def measured(start: Path, adapter: Path | None, pairs, rows, tokenizer) -> dict:
    """Exact match on the held-out prompts and reward accuracy on their pairs (policy: the start
    with `adapter`, or the start itself)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference = answer_logps(AutoModelForCausalLM.from_pretrained(start).eval(), pairs)
    policy = AutoModelForCausalLM.from_pretrained(start).eval()
    if adapter is not None:
        policy = PeftModel.from_pretrained(policy, str(adapter)).eval()
    ratios = answer_logps(policy, pairs) - reference
    return {"exact_match": exact_match(policy, tokenizer, rows), "reward_accuracy": accuracy(ratios)}


def accuracy(ratios) -> float:
    return float(
        (ratios[:, 0] > ratios[:, 1]).float().mean() + 0.5 * (ratios[:, 0] == ratios[:, 1]).float().mean()
    )


def quality(scratch: Path, steps: int) -> dict:
    from transformers import AutoTokenizer

    base = scratch / "base"
    pretrain_base(base, 600)
    start_job = finetune(base, scratch / "supervised-start", START_STEPS, {}, method={"name": "full"})
    start_job["train"]["lr"] = 1e-3
    start = run(start_job, scratch)
    start_model = Path(start["artifact"])
    tokenizer = AutoTokenizer.from_pretrained(start_model)
    examples, pairs = held_out_pairs(tokenizer, 400)
    before = measured(start_model, None, pairs, examples, tokenizer)
    print(json.dumps({"start": before}), flush=True)
    preference = {"format": "preference"}
    variants = {
        "supervised (chosen answers)": finetune(start_model, scratch / "sft", steps, {}),
        "DPO": finetune(
            start_model, scratch / "dpo", steps, preference, preference={"objective": "dpo", "beta": 0.2}
        ),
        "DPO + NLL (sft_weight 1)": finetune(
            start_model,
            scratch / "rpo",
            steps,
            preference,
            preference={"objective": "dpo", "beta": 0.2, "sft_weight": 1.0},
        ),
    }
    rows = []
    for name, job in variants.items():
        summary = run(job, scratch)
        throughput = summary["throughput"]
        trained = summary["steps"] * 16
        after = measured(start_model, Path(summary["artifact"]), pairs, examples, tokenizer)
        rows.append(
            {
                "variant": name,
                "exact_match_start": before["exact_match"],
                "exact_match": after["exact_match"],
                "reward_accuracy_start": before["reward_accuracy"],
                "reward_accuracy": after["reward_accuracy"],
                "tokens_per_s": throughput["tokens_per_s"],
                "examples_per_s": trained / throughput["seconds"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return {"steps": steps, "batch": 16, "lr": LR, "held_out_pairs": 400, "rows": rows}


def memory_model(folder: Path) -> Path:
    """The 40.6M-parameter Llama, randomly initialised (set-up, not measured), with a character
    tokenizer of the generated words."""
    import torch
    from transformers import AutoModelForCausalLM

    from raylm.data.corpus import stories
    from raylm.data.tokenizer import train_tokenizer
    from raylm.planning.models import architecture_config
    from raylm.spec.sections import Architecture

    tokenizer = train_tokenizer(list(stories(200, seed=0)) + ["Say:"], "char", 0)
    torch.manual_seed(0)
    config = architecture_config(Architecture(**ARCH, vocab_size=2048), 2048, tokenizer)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def memory_job(model: Path, output: Path, precompute: bool) -> dict:
    return {
        "kind": "finetune",
        "model": {"path": str(model)},
        "method": {"name": "full"},
        "data": {
            "generate": {"task": "copy", "examples": 400},
            "format": "preference",
            "seq_len": SEQ,
            "padding": "max_length",
        },
        "preference": {"objective": "dpo", "precompute_reference": precompute},
        "train": {
            "max_steps": 3,
            "batch_size": BATCH,
            "eval_every": 3,
            "eval_batches": 1,
            "checkpoint_every": 3,
        },
        "eval": {"exact_match_examples": 0},
        "resources": {"num_workers": 2},
        "output": str(output),
    }


def memory(scratch: Path) -> dict:
    from raylm.planning.memory import estimate, shape_of_job
    from raylm.planning.plan import flash_attention, preference_terms
    from raylm.spec.loading import validate_dict

    cells = []
    model = memory_model(scratch / "memory-model")
    for precompute in (False, True):
        spec = memory_job(model, scratch / f"memory-{'precomputed' if precompute else 'live'}", precompute)
        summary = run(spec, scratch)
        job = validate_dict(spec)
        terms = preference_terms(job)
        predicted = estimate(
            shape_of_job(job),
            "ddp",
            "fp32",
            2,
            terms["batch"],
            SEQ,
            flash_attention=flash_attention(job),  # as `strategy: auto` counts the job
            reference=terms.get("reference", 0.0),
        )
        measured = max(summary["host_memory"]["train"])
        cells.append(
            {
                "reference": "precomputed" if precompute else "live copy",
                "measured_bytes": measured,
                "per_rank_bytes": summary["host_memory"]["train"],
                "estimate_bytes": predicted.total,
                "estimate_reference_bytes": predicted.reference,
                "measured_over_estimate": measured / predicted.total,
            }
        )
        print(json.dumps(cells[-1]), flush=True)
    return {
        "model": {**ARCH, "vocab_size": 2048},
        "batch_pairs": BATCH,
        "seq_len": SEQ,
        "workers": 2,
        "cells": cells,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", nargs="+", default=["quality", "memory"], choices=["quality", "memory"])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "preference.json"))
    args = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # the runs' Ray workers inherit it
    scratch = scratch_dir("raylm-preference-")
    result = {}
    if "quality" in args.parts:
        result["quality"] = quality(scratch, args.steps)
    if "memory" in args.parts:
        result["memory"] = memory(scratch)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
