"""2-worker ddp, fsdp and deepspeed pretraining in raylm against bare torch.distributed loops, side by side.

    python benchmarks/strategy_overhead.py                  # writes benchmarks/results/strategy_overhead.json
    python benchmarks/strategy_overhead.py --steps 150 --rounds 2 --strategies ddp fsdp

For each strategy the baseline is the same strategy written by hand: two processes started with
torch.multiprocessing, a gloo process group, the same model (raylm.planning.models.build_model, same seed),
the same packed Tiny Shakespeare blocks (each rank a strided half), batch, AdamW and clipping, one
torch thread per process: torch DDP, FSDP2 `fully_shard` per block, or `deepspeed.initialize` with
the same ZeRO config. raylm runs the same on its embedded Ray with 2 workers of 1 CPU and reports
its step time through its metrics (tokens/s per logging window, excluding evaluation and
checkpointing). Medians over the windows of all rounds (first window of each run dropped: warm-up);
rounds alternate bare/raylm so drift on a shared machine hits both. Target: raylm / bare <= 1.10.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

from scratch import scratch_dir

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
    "resources": {"num_workers": 2, "cpus_per_worker": 1},
}
STRATEGIES = {
    "ddp": {"name": "ddp"},
    "fsdp": {"name": "fsdp"},
    "deepspeed": {"name": "deepspeed", "stage": 2},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_worker(rank, world, port, job_dict, tokenizer, blocks, steps, results):
    """One rank of the hand-written loop."""
    import torch
    import torch.distributed as dist

    from raylm.planning.models import build_model
    from raylm.spec.loading import validate_dict
    from raylm.train import optim

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    job = validate_dict(job_dict)
    train = job.train
    model = build_model(job.model, vocab_size=len(tokenizer), tokenizer=tokenizer, seed=train.seed)
    model.config.use_cache = False
    model.train()
    name = job.strategy.name
    if name == "deepspeed":
        import deepspeed

        from raylm.train.strategies.deepspeed import config

        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=optim.param_groups(model, train),
            config=config(job.strategy, train, "fp32", model.config.hidden_size),
            dist_init_required=False,
        )

        def step(ids):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            return loss
    else:
        if name == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for block in model.model.layers:
                fully_shard(block)
            fully_shard(model)
        optimizer = optim.adamw(model, train)
        scheduler = optim.scheduler(optimizer, train, steps)

        def step(ids):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            return loss

    data = torch.from_numpy(blocks[rank::world]).long()
    batch, log_every = train.batch_size, train.log_every
    windows, start = [], time.perf_counter()
    for i in range(1, steps + 1):
        at = (i - 1) * batch % (len(data) - batch)
        step(data[at : at + batch]).item()
        if i % log_every == 0:
            windows.append((time.perf_counter() - start) / log_every)
            start = time.perf_counter()
    if rank == 0:
        results.put(windows[1:])
    dist.destroy_process_group()


def bare_loop(job_dict, tokenizer, blocks, steps: int) -> list[float]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(
        bare_worker,
        args=(2, free_port(), job_dict, tokenizer, blocks, steps, results),
        nprocs=2,
        start_method="spawn",
    )
    return results.get()


def raylm_loop(job_dict) -> list[float]:
    from raylm.spec.loading import validate_dict
    from raylm.submit import run_here

    job = validate_dict(job_dict)
    run_here(job)
    rows = [json.loads(line) for line in (Path(job.output.path) / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = job.train.batch_size * job.data.seq_len * job.train.grad_accum * 2
    return [tokens_per_step / row["tokens_per_s"] for row in rows if "tokens_per_s" in row][1:-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument(
        "--corpus", default=str(Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt")
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "strategy_overhead.json"))
    args = parser.parse_args()

    import numpy as np

    from raylm.data.pipeline import configure_ray_data, documents, packed_blocks
    from raylm.data.tokenizer import train_tokenizer
    from raylm.runtime.cluster import start_local_ray
    from raylm.spec.loading import validate_dict

    start_local_ray(num_cpus=4)  # as `raylm run` starts it on this machine
    configure_ray_data()
    scratch = scratch_dir("raylm-bench-")
    spec = {
        **SPEC,
        "data": {**SPEC["data"], "path": args.corpus},
        "train": {**SPEC["train"], "max_steps": args.steps},
    }
    base = validate_dict({**spec, "output": str(scratch / "probe")})
    docs = documents(base.data)
    tokenizer = train_tokenizer((r["text"] for r in docs.take_all()), "char", 0)
    packed = packed_blocks(docs, tokenizer, base.data).take_all()
    blocks = np.stack([r["input_ids"] for r in packed if not r["val"]])

    rows = {}
    for name in args.strategies:
        bare, ours = [], []
        for round_ in range(args.rounds):
            job = {**spec, "strategy": STRATEGIES[name], "output": str(scratch / f"{name}-{round_}")}
            bare += bare_loop(job, tokenizer, blocks, args.steps)
            ours += raylm_loop(job)
        rows[name] = {
            "bare_step_ms": 1000 * statistics.median(bare),
            "raylm_step_ms": 1000 * statistics.median(ours),
            "windows": {"bare": len(bare), "raylm": len(ours)},
        }
        rows[name]["ratio"] = rows[name]["raylm_step_ms"] / rows[name]["bare_step_ms"]
        print(name, json.dumps(rows[name]), flush=True)
    result = {
        "command": "python benchmarks/strategy_overhead.py "
        + f"--steps {args.steps} --rounds {args.rounds} --strategies {' '.join(args.strategies)}",
        "model": SPEC["model"]["architecture"],
        "batch_size": base.train.batch_size,
        "seq_len": base.data.seq_len,
        "workers": 2,
        "torch_threads_per_worker": 1,
        "strategies": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
