"""raylm's pretraining loop (1 Ray Train worker) against a bare PyTorch loop, side by side.

    python benchmarks/pretrain_overhead.py                 # writes benchmarks/results/pretrain_overhead.json
    python benchmarks/pretrain_overhead.py --steps 300 --rounds 2

Same model (raylm.models.build_model, same seed), same packed data, batch, optimizer and torch
thread count. raylm's in-loop step time comes from its own metrics (tokens/s over each logging
window, which excludes evaluation and checkpointing); the bare loop is timed the same way. Rounds
alternate bare/raylm so that drift on a shared machine hits both. Reported: median step times and
their ratio (target <= 1.05). The bare loop also runs inside a Ray Train worker, which tells the
cost of the worker process apart from the cost of raylm's loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

SPEC = {
    "kind": "pretrain",
    "model": {"architecture": {"family": "llama", "layers": 4, "heads": 4, "hidden": 128, "context": 64}},
    "tokenizer": {"train": {"type": "char"}},
    "data": {"path": None, "seq_len": 64, "val_fraction": 0.05, "shuffle_buffer": 0},
    "train": {
        "batch_size": 12,
        "lr": 1e-3,
        "warmup_steps": 10,
        "eval_every": 100000,
        "checkpoint_every": 100000,
        "log_every": 25,
    },
    "resources": {"num_workers": 1, "cpus_per_worker": 2},
}


def bare_loop(job, tokenizer, blocks, steps: int, threads: int, log_every: int, val=None):
    """The same training step with nothing around it; step times per logging window (and, given
    validation blocks, the final validation loss as raylm computes it)."""
    import torch

    from raylm.models import build_model
    from raylm.train import optim

    torch.set_num_threads(threads)
    model = build_model(job.model, vocab_size=len(tokenizer), tokenizer=tokenizer, seed=job.train.seed)
    model.config.use_cache = False
    model.train()
    optimizer = optim.adamw(model, job.train)
    scheduler = optim.scheduler(optimizer, job.train, steps)
    batch = job.train.batch_size
    data = torch.from_numpy(blocks).long()
    windows, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        i = (step - 1) * batch % (len(data) - batch)
        ids = data[i : i + batch]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), job.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss.item()  # raylm reads the loss every step too
        if step % log_every == 0:
            windows.append((time.perf_counter() - start) / log_every)
            start = time.perf_counter()
    if val is None:
        return windows[1:]  # the first window holds warm-up
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(val) - batch + 1, batch):
            ids = torch.from_numpy(val[i : i + batch]).long()
            n = ids.numel() - ids.shape[0]
            total += model(input_ids=ids, labels=ids).loss.item() * n
            count += n
    return windows[1:], total / count


def bare_in_ray_worker(
    job, tokenizer, blocks, steps: int, threads: int, log_every: int, storage: Path
) -> list[float]:
    """The bare loop again, inside a Ray Train worker: separates the worker process from raylm's loop."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(_config):
        return bare_loop(job, tokenizer, blocks, steps, threads, log_every)

    scaling = ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads})
    return (
        TorchTrainer(loop, scaling_config=scaling, run_config=RunConfig(storage_path=str(storage)))
        .fit()
        .return_value
    )


def raylm_loop(job) -> list[float]:
    from raylm.submit import run_here

    summary = run_here(job)
    raylm_loop.val_loss = summary["metrics"].get("val_loss")
    rows = [json.loads(line) for line in (Path(job.output.path) / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = job.train.batch_size * job.data.seq_len * job.train.grad_accum
    return [tokens_per_step / row["tokens_per_s"] for row in rows if "tokens_per_s" in row][1:-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--val-loss",
        action="store_true",
        help="also report both loops' final validation loss (1 round, no in-worker run)",
    )
    parser.add_argument(
        "--corpus", default=str(Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt")
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "pretrain_overhead.json"))
    args = parser.parse_args()

    import numpy as np

    from raylm.data import configure_ray_data, documents, packed_blocks
    from raylm.spec import validate_dict
    from raylm.submit import start_local_ray
    from raylm.tokenizer import train_tokenizer

    start_local_ray(num_cpus=4)  # as `raylm run` starts it
    configure_ray_data()
    scratch = Path(tempfile.mkdtemp(prefix="raylm-bench-"))
    spec = {
        **SPEC,
        "data": {**SPEC["data"], "path": args.corpus},
        "train": {**SPEC["train"], "max_steps": args.steps},
    }
    base = validate_dict({**spec, "output": str(scratch / "probe")})
    docs = documents(base.data)
    tokenizer = train_tokenizer((r["text"] for r in docs.take_all()), "char", 0)
    blocks = np.stack([r["input_ids"] for r in packed_blocks(docs, tokenizer, base.data, "train").take_all()])
    threads = int(base.resources.cpus_per_worker)

    if args.val_loss:
        val = np.stack(
            [
                r["input_ids"]
                for r in packed_blocks(docs, tokenizer, base.data, "val")
                .limit(base.data.val_blocks)
                .take_all()
            ]
        )
        bare, bare_val = bare_loop(base, tokenizer, blocks, args.steps, threads, base.train.log_every, val)
        ours = raylm_loop(validate_dict({**spec, "output": str(scratch / "raylm-val")}))
        tokens = base.train.batch_size * base.data.seq_len
        result = {
            "command": f"python benchmarks/pretrain_overhead.py --steps {args.steps} --val-loss",
            "model": SPEC["model"]["architecture"],
            "batch_size": base.train.batch_size,
            "seq_len": base.data.seq_len,
            "steps": args.steps,
            "bare_tokens_per_s": tokens / statistics.median(bare),
            "raylm_tokens_per_s": tokens / statistics.median(ours),
            "bare_val_loss": bare_val,
            "raylm_val_loss": raylm_loop.val_loss,
            "val_blocks": len(val),
        }
        result["throughput_ratio"] = result["raylm_tokens_per_s"] / result["bare_tokens_per_s"]
        out = Path(args.out).with_name("pretrain_tinyshakespeare.json")
        out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return

    bare, in_worker, ours = [], [], []
    for round_ in range(args.rounds):
        bare += bare_loop(base, tokenizer, blocks, args.steps, threads, base.train.log_every)
        in_worker += bare_in_ray_worker(
            base, tokenizer, blocks, args.steps, threads, base.train.log_every, scratch / "bare"
        )
        ours += raylm_loop(validate_dict({**spec, "output": str(scratch / f"raylm-{round_}")}))
    result = {
        "command": "python benchmarks/pretrain_overhead.py " + f"--steps {args.steps} --rounds {args.rounds}",
        "model": SPEC["model"]["architecture"],
        "batch_size": base.train.batch_size,
        "seq_len": base.data.seq_len,
        "torch_threads": threads,
        "bare_step_ms": 1000 * statistics.median(bare),
        "bare_in_ray_worker_step_ms": 1000 * statistics.median(in_worker),
        "raylm_step_ms": 1000 * statistics.median(ours),
        "windows": {"bare": len(bare), "bare_in_ray_worker": len(in_worker), "raylm": len(ours)},
    }
    result["ratio"] = result["raylm_step_ms"] / result["bare_step_ms"]
    result["ratio_to_bare_in_ray_worker"] = result["raylm_step_ms"] / result["bare_in_ray_worker_step_ms"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
