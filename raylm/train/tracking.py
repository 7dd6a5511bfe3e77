"""Experiment tracking beside metrics.jsonl and TensorBoard: MLflow and Weights & Biases.

    logging: {mlflow: {tracking_uri: http://mlflow:5000, experiment: llama-sft}, wandb: {project: sft}}

One tracking run per raylm run. The driver opens it (MLflow: the resolved spec as parameters) and
records its id in `<output>/tracking.json`, so a resumed run continues the same tracking run; rank 0
logs every metric row as training goes; the driver closes it with summary.json and the artifact's
path (status FAILED when training failed). A tracking backend that errors mid-run costs a warning,
never the training run.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path

RECORD = "tracking.json"


def flat(spec: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.001}} -> {"train.lr": "0.001"}: the resolved spec as tracking parameters."""
    out: dict[str, str] = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def numeric(row: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


# ---- driver ----------------------------------------------------------------------------------------


def open_runs(job, output: str) -> dict:
    """Start (or, for a resumed run, reopen) the job's tracking runs; returns their ids for the workers.
    `output`: the run's folder or storage URI, where `tracking.json` records the ids."""
    from raylm.runtime import storage

    if job.logging.mlflow is None and job.logging.wandb is None:
        return {}
    saved = json.loads(storage.read_text(output, RECORD) or "{}")
    ids: dict = {}
    if job.logging.mlflow is not None:
        try:
            ids["mlflow"] = _open_mlflow(job, output, saved.get("mlflow"))
        except Exception as err:  # unreachable server, refused credentials, a bad URI ...
            from raylm.spec.reading import SpecError

            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SpecError([("logging.mlflow", f"cannot open an MLflow run: {first}")]) from None
    if job.logging.wandb is not None:
        ids["wandb"] = {"id": (saved.get("wandb") or {}).get("id") or uuid.uuid4().hex[:12], "output": output}
    recorded = dict(ids)  # what the run's folder keeps: the tracking URI without its credentials
    if "mlflow" in recorded:
        recorded["mlflow"] = {
            **recorded["mlflow"],
            "tracking_uri": redacted(recorded["mlflow"]["tracking_uri"]),
        }
    storage.write_text(output, RECORD, json.dumps(recorded, indent=2))
    return ids


def recordable(spec: dict) -> dict:
    """A dumped spec as a run's records keep it (spec.yaml, tracking parameters): the MLflow tracking
    URI without its credentials."""
    if isinstance(spec.get("base"), dict):  # a search: its base spec's logging
        spec = {**spec, "base": recordable(spec["base"])}
    mlflow = (spec.get("logging") or {}).get("mlflow") or {}
    if mlflow.get("tracking_uri"):
        spec = {
            **spec,
            "logging": {
                **spec["logging"],
                "mlflow": {**mlflow, "tracking_uri": redacted(mlflow["tracking_uri"])},
            },
        }
    return spec


def redacted(uri: str) -> str:
    """`uri` without the user and password a database or server URI may carry (scheme://user:pw@host):
    what a run's files keep of it."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def wandb_dir(output: str) -> str:
    """W&B's own files (the offline run, or the online run's local copy): the run folder, or for a
    run in object storage a folder of raylm's cache on the node that logs (keyed by the output)."""
    import hashlib

    from raylm.runtime import storage

    if not storage.is_uri(output):
        return str(Path(output).expanduser().resolve())
    key = hashlib.sha256(output.rstrip("/").encode()).hexdigest()[:16]
    return str(storage.cache_root() / "wandb" / key)


def mlflow_uri(configured: str | None, output: str) -> str:
    """The spec's tracking URI, else $MLFLOW_TRACKING_URI, else MLflow's recommended local backend: a
    SQLite database in the run's folder (<output>/mlflow.db; preflight refuses this default for a run
    in object storage). A local path in the spec names a SQLite database when it ends in .db, else a
    folder store (which MLflow 3 keeps in maintenance mode)."""
    from raylm.runtime.storage import is_uri

    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        if is_uri(output):  # preflight says so first; this guards callers that skip it
            raise ValueError(f"no MLflow tracking_uri for a run in object storage ({output})")
        return f"sqlite:///{Path(output).expanduser().resolve() / 'mlflow.db'}"
    if "://" not in uri and uri != "databricks":
        path = Path(uri).expanduser().resolve()
        return f"sqlite:///{path}" if path.suffix == ".db" else path.as_uri()
    return uri


def _mlflow_client(uri: str):
    if uri.startswith("file:"):
        # MLflow 3 keeps the folder store only on request; a local `mlruns` folder is what is asked for.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import logging

    from mlflow import MlflowClient

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # its table-creation lines
    return MlflowClient(tracking_uri=uri)


def _artifact_location(uri: str) -> str | None:
    """Beside a SQLite database, its runs' artifacts (MLflow would put them under the current folder)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def _open_mlflow(job, output: str, saved: dict | None) -> dict:
    from mlflow.entities import Param

    uri = mlflow_uri(job.logging.mlflow.tracking_uri, output)
    client = _mlflow_client(uri)
    if saved and saved.get("tracking_uri") == redacted(uri):
        client.update_run(saved["run_id"], status="RUNNING")
        return saved
    name = job.logging.mlflow.experiment
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = client.create_experiment(name, artifact_location=_artifact_location(uri))
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=job.run_name, tags={"raylm.kind": job.kind})
    if not uri.startswith(("http://", "https://", "databricks")):
        print(
            f"[raylm] MLflow run {run.info.run_id}; to see it: mlflow ui --backend-store-uri {uri}",
            flush=True,
        )
    params = [Param(k, v[:500]) for k, v in flat(recordable(job.model_dump(mode="json"))).items()]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    return {"tracking_uri": uri, "run_id": run.info.run_id}


def finish_runs(ids: dict, job, summary: dict | None, summary_file: Path | None) -> None:
    """Close the tracking runs: summary.json and the artifact path on success, FAILED otherwise. A
    tracking backend that fails here costs a warning: the run's own files are written already."""
    artifact = (summary or {}).get("artifact") or (summary or {}).get("model")
    if "mlflow" in ids:
        try:
            client = _mlflow_client(ids["mlflow"]["tracking_uri"])
            run_id = ids["mlflow"]["run_id"]
            if summary is not None:
                if summary_file is not None:
                    client.log_artifact(run_id, str(summary_file))
                if artifact:
                    client.set_tag(run_id, "raylm.artifact", artifact)
            client.set_terminated(run_id, status="FINISHED" if summary is not None else "FAILED")
        except Exception as err:
            print(f"[raylm] warning: could not close the MLflow run: {err}", flush=True)
    if "wandb" in ids:
        import wandb

        try:
            run = _wandb_run(ids["wandb"], job)
            if summary is not None:
                run.summary.update({"artifact": artifact, "steps": summary.get("steps")})
                run.summary.update(numeric(summary.get("metrics") or {}))
                if summary_file is not None:
                    run.save(str(summary_file), base_path=str(summary_file.parent), policy="now")
            run.finish(exit_code=0 if summary is not None else 1)
        except Exception as err:
            print(f"[raylm] warning: could not close the W&B run: {err}", flush=True)
        finally:
            # W&B leaves its service running with its address in WANDB_SERVICE, which processes started
            # from here later would inherit and share (a killed one leaving its run "in use" there)
            wandb.teardown()


def _wandb_run(ids: dict, job, config: dict | None = None):
    import wandb

    settings = job.logging.wandb
    folder = Path(wandb_dir(ids["output"]))  # on the node that logs (a bucket run: its own cache)
    folder.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=settings.project,
        entity=settings.entity,
        mode=settings.mode,
        id=ids["id"],
        resume="allow",
        name=job.run_name,
        dir=str(folder),
        config=config,
        settings=wandb.Settings(silent=True, console="off"),
    )


# ---- rank 0 ------------------------------------------------------------------------------------------


class MLflowSink:
    def __init__(self, ids: dict):
        self.client = _mlflow_client(ids["tracking_uri"])
        self.run_id = ids["run_id"]

    def log(self, row: dict) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(k, v, stamp, row["step"]) for k, v in numeric(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        pass


class WandbSink:
    def __init__(self, ids: dict, job):
        self.run = _wandb_run(ids, job, config=flat(recordable(job.model_dump(mode="json"))))

    def log(self, row: dict) -> None:
        self.run.log(numeric(row), step=row["step"])

    def close(self) -> None:
        self.run.finish()


def metric_sinks(ids: dict, job) -> list:
    """The tracking runs rank 0 logs metric rows to."""
    sinks: list = []
    if "mlflow" in ids:
        sinks.append(MLflowSink(ids["mlflow"]))
    if "wandb" in ids:
        sinks.append(WandbSink(ids["wandb"], job))
    return sinks
