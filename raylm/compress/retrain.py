"""Training a pruned model with its zeros held (`recover:` of a prune job, and each round of the
iterative method): a raylm pretraining run over the job's text that starts from the pruned folder with
`train.keep_sparsity`, in the job's work folder, so that a rerun resumes it from its checkpoints.

    model, summary = retrain(job, Path("runs/x.work/pruned"), Path("runs/x.work/recover"), job.recover, "recover")
"""

from __future__ import annotations

from pathlib import Path

import yaml

from raylm.compress.inputs import text_data
from raylm.spec.reading import SpecError


def work_folder(job) -> Path:
    """Where a prune job's intermediate models and training runs live: `<output>.work/` beside it."""
    output = Path(job.output.path)
    return output.parent / f"{output.name}.work"


def recorded_train(job) -> dict | None:
    """The train section of the pretraining run the model folder belongs to, if it is one."""
    recorded = Path(job.model.path).expanduser().parent / "spec.yaml"
    if not recorded.exists():
        return None
    spec = yaml.safe_load(recorded.read_text()) or {}
    return spec.get("train") if spec.get("kind") == "pretrain" else None


def problems(job, retraining, where: str) -> list[tuple[str, str]]:
    if retraining.train is None and recorded_train(job) is None:
        return [
            (
                f"{where}.train",
                "give the retraining's train section (max_steps, lr, ...): only a model inside a raylm "
                "pretraining run can default to its run's own",
            )
        ]
    return []


def pretrain_spec(job, start: Path, run: Path, retraining, label: str) -> dict:
    """The pretraining job that retrains `start` into `run` (a dict, validated by the caller)."""
    data, _ = text_data(job)
    train = retraining.train.model_dump(mode="json") if retraining.train else dict(recorded_train(job))
    return {
        "kind": "pretrain",
        "name": f"{job.run_name}-{label}",
        "model": {"path": str(start.resolve())},
        "data": data.model_dump(mode="json"),
        "train": {**train, "keep_sparsity": True},
        "resources": retraining.resources.model_dump(mode="json"),
        "strategy": retraining.strategy.model_dump(mode="json"),
        "output": str(run.resolve()),
    }


def retrain(job, start: Path, run: Path, retraining, label: str) -> tuple[Path, dict]:
    """Train `start` into the run folder `run` (resumed if it was started), named `<job>-<label>`;
    (its model, its summary)."""
    import json

    from raylm.spec.loading import validate_dict
    from raylm.train.pretrain import Pretrain

    if (run / "summary.json").exists() and (run / "model" / "config.json").exists():
        print(f"[raylm] {run} already trained; reusing it", flush=True)
        return run / "model", json.loads((run / "summary.json").read_text())
    pretrain = validate_dict(pretrain_spec(job, start, run, retraining, label))
    kind = Pretrain()
    found = kind.preflight(pretrain)
    if found:
        raise SpecError(found, source="preflight")
    return run / "model", kind.run(pretrain)
