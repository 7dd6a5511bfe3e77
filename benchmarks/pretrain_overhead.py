"""raylm pretraining throughput against a plain single-process PyTorch loop, over whole runs.

    python benchmarks/pretrain_overhead.py                       # 2000 steps, default attention, eager
    python benchmarks/pretrain_overhead.py --variants all        # also eager attention, and torch.compile
    python benchmarks/pretrain_overhead.py --steps 300 --rounds 2

The model of jobs/tinyshakespeare-char.yaml (Llama, 4 layers, 4 heads, hidden 128, block 64, batch
12, char tokenizer, Tiny Shakespeare from ../shared/data), 2 torch threads on both sides.

- raylm: `raylm run` on that spec (1 worker of 2 CPUs, no evaluation or checkpoint before the end),
  in its own process; its throughput is summary.json's `throughput`: every token of the run over the
  training time, epoch boundaries and data waits included, evaluation and checkpointing not.
- plain: the same model, tokenizer, packed blocks (raylm.data.pipeline.pack_batch, same validation split), AdamW
  + schedule + clipping, in a process that never imports Ray, started when no Ray process is alive;
  its throughput is every token over the wall time of its loop (it has no evaluation or checkpoint).
- plain in Ray Train (`--with-ray-train`): that same loop function as the train function of a
  1-worker TorchTrainer (2 CPUs) on the embedded Ray raylm starts (raylm.runtime.cluster.ensure_ray), timed the
  same way: what Ray Train alone costs this loop, raylm's code aside.

Rounds alternate plain / plain in Ray Train (when asked) / raylm; `pooled` gives each variant's
rounds together (each side's tokens over its summed seconds). Written to
benchmarks/results/pretrain_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml
from scratch import scratch_dir

ROOT = Path(__file__).resolve().parents[1]
SPEC = yaml.safe_load((ROOT / "jobs" / "tinyshakespeare-char.yaml").read_text())
VARIANTS = {
    "sdpa": {"attention": None, "compile": False},
    "eager": {"attention": "eager", "compile": False},
    "sdpa+compile": {"attention": None, "compile": True},
    "eager+compile": {"attention": "eager", "compile": True},
}


def spec_for(corpus: str, steps: int, variant: dict, output: str) -> dict:
    spec = json.loads(json.dumps(SPEC))
    spec["data"]["path"] = corpus
    spec["data"]["shuffle_buffer"] = 0  # file order on both sides
    spec["model"]["attention"] = variant["attention"]
    spec["train"].update(
        max_steps=steps, compile=variant["compile"], eval_every=10**9, checkpoint_every=10**9
    )
    spec["output"] = output
    return spec


def plain(spec_file: str) -> dict:
    """The plain loop (run in a fresh process: `--plain SPEC`)."""
    import numpy as np
    import torch

    from raylm.data.pipeline import pack_batch
    from raylm.data.tokenizer import train_tokenizer
    from raylm.planning.models import build_model
    from raylm.spec.loading import load_spec
    from raylm.train import optim

    job = load_spec(spec_file)
    threads = int(job.resources.cpus_per_worker)
    torch.set_num_threads(threads)
    lines = [line + "\n" for line in Path(job.data.paths[0]).read_text().split("\n")]
    tokenizer = train_tokenizer(lines, "char", 0)
    blocks = []
    for start in range(0, len(lines), job.data.pack_batch_docs):  # raylm packs batches of documents
        batch = {"text": lines[start : start + job.data.pack_batch_docs]}
        blocks += [
            b["input_ids"][~b["val"]]
            for b in pack_batch(batch, tokenizer, job.data.seq_len, False, job.data.val_fraction)
        ]
    data = torch.from_numpy(np.concatenate(blocks)).long()
    model = build_model(job.model, vocab_size=len(tokenizer), tokenizer=tokenizer, seed=job.train.seed)
    model.config.use_cache = False
    model.train()
    optimizer = optim.adamw(model, job.train)
    scheduler = optim.scheduler(optimizer, job.train, job.train.max_steps)
    step_fn = torch.compile(model) if job.train.compile else model
    batch, per_epoch = job.train.batch_size, len(data) // job.train.batch_size
    start = time.perf_counter()
    for step in range(job.train.max_steps):
        i = step % per_epoch * batch
        ids = data[i : i + batch]
        loss = step_fn(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), job.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss.item()  # raylm reads the loss every step too
    seconds = time.perf_counter() - start
    tokens = job.train.max_steps * batch * job.data.seq_len
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "final_loss": loss.item()}


def in_ray_train(spec_file: str) -> dict:
    """The plain loop as a Ray Train worker's train function (run in a fresh process: `--in-train SPEC`)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raylm.runtime.cluster import ensure_ray
    from raylm.spec.loading import load_spec

    job = load_spec(spec_file)
    ensure_ray(job)  # the embedded Ray raylm runs its jobs on
    trainer = TorchTrainer(
        lambda: plain(spec_file),
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker=job.resources.per_worker),
        run_config=RunConfig(storage_path=str(scratch_dir("raylm-bench-train-"))),
    )
    return trainer.fit().return_value


def ray_alive() -> bool:
    return subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True).returncode == 0


def no_ray_alive() -> None:
    deadline = time.time() + 120
    while ray_alive():
        if time.time() > deadline:
            raise SystemExit("a Ray process is still alive: stop it (ray stop) before benchmarking")
        time.sleep(1)


def run_loop(spec_file: Path, mode: str) -> dict:
    """The plain loop in a fresh process, alone (`--plain`) or inside Ray Train (`--in-train`)."""
    no_ray_alive()  # the plain process runs with no Ray beside it; the in-train one starts its own
    out = subprocess.run(
        [sys.executable, __file__, mode, str(spec_file)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_raylm(spec_file: Path, output: Path) -> dict:
    no_ray_alive()
    subprocess.run([sys.executable, "-m", "raylm", "run", str(spec_file)], check=True, capture_output=True)
    summary = json.loads((output / "summary.json").read_text())
    return {**summary["throughput"], "final_loss": summary["metrics"].get("loss")}


def pooled(rows: list[dict]) -> dict:
    """A variant's rounds together: each side's tokens over its summed seconds, and the ratios to plain."""
    sides = [side for side in ("plain", "plain_in_ray_train", "raylm") if side in rows[0]]
    rate = {
        side: sum(r[side]["tokens"] for r in rows) / sum(r[side]["seconds"] for r in rows) for side in sides
    }
    ratios = {f"{side}_ratio": rate[side] / rate["plain"] for side in sides[1:]}
    return {"rounds": len(rows), **{f"{k}_tokens_per_s": v for k, v in rate.items()}, **ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain", help=argparse.SUPPRESS)
    parser.add_argument("--in-train", help=argparse.SUPPRESS)
    parser.add_argument(
        "--with-ray-train", action="store_true", help="also time the plain loop inside a Ray Train worker"
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--variants", default="sdpa", help=f"comma-separated of {', '.join(VARIANTS)}, or all"
    )
    parser.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pretrain_overhead.json"))
    args = parser.parse_args()
    if args.plain:
        print(json.dumps(plain(args.plain)))
        return
    if args.in_train:
        print(json.dumps(in_ray_train(args.in_train)))
        return

    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    scratch = scratch_dir("raylm-bench-")
    rows = []
    for name in names:
        for round_ in range(args.rounds):
            output = scratch / f"{name}-{round_}"
            spec_file = scratch / f"{name}-{round_}.yaml"
            spec_file.write_text(
                yaml.safe_dump(spec_for(args.corpus, args.steps, VARIANTS[name], str(output)))
            )
            base = run_loop(spec_file, "--plain")
            row = {"variant": name, "round": round_, "plain": base}
            if args.with_ray_train:
                row["plain_in_ray_train"] = run_loop(spec_file, "--in-train")
                row["plain_in_ray_train_ratio"] = (
                    row["plain_in_ray_train"]["tokens_per_s"] / base["tokens_per_s"]
                )
            row["raylm"] = run_raylm(spec_file, output)
            row["ratio"] = row["raylm"]["tokens_per_s"] / base["tokens_per_s"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {
        "command": f"python benchmarks/pretrain_overhead.py --steps {args.steps} --rounds {args.rounds} "
        f"--variants {args.variants}" + (" --with-ray-train" if args.with_ray_train else ""),
        "model": SPEC["model"]["architecture"],
        "batch_size": SPEC["train"]["batch_size"],
        "seq_len": SPEC["data"]["seq_len"],
        "torch_threads": SPEC["resources"]["cpus_per_worker"],
        "steps": args.steps,
        "rows": rows,
        "pooled": {name: pooled([r for r in rows if r["variant"] == name]) for name in names},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
