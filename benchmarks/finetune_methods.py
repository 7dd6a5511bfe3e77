"""Every fine-tuning method on one generated task through raylm's own job path (spec -> Ray Train ->
artifact), side by side: trainable %, artifact size, peak memory, throughput relative to full
fine-tuning, held-out exact match before and after; and IA3 with and without T-Few's extra loss terms
on a generated multiple-choice task (choice accuracy).

    python benchmarks/finetune_methods.py                   # writes benchmarks/results/finetune_methods.json
    python benchmarks/finetune_methods.py --steps 600 --task recall --methods full lora qlora --no-tfew

The base is a small Llama (4 layers, hidden 128, byte-level BPE 512) pretrained here on the stories
raylm generates, so it has never seen the task's format (exact match ~0 before). Each method then runs
as `raylm run` on a finetune spec (1 worker, 2 CPUs, the same data, batch and steps) in its own process;
every number comes from the run's summary.json (peak memory: the worker process's peak RSS).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml
from scratch import scratch_dir

METHODS = {
    "full": {"name": "full"},
    "freeze": {"name": "freeze", "layers": 2},
    "adapter": {"name": "adapter", "bottleneck": 32},
    "lora": {"name": "lora", "r": 8, "alpha": 16},
    "qlora": {"name": "qlora", "r": 8, "alpha": 16, "compute_dtype": "fp32", "optimizer": "paged_adamw_8bit"},
    "ia3": {"name": "ia3"},
    "ptuning": {"name": "ptuning", "num_virtual_tokens": 16, "encoder_hidden_size": 128},
    "prefix": {"name": "prefix", "num_virtual_tokens": 16},
    "prompt": {"name": "prompt", "num_virtual_tokens": 16, "init_text": "Answer with the word:"},
}
# Learning rates in each method's usual range (fewer trained parameters take larger steps).
LR = {
    "full": 1e-3,
    "freeze": 1e-3,
    "adapter": 3e-3,
    "lora": 3e-3,
    "qlora": 3e-3,
    "ia3": 1e-2,
    "ptuning": 1e-2,
    "prefix": 1e-2,
    "prompt": 3e-2,
}
TFEW = {
    "lm only": {"lm": 1.0},
    "lm + unlikelihood + length_norm": {"lm": 1.0, "unlikelihood": 1.0, "length_norm": 1.0},
}


def pretrain_base(folder: Path, steps: int) -> None:
    """The base model (set-up, not measured)."""
    import torch
    from transformers import AutoModelForCausalLM

    from raylm.data.corpus import stories
    from raylm.data.tokenizer import train_tokenizer
    from raylm.planning.models import architecture_config
    from raylm.spec.sections import Architecture

    texts = stories(3000, seed=0)
    tokenizer = train_tokenizer(texts, "bpe", 512, 2)
    arch = Architecture(layers=4, heads=4, hidden=128, context=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(architecture_config(arch, len(tokenizer), tokenizer))
    stream = torch.tensor(tokenizer("".join(texts), add_special_tokens=False)["input_ids"])
    blocks = stream[: len(stream) // 64 * 64].view(-1, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        ids = blocks[torch.randint(0, len(blocks), (16,))]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def spec(base: Path, output: Path, method: dict, lr: float, task: str, steps: int, **data) -> dict:
    return {
        "kind": "finetune",
        "model": {"path": str(base)},
        "method": method,
        "data": {"generate": {"task": task, "examples": 4000}, "seq_len": 48, "val_fraction": 0.05, **data},
        "train": {
            "max_steps": steps,
            "batch_size": 16,
            "lr": lr,
            "warmup_steps": 20,
            "eval_every": steps,
            "checkpoint_every": steps,
            "log_every": 50,
        },
        "eval": {"exact_match_examples": 100, "max_new_tokens": 4},
        "resources": {"num_workers": 1, "cpus_per_worker": 2},
        "output": str(output),
    }


def run(job: dict, folder: Path) -> dict:
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(job))
    subprocess.run([sys.executable, "-m", "raylm", "run", str(path)], check=True, capture_output=True)
    return json.loads((Path(job["output"]) / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--base-steps", type=int, default=600)
    parser.add_argument("--task", default="recall", choices=["arithmetic", "recall"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--no-tfew", action="store_true", help="skip the IA3 + T-Few rows")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "finetune_methods.json"))
    args = parser.parse_args()

    scratch = scratch_dir("raylm-bench-ft-")
    base = scratch / "base"
    pretrain_base(base, args.base_steps)
    rows = []
    for name in args.methods:
        folder = scratch / name
        folder.mkdir()
        summary = run(spec(base, folder / "run", METHODS[name], LR[name], args.task, args.steps), folder)
        rows.append(
            {
                "method": name,
                "trainable_percent": summary["parameters"]["trainable_percent"],
                "artifact_bytes": summary["artifact_bytes"],
                "peak_rss_bytes": summary["peak_memory"].get("process_max_rss_bytes"),
                "tokens_per_s": summary["throughput"]["tokens_per_s"],
                "val_loss": summary["metrics"]["val_loss"],
                "exact_match_before": summary["exact_match_before"]["exact_match"],
                "exact_match_after": summary["exact_match"]["exact_match"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    full = next((r["tokens_per_s"] for r in rows if r["method"] == "full"), None)
    for row in rows:
        row["throughput_vs_full"] = row["tokens_per_s"] / full if full else None

    tfew = []
    for label, objective in ({} if args.no_tfew else TFEW).items():
        folder = scratch / f"ia3-{len(tfew)}"
        folder.mkdir()
        job = spec(base, folder / "run", {"name": "ia3"}, LR["ia3"], args.task, args.steps, format="choices")
        job["train"]["objective"] = objective
        summary = run(job, folder)
        tfew.append(
            {
                "method": "ia3",
                "objective": label,
                "val_accuracy": summary["metrics"]["val_accuracy"],
                "val_loss": summary["metrics"]["val_loss"],
                "exact_match_after": summary["exact_match"]["exact_match"],
            }
        )
        print(json.dumps(tfew[-1]), flush=True)

    result = {
        "command": f"python benchmarks/finetune_methods.py --steps {args.steps} --base-steps {args.base_steps} "
        f"--task {args.task}" + (" --no-tfew" if args.no_tfew else ""),
        "base": {"family": "llama", "layers": 4, "heads": 4, "hidden": 128, "tokenizer": "bpe 512"},
        "batch": 16,
        "seq_len": 48,
        "rows": rows,
        "tfew": tfew,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
