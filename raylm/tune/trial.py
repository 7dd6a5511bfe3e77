"""One trial of a search, in its Tune trial process: the base fine-tuning spec with the trial's values,
checked against the memory estimate, then a full raylm fine-tuning run (its own TorchTrainer, any
strategy and worker count) whose evaluations reach Tune as the workers report them.

The trial's run folder (or URI) is `<search output>/trials/<trial id>`: a retried or resumed trial continues
its run from the last checkpoint there (Ray Train resumes a run whose storage path and name are
unchanged), and a trial whose run finished is not trained again.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ray.tune.integration.ray_train import TuneReportCallback

from raylm.train.metrics import read_metrics


class EvaluationReport(TuneReportCallback):
    """Forwards to Tune the reports that hold the searched metric (rank 0's, already reduced across
    workers): one Tune result per evaluation, so schedulers compare trials at the same steps. The last
    step's evaluation is reported by the trial once its run has written its artifact: a scheduler
    that stops a trial then cannot cut the export short."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        final = metrics[0].get("step", 0) >= run_context.train_loop_config["total_steps"]
        if self.metric in metrics[0] and not final:
            super().after_report(run_context, metrics, checkpoint)


def run_trial(config: dict, search: dict) -> None:
    """The Tune function trainable. `search`: the base spec (dict), the space, the metric, the search's
    output folder, the driver's working folder and each worker's memory for the estimate check."""
    import ray.tune

    from raylm.methods.hf_peft import silence_peft
    from raylm.planning.plan import unfit_reason
    from raylm.runtime import storage
    from raylm.spec.loading import validate_dict
    from raylm.spec.reading import SpecError
    from raylm.spec.tune import trial_spec
    from raylm.train.finetune import Finetune, run_finetune

    silence_peft()
    if Path(search["cwd"]).is_dir():  # relative paths in the spec mean the driver's folder
        os.chdir(search["cwd"])
    context = ray.tune.get_context()
    trial_id = context.get_trial_id()
    folder = f"{search['output']}/trials/{trial_id}"  # a folder or a URI
    overrides = search["space"].overrides(config)
    spec = trial_spec(search["base"], overrides)
    spec["output"]["path"] = folder
    spec["name"] = f"{search['name']}-{trial_id}"
    job = validate_dict(spec, source=f"trial {trial_id}")

    if storage.exists(folder, "rejected.json"):
        return  # rejected when the search first reached it
    if not storage.exists(folder, "summary.json"):  # else it finished before the search was interrupted
        problems = storage.localize_inputs(job)  # this node's copies of inputs in object storage
        if problems:
            raise SpecError(problems)
        record = json.loads(storage.read_text(folder, "trial.json") or '{"attempts": 0}')
        record.update(
            trial_id=trial_id,
            tune_dir=context.get_trial_dir(),
            overrides=overrides,
            attempts=record["attempts"] + 1,
            started=record.get("started", time.time()),
        )
        storage.write_text(folder, "trial.json", json.dumps(record, indent=2, default=str))
        own = getattr(job.strategy, "memory_per_worker_gb", None)  # auto's figure, when given
        memory = own * 1024**3 if own is not None else search["worker_memory"]
        reason = unfit_reason(job, memory)
        if reason:
            storage.write_text(folder, "rejected.json", json.dumps({"reason": reason}, indent=2))
            print(f"[raylm] trial {trial_id} rejected before it started: {reason}", flush=True)
            return
        values = ", ".join(f"{k}={v}" for k, v in _flat(overrides).items())
        print(f"[raylm] trial {trial_id} started (attempt {record['attempts']}): {values}", flush=True)
        run_finetune(Finetune(), job, callbacks=(EvaluationReport(search["metric"]),))
    last = last_evaluation(folder, search["metric"])
    if last:
        metric = search["metric"]
        print(
            f"[raylm] trial {trial_id} completed: {metric} {last[metric]:.4g} at step {last['step']}",
            flush=True,
        )
        ray.tune.report(last)


def last_evaluation(folder: str, metric: str) -> dict | None:
    """The run's last logged row that holds `metric` (with its step)."""
    rows = [r for r in read_metrics(folder) if metric in r]
    return rows[-1] if rows else None


def _flat(overrides: dict) -> dict:
    """`method` spelled out as method.name, method.r, ... for a one-line description."""
    out = {k: v for k, v in overrides.items() if k != "method"}
    for name, value in (overrides.get("method") or {}).items():
        out[f"method.{name}"] = value
    return out
