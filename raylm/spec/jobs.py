"""Job kinds. `kind` selects the model of a discriminated union: the one definition of a spec."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Literal, Union

from pydantic import Field, TypeAdapter, field_validator, model_validator

from raylm.spec.methods import MERGEABLE, PROMPT_LEARNING, FreezeMethod, MethodSpec
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
from raylm.spec.sft import EvalSpec, FinetuneOutput, SFTDataSpec
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


class FinetuneJob(Section):
    """Supervised fine-tuning of a model folder with one method (full, freeze, adapter, LoRA, QLoRA,
    IA3, P-Tuning, prefix or prompt tuning) on Ray Train."""

    kind: Literal["finetune"]
    name: str | None = Field(
        None, description="Run name (Ray Train run and job id prefix); default: the output folder's name."
    )
    model: ModelSpec
    tokenizer: TokenizerSpec = Field(
        default_factory=TokenizerSpec, description="Tokenizer; default the model folder's."
    )
    method: MethodSpec = Field(
        description="What trains: full, freeze, adapter, lora, qlora, ia3, ptuning, prefix, prompt."
    )
    data: SFTDataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    strategy: StrategySpec = Field(
        default_factory=lambda: DDPStrategy(name="ddp"),
        description="Distributed strategy: ddp, fsdp, deepspeed (ZeRO 1-3) or auto (from the memory estimate).",
    )
    output: FinetuneOutput
    failure: FailureSpec = Field(default_factory=FailureSpec)

    _output_shorthand = field_validator("output", mode="before")(
        lambda cls, v: {"path": v} if isinstance(v, str) else v
    )
    _strategy_shorthand = field_validator("strategy", mode="before")(strategy_shorthand)
    _method_shorthand = field_validator("method", mode="before")(
        lambda cls, v: {"name": v} if isinstance(v, str) else v
    )

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneJob:
        if self.train.precision == "fp16" and not self.resources.use_gpu:
            raise ValueError("train.precision fp16 needs resources.use_gpu: true; on CPU use bf16 or fp32")
        check_strategy(self.strategy, self.train, self.resources)
        check_method_strategy(self.method, self.strategy)
        if self.output.merge and self.method.name not in MERGEABLE:
            raise ValueError(
                f"output.merge: method {self.method.name} cannot be merged into the base "
                f"(mergeable: {', '.join(MERGEABLE)}); its output folder is already complete or loads onto the base"
            )
        if (
            isinstance(self.method, FreezeMethod)
            and self.method.new_head
            and self.model.architecture is not None
        ):
            if self.model.architecture.tie_embeddings:
                raise ValueError(
                    "method.new_head needs untied embeddings (model.architecture.tie_embeddings: false)"
                )
        return self

    @property
    def run_name(self) -> str:
        return self.name or PurePosixPath(self.output.path.rstrip("/")).name or "raylm-run"


def check_method_strategy(method, strategy) -> None:
    """Methods that a sharding strategy cannot run."""
    name = strategy.name
    if method.name == "qlora" and name not in ("ddp", "auto"):
        raise ValueError(
            f"method qlora runs under strategy ddp only: bitsandbytes 4-bit weights are not sharded by {name} here; "
            "use strategy: ddp (the 4-bit base is small) or method lora with fsdp / deepspeed"
        )
    stage = getattr(strategy, "stage", None)
    if method.name in PROMPT_LEARNING and (name == "fsdp" or stage == 3):
        raise ValueError(
            f"method {method.name} (prompt learning) keeps its virtual-token encoder outside the transformer "
            "blocks, which fsdp and ZeRO-3 shard: use ddp or deepspeed stage 1 or 2"
        )


KINDS: dict[str, type[Section]] = {"pretrain": PretrainJob, "finetune": FinetuneJob}


def json_schema(kind: str | None = None) -> dict:
    """JSON Schema of one kind, or of the union of all kinds (discriminated by `kind`)."""
    if kind is not None:
        return KINDS[kind].model_json_schema()
    models = tuple(KINDS.values())
    if len(models) == 1:
        return models[0].model_json_schema()
    return TypeAdapter(Annotated[Union[models], Field(discriminator="kind")]).json_schema()  # noqa: UP007
