"""The `strategy:` block: how the model is spread over the data-parallel workers.

strategy: ddp                                   # a name is shorthand for {name: ...}
strategy: {name: fsdp, cpu_offload: true}
strategy: {name: deepspeed, stage: 3, offload_optimizer: true, config: {zero_optimization: {...}}}
strategy: auto                                  # chosen from the memory estimate at submit time
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from raylm.spec.sections import Section

HEADROOM = 0.9  # the share of a worker's memory the estimate may fill by default: the rest is the allocator's

# DeepSpeed keys raylm derives from train.* (the data loader must agree with them).
DEEPSPEED_OWNED_KEYS = {
    "train_batch_size": "train.batch_size x train.grad_accum x workers",
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
}


class DDPStrategy(Section):
    """DistributedDataParallel: every worker holds the whole model; gradients are all-reduced."""

    name: Literal["ddp"]


class FSDPStrategy(Section):
    """PyTorch FSDP2 (`fully_shard` per transformer block): weights, gradients and optimizer sharded."""

    name: Literal["fsdp"]
    cpu_offload: bool = Field(
        False, description="Keep sharded parameters, gradients and the optimizer step on the CPU."
    )
    reshard_after_forward: bool = Field(
        True,
        description="Free gathered block weights after forward (ZeRO-3 like); false keeps them (ZeRO-2 like).",
    )


class DeepSpeedStrategy(Section):
    """DeepSpeed ZeRO: stage 1 shards optimizer states, 2 also gradients, 3 also parameters."""

    name: Literal["deepspeed"]
    stage: Literal[1, 2, 3] = Field(2, description="ZeRO stage (1, 2 or 3).")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload: optimizer states and step on the CPU.")
    offload_params: bool = Field(False, description="ZeRO-Infinity: parameters on the CPU (stage 3 only).")
    config: dict[str, Any] | str | None = Field(
        None,
        description="DeepSpeed config keys merged over the generated config, or a path to a JSON config file.",
    )

    @field_validator("config")
    @classmethod
    def _no_batch_keys(cls, value):
        if isinstance(value, dict):
            owned = [f"{k} (set {DEEPSPEED_OWNED_KEYS[k]})" for k in DEEPSPEED_OWNED_KEYS if k in value]
            if owned:
                raise ValueError("raylm sets these from the spec: " + ", ".join(owned))
        elif isinstance(value, str) and not value.endswith(".json"):
            raise ValueError(f"{value!r}: give a DeepSpeed JSON file (ending in .json) or an inline mapping")
        return value

    @model_validator(mode="after")
    def _offload_params_needs_stage3(self) -> DeepSpeedStrategy:
        if self.offload_params and self.stage != 3:
            raise ValueError(
                "offload_params needs stage: 3 (only ZeRO-3 partitions parameters); use offload_optimizer"
            )
        return self

    @property
    def memory_key(self) -> str:
        return f"zero{self.stage}"

    def override(self) -> Any:
        """The keys merged over raylm's DeepSpeed config: the inline mapping, or what the JSON file holds
        (OSError / json.JSONDecodeError for a file that cannot be read: preflight reports those)."""
        if isinstance(self.config, str):
            import json
            from pathlib import Path

            return json.loads(Path(self.config).expanduser().read_text())
        return self.config or {}


class AutoStrategy(Section):
    """Pick ddp, a ZeRO stage or fsdp from the memory estimate: the least sharding that fits."""

    name: Literal["auto"]
    memory_per_worker_gb: float | None = Field(
        None,
        gt=0,
        description="Device memory per worker in GiB; default: measured (GPU) or the node's memory share (CPU).",
    )
    headroom: float = Field(
        HEADROOM,
        gt=0,
        le=1,
        description="Fraction of that memory the estimate may fill (allocator overhead).",
    )


StrategySpec = Annotated[
    Union[DDPStrategy, FSDPStrategy, DeepSpeedStrategy, AutoStrategy],  # noqa: UP007
    Field(discriminator="name"),
]
STRATEGY_NAMES = ("ddp", "fsdp", "deepspeed", "auto")


def strategy_shorthand(value):
    """`strategy: fsdp` means `strategy: {name: fsdp}`."""
    return {"name": value} if isinstance(value, str) else value


def memory_key(strategy) -> str:
    """The raylm.planning.memory strategy a concrete strategy spec is estimated as."""
    if isinstance(strategy, DeepSpeedStrategy):
        return strategy.memory_key
    return strategy.name
