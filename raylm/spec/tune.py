"""`kind: tune`: a search over a fine-tuning spec's method and hyperparameters (raylm/tune/)."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from raylm.spec.jobs import FinetuneJob
from raylm.spec.sections import FailureSpec, OutputSpec, Section, path_shorthand

METRICS = {  # what a trial reports at each evaluation, and which way is better
    "val_loss": "min",
    "val_ppl": "min",
    "val_accuracy": "max",
    "exact_match": "max",
    "reward_accuracy": "max",
    "reward_margin": "max",
}


class SchedulerSpec(Section):
    """Early stopping of trials that trail the others (Ray Tune's schedulers)."""

    name: Literal["asha", "median", "none"] = Field(
        "asha",
        description="asha (asynchronous successive halving), median (stop below the running median) or none.",
    )
    grace_period: int = Field(
        1,
        ge=1,
        description="Evaluations (every train.eval_every steps) a trial runs before it can be stopped.",
    )
    reduction_factor: float = Field(
        3, gt=1, description="asha: at each rung only the best 1/reduction_factor of trials go on."
    )


class TrialFailureSpec(FailureSpec):
    """How often a failed trial is started again (its run resumes from its last checkpoint)."""

    max_failures: int = Field(0, ge=-1, description="Retries of a failed trial (-1: unlimited).")


class TuneJob(Section):
    """A Ray Tune search: each trial is a full fine-tuning run of `base` with sampled fields."""

    kind: Literal["tune"]
    name: str | None = Field(None, description="Search name; default: the output folder's name.")
    base: FinetuneJob = Field(
        description="The fine-tuning spec every trial starts from: inline, or the path of a finetune YAML."
    )
    search: dict[str, Any] = Field(
        description="Dotted field paths of the base -> distributions ({choice: [...]}, {grid: [...]}, "
        "{uniform: [lo, hi]}, {loguniform: [lo, hi]}, {randint: [lo, hi]}, {qrandint: [lo, hi, q]}); "
        "`method` takes {choice: [...]} or {grid: [...]} of method blocks whose own fields may be searched."
    )
    metric: Literal[
        "val_loss", "val_ppl", "val_accuracy", "exact_match", "reward_accuracy", "reward_margin"
    ] = Field(
        "val_loss",
        description="What trials are compared on, at every evaluation: val_loss, val_ppl, val_accuracy "
        "(choices data), exact_match (also written eval.exact_match), reward_accuracy or reward_margin "
        "(preference data: the held-out pairs the policy ranks right, the mean reward gap).",
    )
    mode: Literal["min", "max"] | None = Field(
        None, description="Better is min or max; default: the metric's."
    )
    num_samples: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Trials to sample; with grid values, passes over the grid (each pass samples the "
        "other distributions anew). Default: one pass over a grid, else 8 trials.",
    )
    max_concurrent_trials: int | None = Field(
        None,
        ge=1,
        description="At most this many trials at once; default and ceiling: what the cluster holds.",
    )
    algorithm: Literal["random", "grid", "optuna"] = Field(
        "random", description="random (grid values enumerated, others sampled), grid, or optuna (TPE)."
    )
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    failure: TrialFailureSpec = Field(default_factory=TrialFailureSpec)
    seed: int = Field(0, description="Seed of the sampler (random and optuna).")
    output: OutputSpec

    _output_shorthand = field_validator("output", mode="before")(lambda cls, v: path_shorthand(v))

    @model_validator(mode="before")
    @classmethod
    def _load_base(cls, data: Any) -> Any:
        """`base: path.yaml` reads the file; a base without an output gets one (trials set their own)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("metric") == "eval.exact_match":
            data["metric"] = "exact_match"
        base = data.get("base")
        if isinstance(base, str):
            from raylm.spec.reading import SpecError, read_yaml

            try:
                base = read_yaml(base)
            except SpecError as err:
                raise ValueError(f"base: {err.problems[0][1]} ({base})") from None
        if isinstance(base, dict):
            if base.get("kind", "finetune") != "finetune":
                raise ValueError(
                    f"base: a search runs fine-tuning jobs; this base is kind {base.get('kind')!r}"
                )
            output = data.get("output")
            folder = output.get("path") if isinstance(output, dict) else output
            base = {"kind": "finetune", **base}
            if "output" not in base and isinstance(folder, str):
                base["output"] = f"{folder.rstrip('/')}/trials"
        data["base"] = base
        return data

    @model_validator(mode="after")
    def _space_runs(self) -> TuneJob:
        from raylm.spec.space import SpaceError, corner_overrides, parse

        try:
            space = parse(self.search, self.algorithm)
        except SpaceError as err:
            raise ValueError(str(err)) from None
        if self.metric == "exact_match" and self.base.eval.exact_match_examples == 0:
            raise ValueError("metric exact_match: the base sets eval.exact_match_examples: 0; raise it")
        if self.metric == "val_accuracy" and self.base.data.format != "choices":
            raise ValueError("metric val_accuracy scores choices data: use val_loss or exact_match")
        preference = self.base.data.preference
        if self.metric.startswith("reward_") and not preference:
            raise ValueError(f"metric {self.metric} scores preference data (data.format: preference or kto)")
        if self.metric == "val_ppl" and preference:
            raise ValueError(
                "metric val_ppl: a preference objective's loss is no perplexity; use reward_accuracy"
            )
        searched = any(str(k).startswith("preference") for k in self.search)
        if self.metric in ("val_loss", "reward_margin") and preference and searched:
            raise ValueError(
                f"metric {self.metric}: the search changes the preference objective or its scale (beta), "
                "whose losses and reward scales do not compare; use reward_accuracy or exact_match"
            )
        if self.metric.startswith("reward_") or self.metric in ("val_loss", "val_ppl"):
            if self.base.data.val_fraction == 0:
                raise ValueError(
                    f"metric {self.metric}: the base has data.val_fraction 0; give it a validation split"
                )
        base = trial_base(self)
        for where, overrides in corner_overrides(space):
            try:
                FinetuneJob.model_validate(trial_spec(base, overrides))
            except SpaceError as err:
                raise ValueError(str(err)) from None
            except ValidationError as err:
                first = err.errors()[0]
                at = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-"))
                where = next((p for p in self.search if at == p or at.startswith(p + ".")), where)
                raise ValueError(
                    f"search.{where}: a trial would be invalid: {at or 'spec'}: "
                    f"{first['msg'].removeprefix('Value error, ')}"
                ) from None
        return self

    @property
    def run_name(self) -> str:
        return self.name or PurePosixPath(self.output.path.rstrip("/")).name or "raylm-search"

    @property
    def resources(self):
        """One trial's workers (the local Ray started for a search is sized by them)."""
        return self.base.resources

    @property
    def samples(self) -> int:
        from raylm.spec.space import has_grid, parse

        if self.num_samples is not None:
            return self.num_samples
        return 1 if has_grid(parse(self.search, self.algorithm)) else 8

    @property
    def better(self) -> str:
        return self.mode or METRICS[self.metric]


def trial_base(job: TuneJob) -> dict:
    """The base as every trial starts from it: without output.merge (only the best run merges)."""
    base = job.base.model_dump(mode="json", exclude_none=True)
    base["output"]["merge"] = False
    return base


def trial_spec(base: dict, overrides: dict) -> dict:
    """The finetune spec (a dict) of one trial: `base` with the trial's dotted-path values."""
    import copy

    from raylm.spec.reading import NotASection, set_dotted
    from raylm.spec.space import SpaceError

    trial = copy.deepcopy(base)
    for path, value in overrides.items():
        try:
            set_dotted(trial, path.split("."), value)
        except NotASection as err:
            raise SpaceError(f"search.{path}", str(err)) from None
    return trial
