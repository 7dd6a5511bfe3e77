"""What the pretrain and finetune drivers share: the run folder's identity, the strategy, the
Ray Train trainer and the job's summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from raylm.spec.reading import SpecError

# Fields that may change between a run and its resumption; any other change makes a different run
# (resources.num_workers too: each worker's share of the data, and so the batches, would change;
# an elastic run, whose worker count changes anyway, may change its range).
RESUMABLE_CHANGES = {
    ("name",),
    ("failure",),
    ("logging",),
    ("resources", "use_gpu"),
    ("resources", "cpus_per_worker"),
    ("resources", "gpus_per_worker"),
    ("resources", "placement"),
    ("resources", "shared_filesystem"),
    ("train", "max_steps"),
    ("train", "epochs"),
    ("train", "log_every"),
    ("train", "eval_every"),
    ("train", "checkpoint_every"),
    ("train", "keep_checkpoints"),
    ("train", "eval_batches"),
}


# The run's length: resumable only under a constant schedule (the others are functions of it).
LENGTH_FIELDS = {("train", "max_steps"), ("train", "epochs")}


def prepare_run(job) -> Path | None:
    """What every training driver does first: absolute local model / tokenizer paths (workers may run
    elsewhere), the run folder's identity check, Ray Data's settings. Returns the local run folder
    (None for a storage URI)."""
    from raylm.data.pipeline import configure_ray_data
    from raylm.runtime import storage
    from raylm.runtime.capacity import check_cluster

    check_cluster(job.output.path, job.resources)
    for section in job.path_sections:
        if section.path and Path(section.path).expanduser().exists():
            section.path = str(Path(section.path).expanduser().resolve())
    output = job.output.path
    local_output = None if storage.is_uri(output) else Path(output).resolve()
    check_same_run(job, str(local_output) if local_output else output)
    configure_ray_data()
    return local_output


def resolve_strategy(job) -> tuple[dict, str]:
    """The run's concrete strategy. A resumed run keeps the one its checkpoints were written with
    (recorded in the output's strategy.json, a folder or a URI), even when `auto` would now choose
    another (other GPUs, another worker count)."""
    from raylm.planning.plan import NothingFits, resolve
    from raylm.runtime import storage

    output = job.output.path if storage.is_uri(job.output.path) else str(Path(job.output.path).resolve())
    saved = storage.read_text(output, "strategy.json")
    if saved is not None:
        record = json.loads(saved)
        return record["strategy"], f"kept from the run's first attempt: {record['why']}"
    try:
        strategy, why = resolve(job)
    except NothingFits as err:
        raise SpecError([("strategy", str(err))]) from None
    if strategy["name"] == "deepspeed" and job.train.keep_sparsity:
        raise SpecError(
            [
                (
                    "strategy",
                    f"auto chose deepspeed ({why}), which train.keep_sparsity cannot mask: set fsdp or ddp",
                )
            ]
        )
    storage.write_text(output, "strategy.json", json.dumps({"strategy": strategy, "why": why}, indent=2))
    return strategy, why


def announce(job, strategy: dict, why: str, total_steps: int, extra: str) -> None:
    workers = job.resources.num_workers
    print(
        f"[raylm] {job.kind} {job.run_name}: {workers if isinstance(workers, int) else list(workers)} "
        f"worker(s), strategy {strategy['name']} ({why}), {total_steps} steps, {extra}, output {job.output.path}",
        flush=True,
    )


def tokenized(job, tokenizer, make_rows, val_limit: int | None = None) -> tuple[str, dict]:
    """The run's tokenized data (raylm/data/cache.py): (where, manifest), written from the Ray Dataset
    `make_rows()` returns unless a cache of the same inputs, tokenizer and settings exists."""
    from raylm.data.cache import cache_key, ensure
    from raylm.data.sources import dataset_inputs

    inputs = job.data.paths + (dataset_inputs(job.data.dataset) if job.data.dataset else [])
    from raylm.runtime import storage

    root = job.data.cache or f"{job.output.path.rstrip('/')}/data-cache"
    if not storage.is_uri(root):  # workers run in folders of their own: give them an absolute path
        root = str(Path(root).expanduser().resolve())
    where = f"{root.rstrip('/')}/{cache_key(job.data, tokenizer, inputs)}"
    from raylm.data.sources import BadExample

    try:
        manifest, written = ensure(where, make_rows, val_limit)
    except BadExample as err:  # an example that cannot be used: the spec's problem, named
        raise SpecError([("data", str(err))]) from None
    train, val = manifest["splits"]["train"]["rows"], manifest["splits"]["val"]["rows"]
    how = "tokenized into" if written else "reusing the tokenized data in"
    print(f"[raylm] {how} {where} ({train} train rows, {val} validation rows)", flush=True)
    return where, manifest


def fit(kind, job, local_output: Path | None, loop_config: dict, callbacks: tuple = ()):
    """Run raylm.train.loop.train_loop on Ray Train with the hooks of `kind` (a TrainingKind) and
    Ray Train `callbacks`; returns the Result and rank 0's return value."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raylm.runtime import storage
    from raylm.train.console import Console
    from raylm.train.loop import train_loop
    from raylm.train.preemption import SigtermNotice
    from raylm.train.tracking import finish_runs, open_runs

    output = job.output.path
    tracking = open_runs(job, str(local_output) if local_output else output)
    workers = job.resources.num_workers
    console = Console(loop_config["total_steps"])
    try:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "kind": kind,
                "job": job,
                "tracking": tracking,
                "console": console.queue,
                "stage_dir": str(local_output) if local_output else None,
                "publish_to": output if storage.is_uri(output) else None,
                **loop_config,
            },
            scaling_config=ScalingConfig(
                num_workers=workers if isinstance(workers, int) else tuple(workers),
                use_gpu=job.resources.use_gpu,
                resources_per_worker=job.resources.per_worker,
                placement_strategy=job.resources.placement.upper(),
            ),
            run_config=RunConfig(
                name="checkpoints",
                storage_path=str(local_output) if local_output else output,
                failure_config=FailureConfig(max_failures=job.failure.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=job.train.keep_checkpoints),
                callbacks=[SigtermNotice(), *callbacks],
            ),
        )
        result = trainer.fit()
    except BaseException:
        finish_runs(tracking, job, None, None)
        raise
    finally:
        console.close()
    return result, {**(result.return_value or {}), "tracking": tracking}


def finish(job, local_output: Path | None, summary: dict, outcome: dict) -> None:
    """Write summary.json into the run and close the tracking runs with it."""
    import tempfile

    from raylm.runtime import storage
    from raylm.train.tracking import finish_runs

    text = json.dumps(summary, indent=2)
    storage.write_text(job.output.path, "summary.json", text)
    if outcome.get("tracking"):
        with tempfile.TemporaryDirectory() as scratch:
            (Path(scratch) / "summary.json").write_text(text)
            finish_runs(outcome["tracking"], job, summary, Path(scratch) / "summary.json")


def base_summary(job, total_steps: int, result, outcome: dict, strategy: dict, why: str) -> dict:
    return {
        "kind": job.kind,
        "run": job.run_name,
        "steps": total_steps,
        "metrics": outcome.get("metrics") or (result.metrics or {}),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "worker_nodes": outcome.get("worker_nodes", []),
        "host_memory": outcome.get("host_memory"),
        "resumed_from": outcome.get("resumed_from", 0),
        "throughput": outcome.get("throughput"),
        "strategy": {**outcome.get("strategy", strategy), "why": why},
    }


def planned_steps(job, train_rows: int) -> int:
    """max_steps, or the steps of `epochs` passes over `train_rows` (each worker's share of whole
    micro-batches); refuses data too small for one micro-batch per worker."""
    per_worker = train_rows // job.train.batch_size // job.resources.max_workers
    if per_worker == 0:
        raise SpecError(
            [
                (
                    "train.batch_size",
                    f"the training split has {train_rows} rows, fewer than one batch of "
                    f"{job.train.batch_size} per worker ({job.resources.max_workers}): lower batch_size "
                    "or add data",
                )
            ]
        )
    if job.train.max_steps is not None:
        return job.train.max_steps
    return max(1, math.ceil(job.train.epochs * per_worker / job.train.grad_accum))


def check_same_run(job, output: str) -> None:
    """Refuse to resume a run (a folder or a URI) written by a different spec; record the spec for
    new runs (and over the record of one that stopped before its first checkpoint)."""
    from raylm.runtime import storage
    from raylm.train.tracking import recordable

    # a fetched input is recorded as the URI it came from; a tracking URI without its credentials
    current = recordable(storage.as_written(job))
    recorded = storage.read_text(output, "spec.yaml")
    # a run that stopped before its first checkpoint (a problem in its data, say) kept nothing to resume
    started = storage.exists(output, "summary.json") or storage.listing(f"{output.rstrip('/')}/checkpoints")
    if recorded is not None and started:
        earlier = yaml.safe_load(recorded)
        resumable = RESUMABLE_CHANGES | ({("resources", "num_workers")} if job.resources.elastic else set())
        differences = _diff(earlier, current)
        changed = [p for p in differences if not any(p[: len(a)] == a for a in resumable)]
        length = [".".join(p) for p in differences if p in LENGTH_FIELDS]
        if length and job.train.schedule != "constant":
            raise SpecError(
                [
                    (
                        length[0],
                        f"changed on resume: the {job.train.schedule} learning-rate schedule would be rebuilt "
                        "over the new length and the rate jump at the resume point; keep it, use "
                        "train.schedule: constant, or start a new run in a new output folder",
                    )
                ]
            )
        if changed:
            fields = ", ".join(".".join(p) for p in changed)
            raise SpecError(
                [
                    (
                        "output",
                        f"{output} holds a run of a different spec (changed: {fields}); "
                        "use a new output folder, or remove the old run to start over",
                    )
                ]
            )
    storage.write_text(output, "spec.yaml", yaml.safe_dump(current, sort_keys=False))


def _diff(a, b, prefix=()) -> list[tuple]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for k in sorted(set(a) | set(b)) for p in _diff(a.get(k), b.get(k), (*prefix, k))]
    return [] if a == b else [prefix]
