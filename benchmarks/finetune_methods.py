"""Every fine-tuning method on one generated task, side by side: trainable %, artifact size, peak
memory, step time relative to full fine-tuning, held-out exact match before and after.

    python benchmarks/finetune_methods.py                      # writes benchmarks/results/finetune_methods.json
    python benchmarks/finetune_methods.py --steps 600 --task recall --methods full lora qlora

The base is a small Llama (4 layers, hidden 128, byte-level BPE) pretrained here on the stories raylm
generates, so it has never seen the task's format (exact match ~0 before). Each method then trains
in its own process (peak memory: the largest resident-set growth over loading the model and
training, sampled after each forward and each optimizer step) with the same data order, batch and step count, through
raylm's method modules (raylm.methods) and SFT encoding (raylm.sft). Exact match: greedy answers to
held-out prompts equal to the reference. CPU, 2 torch threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = {
    "full": {"name": "full"},
    "freeze": {"name": "freeze", "layers": 2},
    "adapter": {"name": "adapter", "bottleneck": 32},
    "lora": {"name": "lora", "r": 8, "alpha": 16},
    "qlora": {"name": "qlora", "r": 8, "alpha": 16, "compute_dtype": "fp32", "optimizer": "paged_adamw_8bit"},
    "ia3": {"name": "ia3"},
    "ptuning": {"name": "ptuning", "num_virtual_tokens": 16, "encoder_hidden_size": 128},
    "prefix": {"name": "prefix", "num_virtual_tokens": 16},
    "prompt": {"name": "prompt", "num_virtual_tokens": 16, "init_text": "Answer with the number:"},
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


def pretrain_base(folder: Path, steps: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from raylm.corpus import stories
    from raylm.models import architecture_config
    from raylm.spec.sections import Architecture
    from raylm.tokenizer import train_tokenizer

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


def run_method(base: str, name: str, task: str, steps: int, out: str) -> None:
    """One method, in this (fresh) process: train, time, measure, write a JSON row to `out`."""
    import torch
    from pydantic import TypeAdapter
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm import methods
    from raylm.evaluate import exact_match
    from raylm.methods import MethodSpec
    from raylm.sft import collate, encode, prompt_ids
    from raylm.spec.sft import SFTDataSpec
    from raylm.tasks import generate

    torch.set_num_threads(2)
    method = TypeAdapter(MethodSpec).validate_python(METHODS[name])
    import bitsandbytes  # noqa: F401  (imported before the baseline: libraries are not training memory)
    import peft as hf_peft  # noqa: F401

    tokenizer = AutoTokenizer.from_pretrained(base)
    rss_before = rss()
    if name == "qlora":
        model = methods.module("qlora").load_base(base, method, "cpu")
    else:
        model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(0)
    model = methods.apply(model, method, tokenizer)
    spec = SFTDataSpec(generate={}, seq_len=32)
    data = generate(task, 4000, seed=1)
    held = [(prompt_ids(e["prompt"], tokenizer), e["completion"]) for e in generate(task, 200, seed=99)]
    before = exact_match(model, tokenizer, held, max_new_tokens=6)["exact_match"]
    rows = [encode(e["prompt"], e["completion"], tokenizer, spec) for e in data]
    params = [p for p in model.parameters() if p.requires_grad]
    lr = LR[name]
    optimizer = (
        methods.module("qlora").optimizer(params, lr, (0.9, 0.99), method)
        if name == "qlora"
        else torch.optim.AdamW(params, lr=lr)
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 30))
    batch, times, losses, peak = 16, [], [], 0
    model.train()
    for step in range(steps):
        chunk = [rows[(step * batch + i) % len(rows)] for i in range(batch)]
        rows32 = {k: torch.from_numpy(v) for k, v in collate(chunk, 32, tokenizer.pad_token_id).items()}
        start = time.perf_counter()
        loss = model(**rows32).loss
        peak = max(peak, rss())  # activations alive
        loss.backward()
        optimizer.step()
        peak = max(peak, rss())  # gradients and optimizer state alive
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    after = exact_match(model, tokenizer, held, max_new_tokens=6)["exact_match"]
    with tempfile.TemporaryDirectory() as folder:
        methods.module(name).save(model, Path(folder))
        size = sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))
    trainable = sum(p.numel() for p in params)
    # 4-bit weights are stored two to a byte: count the parameters they stand for
    total = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())
    row = {
        "method": name,
        "trainable": trainable,
        "trainable_percent": 100 * trainable / total,
        "artifact_bytes": size,
        "peak_memory_mib": (peak - rss_before) / 2**20,
        "step_ms": 1000 * statistics.median(times[10:]),
        "final_loss": statistics.mean(losses[-20:]),
        "exact_match_before": before,
        "exact_match_after": after,
    }
    Path(out).write_text(json.dumps(row))


def rss() -> int:
    """Resident bytes now: sampled during training, its maximum bounds the live memory's peak."""
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--base-steps", type=int, default=600)
    parser.add_argument("--task", default="arithmetic", choices=["arithmetic", "recall"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "finetune_methods.json"))
    parser.add_argument("--one", nargs=3, metavar=("BASE", "METHOD", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_method(args.one[0], args.one[1], args.task, args.steps, args.one[2])
        return

    scratch = Path(tempfile.mkdtemp(prefix="raylm-bench-ft-"))
    base = scratch / "base"
    pretrain_base(base, args.base_steps)
    rows = []
    for name in args.methods:
        out = scratch / f"{name}.json"
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--steps",
                str(args.steps),
                "--task",
                args.task,
                "--one",
                str(base),
                name,
                str(out),
            ],
            check=True,
        )
        rows.append(json.loads(out.read_text()))
        print(json.dumps(rows[-1]), flush=True)
    full = next((r["step_ms"] for r in rows if r["method"] == "full"), None)
    for row in rows:
        row["step_time_vs_full"] = row["step_ms"] / full if full else None
    result = {
        "command": f"python benchmarks/finetune_methods.py --steps {args.steps} --base-steps {args.base_steps} "
        f"--task {args.task}",
        "base": {"family": "llama", "layers": 4, "heads": 4, "hidden": 128, "tokenizer": "bpe 512"},
        "batch": 16,
        "seq_len": 32,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
