"""The registry of job kinds: each kind is its spec model and a driver object with declared hooks.

The CLI (`validate`, `schema`, `run`), `raylm.submit` (local runs and the Jobs API) and the training
loop all find a kind here; the loop receives the driver object itself.

Adding a kind: its spec model (raylm/spec/) and its line in `raylm.spec.loading.JOB_SPECS`, its driver
module (a class implementing `JobKind`, or `TrainingKind` for a kind that trains on the shared loop), one
line in KINDS below, and its tests.
Driver modules load lazily: the registry itself imports only the spec models.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol, Union

from pydantic import BaseModel, Field, TypeAdapter

from raylm.spec.loading import JOB_SPECS
from raylm.spec.reading import Problems


class JobKind(Protocol):
    """What the driver side of every kind does."""

    def preflight(self, job) -> Problems:
        """Problems that need the filesystem or the model (paths, files, modules), found before any
        Ray worker starts; `raylm validate` reports them too."""

    def run(self, job) -> dict:
        """Run the job on the Ray this process is connected to; returns the summary (also written as
        summary.json in the output)."""


class TrainingKind(JobKind, Protocol):
    """A kind that trains on raylm.train.loop: the loop calls these hooks on every worker."""

    def worker_model(self, job, tokenizer, device, rank: int, config: dict) -> tuple[Any, dict]:
        """The model that trains (unwrapped) and facts for the summary measured before training."""

    def worker_optimizer(self, job) -> Callable | None:
        """`make(model, train_spec) -> optimizer`, or None for AdamW."""

    def worker_objective(self, job, tokenizer, device, engine, config: dict) -> Callable | None:
        """`objective(model, batch, items) -> loss` for training steps, or None for the causal-LM loss
        (T-Few's for multiple-choice data); evaluation reports the causal-LM loss, or an objective's
        own with its `evaluate(model, batch)` (preference data). `engine`: the wrapped model."""

    def worker_rebuild(self, job, tokenizer) -> Callable | None:
        """`rebuild() -> model` of the trained structure on the CPU (for gathering shards into), or
        None for a model built from the config."""

    def worker_export(self, final, tokenizer, stage: Path, config: dict, job) -> dict:
        """On rank 0: write the run's artifacts from the consolidated model; facts for the summary."""


@dataclass(frozen=True)
class Kind:
    spec: type[BaseModel]
    driver: str  # "module:Class", imported on first use

    def load(self) -> JobKind:
        module, cls = self.driver.split(":")
        return getattr(importlib.import_module(module), cls)()


KINDS: dict[str, Kind] = {
    "pretrain": Kind(JOB_SPECS["pretrain"], "raylm.train.pretrain:Pretrain"),
    "finetune": Kind(JOB_SPECS["finetune"], "raylm.train.finetune:Finetune"),
    "tune": Kind(JOB_SPECS["tune"], "raylm.tune.driver:Tune"),
    "distill": Kind(JOB_SPECS["distill"], "raylm.train.distill:Distill"),
    "quantize": Kind(JOB_SPECS["quantize"], "raylm.compress.quantize:Quantize"),
    "prune": Kind(JOB_SPECS["prune"], "raylm.compress.prune:Prune"),
    "serve": Kind(JOB_SPECS["serve"], "raylm.serve.driver:Serve"),
    "evaluate": Kind(JOB_SPECS["evaluate"], "raylm.evaluate.driver:Evaluate"),
    "pipeline": Kind(JOB_SPECS["pipeline"], "raylm.pipeline.driver:Pipeline"),
}


def driver(job) -> JobKind:
    return KINDS[job.kind].load()


def json_schema(kind: str | None = None) -> dict:
    """JSON Schema of one kind, or of the union of all kinds (discriminated by `kind`)."""
    if kind is not None:
        return KINDS[kind].spec.model_json_schema()
    models = tuple(k.spec for k in KINDS.values())
    return TypeAdapter(Annotated[Union[models], Field(discriminator="kind")]).json_schema()  # noqa: UP007


def preflight(job) -> Problems:
    """Every problem the job's kind finds before a worker starts (paths, files, model modules). Model,
    tokenizer and teacher folders named by a storage URI are fetched into this node's cache first."""
    from raylm.runtime.storage import RunFolderError, localize_inputs

    try:
        return localize_inputs(job) or driver(job).preflight(job)
    except RunFolderError as err:  # a serve / evaluate input naming a run folder that leads nowhere
        return [("model.path", str(err))]
