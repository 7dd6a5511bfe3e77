"""Job kinds. `kind` selects the model of a discriminated union: the one definition of a spec."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Literal, Union

from pydantic import Field, TypeAdapter, field_validator, model_validator

from raylm.spec.sections import (
    DataSpec,
    FailureSpec,
    ModelSpec,
    OutputSpec,
    ResourcesSpec,
    Section,
    TokenizerSpec,
    TrainSpec,
)
from raylm.spec.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    StrategySpec,
    strategy_shorthand,
)


class PretrainJob(Section):
    """Causal-LM pretraining on Ray Train (TorchTrainer), data streamed by Ray Data."""

    kind: Literal["pretrain"]
    name: str | None = Field(
        None, description="Run name (Ray Train run and job id prefix); default: the output folder's name."
    )
    model: ModelSpec
    tokenizer: TokenizerSpec = Field(
        default_factory=TokenizerSpec, description="Tokenizer source or training."
    )
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    strategy: StrategySpec = Field(
        default_factory=lambda: DDPStrategy(name="ddp"),
        description="Distributed strategy: ddp, fsdp, deepspeed (ZeRO 1-3) or auto (from the memory estimate).",
    )
    output: OutputSpec
    failure: FailureSpec = Field(default_factory=FailureSpec)

    @field_validator("output", mode="before")
    @classmethod
    def _output_shorthand(cls, value):
        return {"path": value} if isinstance(value, str) else value

    _strategy_shorthand = field_validator("strategy", mode="before")(strategy_shorthand)

    @model_validator(mode="after")
    def _consistent(self) -> PretrainJob:
        arch = self.model.architecture
        if arch is not None and arch.context < self.data.seq_len:
            raise ValueError(
                f"model.architecture.context ({arch.context}) is shorter than data.seq_len ({self.data.seq_len}): raise the context or lower seq_len"
            )
        if self.train.precision == "fp16" and not self.resources.use_gpu:
            raise ValueError("train.precision fp16 needs resources.use_gpu: true; on CPU use bf16 or fp32")
        check_strategy(self.strategy, self.train, self.resources)
        return self

    @property
    def run_name(self) -> str:
        return self.name or PurePosixPath(self.output.path.rstrip("/")).name or "raylm-run"


def check_strategy(strategy, train: TrainSpec, resources: ResourcesSpec) -> None:
    """Combinations the strategies cannot run, refused before any worker starts."""
    if isinstance(strategy, FSDPStrategy) and train.precision == "fp16":
        raise ValueError(
            "strategy fsdp runs fp32 or bf16 (fp16 needs loss scaling, which raylm does under ddp and "
            "deepspeed): set train.precision: bf16"
        )
    if resources.elastic and isinstance(strategy, DeepSpeedStrategy):
        raise ValueError(
            "elastic resources.num_workers [min, max] needs strategy ddp or fsdp: DeepSpeed's ZeRO "
            "checkpoints cannot be reloaded by a different number of workers"
        )


KINDS: dict[str, type[Section]] = {"pretrain": PretrainJob}


def json_schema(kind: str | None = None) -> dict:
    """JSON Schema of one kind, or of the union of all kinds (discriminated by `kind`)."""
    if kind is not None:
        return KINDS[kind].model_json_schema()
    models = tuple(KINDS.values())
    if len(models) == 1:
        return models[0].model_json_schema()
    return TypeAdapter(Annotated[Union[models], Field(discriminator="kind")]).json_schema()  # noqa: UP007
