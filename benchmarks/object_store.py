"""The same pretraining run with its output on the local disk and in a bucket (an S3-compatible server
on loopback: moto's standalone server, as the tests use), side by side, checkpointing every N steps.

    python benchmarks/object_store.py                       # 200 steps, checkpoint every 20, 2 rounds
    python benchmarks/object_store.py --steps 400 --every 50 --rounds 3

The quickstart's model (Llama, 2 layers, hidden 128) on Tiny Shakespeare (../shared/data, char
tokenizer, block 128, batch 16, 1 worker of 2 CPUs). Each run is a fresh `raylm run` process (Ray
start, tokenizing into the output's data cache, training, checkpoints, export), the local and bucket
runs alternating round by round. Timed the same way for both: the whole command, and the training
time raylm reports (`throughput.seconds`, which leaves out evaluations and checkpoint saves). The
difference of the two is what checkpoints, the data cache and the export cost. Loopback S3 has no
network latency or bandwidth limit: a real bucket adds both (ratios here are a lower bound).
Written to benchmarks/results/object_store.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from scratch import scratch_dir
from tune_search import run  # noqa: E402 - `raylm run` in its own process: (summary, wall seconds)

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def spec(steps: int, every: int, output: str) -> dict:
    return {
        "kind": "pretrain",
        "model": {
            "architecture": {"family": "llama", "layers": 2, "heads": 4, "hidden": 128, "context": 128}
        },
        "tokenizer": {"train": {"type": "char"}},
        "data": {"path": str(CORPUS), "seq_len": 128, "val_fraction": 0.02},
        "train": {
            "max_steps": steps,
            "batch_size": 16,
            "lr": 3e-3,
            "eval_every": steps,
            "eval_batches": 2,
            "checkpoint_every": every,
            "keep_checkpoints": 2,
            "log_every": every,
        },
        "resources": {"num_workers": 1, "cpus_per_worker": 2},
        "output": output,
    }


def start_s3() -> str:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench-secret",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    return "s3://bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20, help="checkpoint every N steps")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "object_store.json"))
    args = parser.parse_args()
    bucket = start_s3()
    scratch = scratch_dir("raylm-objstore-bench-")
    runs = []
    for round_ in range(args.rounds):
        for where in ("local", "bucket"):
            output = str(scratch / f"{where}-{round_}") if where == "local" else f"{bucket}/run-{round_}"
            summary, wall = run(spec(args.steps, args.every, output), scratch / f"spec-{where}-{round_}")
            train = summary["throughput"]["seconds"]
            runs.append({"round": round_, "output": where, "wall_s": wall, "train_s": train})
            print(f"round {round_} {where:6s}: {wall:6.1f} s in all, {train:6.1f} s training", flush=True)

    def total(where: str, key: str) -> float:
        return sum(r[key] for r in runs if r["output"] == where)

    result = {
        "command": " ".join(["python benchmarks/object_store.py", *sys.argv[1:]]),
        "steps": args.steps,
        "checkpoint_every": args.every,
        "rounds": args.rounds,
        "runs": runs,
        "wall_ratio_bucket_over_local": total("bucket", "wall_s") / total("local", "wall_s"),
        "train_ratio_bucket_over_local": total("bucket", "train_s") / total("local", "train_s"),
        "outside_training_s_per_run": {
            where: (total(where, "wall_s") - total(where, "train_s")) / args.rounds
            for where in ("local", "bucket")
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
