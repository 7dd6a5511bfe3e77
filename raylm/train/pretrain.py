"""Driver of `kind: pretrain`: tokenizer -> Ray Data pipeline -> Ray Train TorchTrainer -> summary.

    raylm run jobs/quickstart.yaml
    raylm run jobs/quickstart.yaml --set train.max_steps=50 --set output=runs/smoke

Re-running a spec with the same output resumes from its latest checkpoint (Ray Train restores the
run from `<output>/checkpoints`); `failure.max_failures` restarts failed workers from it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from raylm import storage
from raylm.spec import PretrainJob, SpecError
from raylm.spec.sections import TokenizerTraining

# Fields that may change between a run and its resumption; any other change makes a different run
# (resources.num_workers too: each worker's share of the data, and so the batches, would change;
# an elastic run, whose worker count changes anyway, may change its range).
RESUMABLE_CHANGES = {
    ("name",),
    ("failure",),
    ("resources", "use_gpu"),
    ("resources", "cpus_per_worker"),
    ("resources", "gpus_per_worker"),
    ("resources", "placement"),
    ("train", "max_steps"),
    ("train", "epochs"),
    ("train", "log_every"),
    ("train", "eval_every"),
    ("train", "checkpoint_every"),
    ("train", "keep_checkpoints"),
    ("train", "eval_batches"),
}

SAMPLE_PROMPT_TOKENS = 8


def run_pretrain(job: PretrainJob) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raylm.data import configure_ray_data, documents, packed_blocks
    from raylm.train.loop import train_loop

    output = job.output.path
    local_output = None if storage.is_uri(output) else Path(output).resolve()
    if local_output is not None:
        check_same_run(job, local_output)
    configure_ray_data()

    docs = documents(job.data)
    tokenizer = prepare_tokenizer(job, docs, local_output)
    train_ds = packed_blocks(docs, tokenizer, job.data, "train")
    val_ds = packed_blocks(docs, tokenizer, job.data, "val").limit(job.data.val_blocks).materialize()
    first = train_ds.take(1)
    if not first:
        raise SpecError(
            [
                (
                    "data",
                    f"the corpus holds fewer than data.seq_len={job.data.seq_len} tokens after "
                    "tokenization: add text or lower data.seq_len",
                )
            ]
        )
    if job.data.val_fraction > 0 and val_ds.count() == 0:
        raise SpecError(
            [("data.val_fraction", "no block landed in the validation split: raise val_fraction or add text")]
        )
    total_steps = planned_steps(job, train_ds)
    strategy, why = resolve_strategy(job, local_output)
    workers = job.resources.num_workers
    print(
        f"[raylm] pretrain {job.run_name}: {workers if isinstance(workers, int) else list(workers)} "
        f"worker(s), strategy {strategy['name']} ({why}), {total_steps} steps, vocab {len(tokenizer)}, "
        f"output {output}",
        flush=True,
    )

    resources = {"CPU": job.resources.cpus_per_worker}
    if job.resources.use_gpu:
        resources["GPU"] = job.resources.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "spec": job.model_dump(mode="json"),
            "tokenizer": tokenizer,
            "total_steps": total_steps,
            "strategy": strategy,
            "shuffle_buffer": job.data.shuffle_buffer,
            "stage_dir": str(local_output) if local_output else None,
            "publish_to": output if storage.is_uri(output) else None,
            "sample_prompt": first[0]["input_ids"][:SAMPLE_PROMPT_TOKENS].tolist(),
        },
        scaling_config=ScalingConfig(
            num_workers=workers if isinstance(workers, int) else tuple(workers),
            use_gpu=job.resources.use_gpu,
            resources_per_worker=resources,
            placement_strategy=job.resources.placement.upper(),
        ),
        run_config=RunConfig(
            name="checkpoints",
            storage_path=str(local_output) if local_output else output,
            failure_config=FailureConfig(max_failures=job.failure.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.train.keep_checkpoints),
        ),
        datasets={"train": train_ds, "val": val_ds},
    )
    result = trainer.fit()
    outcome = result.return_value or {}
    summary = {
        "kind": job.kind,
        "run": job.run_name,
        "steps": total_steps,
        "metrics": outcome.get("metrics") or (result.metrics or {}),
        "model": f"{output.rstrip('/')}/model",
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "sample": outcome.get("sample", {}),
        "worker_nodes": outcome.get("worker_nodes", []),
        "resumed_from": outcome.get("resumed_from", 0),
        "strategy": {**outcome.get("strategy", strategy), "why": why},
    }
    storage.write_text(output, "summary.json", json.dumps(summary, indent=2))
    return summary


def planned_steps(job: PretrainJob, train_ds) -> int:
    if job.train.max_steps is not None:
        return job.train.max_steps
    per_worker = train_ds.count() // job.resources.max_workers
    batches = per_worker // job.train.batch_size
    if batches == 0:
        raise SpecError(
            [
                (
                    "train.batch_size",
                    f"each worker gets {per_worker} blocks, fewer than one batch: lower batch_size or add data",
                )
            ]
        )
    return max(1, math.ceil(job.train.epochs * batches / job.train.grad_accum))


def resolve_strategy(job: PretrainJob, local_output: Path | None) -> tuple[dict, str]:
    """The run's concrete strategy. A resumed run keeps the one its checkpoints were written with,
    even when `auto` would now choose another (other GPUs, another worker count)."""
    from raylm.plan import NothingFits, resolve

    record = local_output / "strategy.json" if local_output else None
    if record is not None and record.exists():
        saved = json.loads(record.read_text())
        return saved["strategy"], f"kept from the run's first attempt: {saved['why']}"
    try:
        strategy, why = resolve(job)
    except NothingFits as err:
        raise SpecError([("strategy", str(err))]) from None
    if record is not None:
        record.write_text(json.dumps({"strategy": strategy, "why": why}, indent=2))
    return strategy, why


def prepare_tokenizer(job: PretrainJob, docs, local_output: Path | None):
    """The run's tokenizer: the one saved by an earlier attempt of this run, a given one, or a new one."""
    from raylm.data import corpus_sample
    from raylm.tokenizer import load_tokenizer, train_tokenizer

    saved = local_output / "tokenizer" if local_output else None
    if saved is not None and (saved / "tokenizer_config.json").exists():
        return load_tokenizer(str(saved))
    source = job.tokenizer.path or (job.model.path if job.tokenizer.train is None else None)
    if source is not None:
        tokenizer = load_tokenizer(source, job.model.revision, job.model.trust_remote_code)
    else:
        how = job.tokenizer.train or TokenizerTraining()
        print(f"[raylm] training a {how.type} tokenizer on the corpus", flush=True)
        tokenizer = train_tokenizer(
            corpus_sample(docs, how.max_chars), how.type, how.vocab_size, how.min_frequency
        )
    if saved is not None:
        saved.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(saved)
    return tokenizer


def check_same_run(job: PretrainJob, run_dir: Path) -> None:
    """Refuse to resume a run folder written by a different spec; record the spec for new runs."""
    record = run_dir / "spec.yaml"
    current = job.model_dump(mode="json")
    if record.exists():
        earlier = yaml.safe_load(record.read_text())
        resumable = RESUMABLE_CHANGES | ({("resources", "num_workers")} if job.resources.elastic else set())
        changed = [p for p in _diff(earlier, current) if not any(p[: len(a)] == a for a in resumable)]
        if changed:
            fields = ", ".join(".".join(p) for p in changed)
            raise SpecError(
                [
                    (
                        "output",
                        f"{run_dir} holds a run of a different spec (changed: {fields}); "
                        "use a new output folder, or remove the old run to start over",
                    )
                ]
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(yaml.safe_dump(current, sort_keys=False))


def _diff(a, b, prefix=()) -> list[tuple]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for k in sorted(set(a) | set(b)) for p in _diff(a.get(k), b.get(k), (*prefix, k))]
    return [] if a == b else [prefix]
