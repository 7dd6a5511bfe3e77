"""Spec of the compression kinds: `kind: quantize` (bitsandbytes NF4 / FP4 / int8, GPTQ, GGUF) and
`kind: prune` (magnitude, Wanda, N:M, structured, iterative with rewinding; optional recovery training).

    kind: quantize
    model: {path: runs/tiny/model}
    method: {name: nf4}                  # nf4 | fp4 | int8 | gptq | gguf
    output: runs/tiny-nf4

Held-out text for the before / after perplexity comes from `data` (the pretraining data section), or,
for a model folder inside a raylm pretraining run, from that run's own data and validation split.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from raylm.spec.sections import (
    DataSpec,
    ModelSpec,
    OutputSpec,
    ResourcesSpec,
    Section,
    TrainSpec,
    path_shorthand,
)
from raylm.spec.strategies import DDPStrategy, FSDPStrategy, strategy_shorthand


class BnbFourBit(Section):
    """bitsandbytes 4-bit weights (QLoRA's storage): NF4 or FP4 in blocks of 64, optionally with the
    block scales quantized again (double quantization)."""

    name: Literal["nf4", "fp4"]
    double_quant: bool = Field(
        True, description="Quantize the per-block scales too (saves ~0.37 bits/param)."
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="dtype the 4-bit weights are de-quantized to for each matmul (bfloat16 on GPUs).",
    )


class BnbInt8(Section):
    """bitsandbytes LLM.int8(): int8 weights with per-row scales; outlier features run in 16 bits."""

    name: Literal["int8"]
    threshold: float = Field(
        6.0, ge=0, description="Activation magnitude above which a feature is an outlier (0: none)."
    )


class Gguf(Section):
    """One GGUF file for llama.cpp (and transformers' GGUF loader)."""

    name: Literal["gguf"]
    type: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"] = Field(
        "q8_0",
        description="Tensor type of the 2-D weights: f32, f16, bf16, or a block format (q8_0: 8.5 bits, "
        "q5_1: 6, q5_0: 5.5, q4_1: 5, q4_0: 4.5 bits per weight). Norms stay f32.",
    )


class Calibrated(Section):
    """Calibration text: blocks of the data's training split, packed as pretraining packs them."""

    calibration_blocks: int = Field(
        128, ge=1, description="Training-split blocks whose activations calibrate the method."
    )
    calibration_tokens: int | None = Field(
        None, ge=2, description="Tokens per calibration block; default: data.seq_len."
    )


class Gptq(Calibrated):
    """GPTQ (Frantar et al. 2022) through gptqmodel: each linear layer's weights rounded column by
    column, the rounding error compensated on the columns not yet rounded using the layer's inputs over
    calibration text (their Hessian), layer after layer. Needs `pip install 'raylm[gptq]'`."""

    name: Literal["gptq"]
    bits: Literal[2, 3, 4, 8] = Field(4, description="Bits per weight: 2, 3, 4 or 8.")
    group_size: Literal[-1, 16, 32, 64, 128, 256, 512, 1024] = Field(
        128, description="Input features sharing one scale and zero point; -1: one group per output row."
    )
    desc_act: bool = Field(
        False, description="Round columns in order of decreasing activation (act-order): better, slower."
    )
    sym: bool = Field(True, description="Symmetric quantization (no zero point per group).")
    damp_percent: float = Field(
        0.05, gt=0, lt=1, description="Dampening added to the Hessian's diagonal, as a share of its mean."
    )


QuantizeMethod = Annotated[Union[BnbFourBit, BnbInt8, Gptq, Gguf], Field(discriminator="name")]  # noqa: UP007


class MeasureSpec(Section):
    """What is measured on the original and the compressed model, the same way on both."""

    perplexity_blocks: int = Field(
        64, ge=1, description="Held-out blocks (data.seq_len tokens each) for perplexity."
    )
    prompts: int = Field(16, ge=1, description="Held-out prompts for greedy agreement and generation speed.")
    prompt_tokens: int = Field(16, ge=1, description="Tokens per prompt.")
    new_tokens: int = Field(32, ge=1, description="Greedy tokens generated per prompt.")


class CompressResources(Section):
    """What the compression task gets from the Ray cluster."""

    use_gpu: bool = Field(False, description="Run on a GPU worker (one GPU).")
    cpus: float = Field(1, gt=0, description="CPUs reserved for the task; also its torch thread count.")

    # What an embedded local Ray is sized by (raylm.runtime.cluster.ensure_ray), as for a training job.
    max_workers = property(lambda self: 1)
    cpus_per_worker = property(lambda self: self.cpus)


class CompressionJob(Section):
    """What every compression kind has: a model folder, held-out text, measurements, resources, output."""

    kind: str
    name: str | None = Field(None, description="Job name; default: the output folder's name.")
    model: ModelSpec = Field(description="The model folder to compress (model.path).")
    data: DataSpec | None = Field(
        None,
        description="Text for held-out perplexity (its validation split), prompts and calibration (its "
        "training split); default: the pretraining data of the raylm run the model folder belongs to.",
    )
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    resources: CompressResources = Field(default_factory=CompressResources)
    output: OutputSpec

    _method_shorthand = field_validator("method", mode="before", check_fields=False)(
        lambda cls, v: {"name": v} if isinstance(v, str) else v
    )
    _output_shorthand = field_validator("output", mode="before")(lambda cls, v: path_shorthand(v))

    @model_validator(mode="after")
    def _a_folder(self) -> CompressionJob:
        if self.model.path is None:
            raise ValueError("model.path: compression needs a trained model folder, not an architecture")
        return self

    @property
    def run_name(self) -> str:
        return self.name or PurePosixPath(self.output.path.rstrip("/")).name or f"raylm-{self.kind}"

    @property
    def path_sections(self) -> tuple:
        """The sections whose `path` may be a storage URI, fetched on each node that reads it."""
        return (self.model,)


class QuantizeJob(CompressionJob):
    """Post-training quantization of a Hugging Face model folder, measured before and after."""

    kind: Literal["quantize"]
    method: QuantizeMethod = Field(description="nf4, fp4, int8 (bitsandbytes), gptq or gguf.")


class Magnitude(Section):
    """Zero the weights of smallest magnitude in each linear layer of the decoder."""

    name: Literal["magnitude"]
    sparsity: float = Field(0.5, ge=0, lt=1, description="Share of each layer's weights set to zero.")
    pattern: str | None = Field(
        None,
        description='N:M semi-structured sparsity, e.g. "2:4" or "4:8": N of every M consecutive weights '
        "of a row are kept (sparsity is then 1 - N/M).",
    )

    @field_validator("pattern", mode="before")
    @classmethod
    def _sexagesimal(cls, value):
        """YAML 1.1 reads an unquoted 2:4 as the base-60 number 124 (2 x 60 + 4): read it back."""
        if isinstance(value, int) and not isinstance(value, bool) and value >= 60:
            return f"{value // 60}:{value % 60}"
        return value

    @model_validator(mode="after")
    def _pattern(self):
        if self.pattern is None:
            return self
        parts = self.pattern.split(":")
        if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 0 < int(parts[0]) < int(parts[1]):
            raise ValueError(f'pattern {self.pattern!r}: write N:M with 0 < N < M, e.g. "2:4"')
        implied = 1 - int(parts[0]) / int(parts[1])
        if "sparsity" in self.model_fields_set and abs(self.sparsity - implied) > 1e-9:
            raise ValueError(
                f"pattern {self.pattern} keeps {parts[0]} of {parts[1]} (sparsity {implied:g}); "
                f"sparsity {self.sparsity:g} contradicts it: leave sparsity out"
            )
        self.__dict__["sparsity"] = implied
        return self

    @property
    def n_m(self) -> tuple[int, int] | None:
        return tuple(int(p) for p in self.pattern.split(":")) if self.pattern else None


class Wanda(Magnitude, Calibrated):
    """Wanda (Sun et al. 2023): weight magnitude x the norm of its input feature over calibration
    text, compared within each output row; layer by layer, each layer's inputs recomputed through the
    layers already pruned."""

    name: Literal["wanda"]


class Retraining(Section):
    """Training of a pruned model on the job's text (its training split) with its zeros held at zero
    (train.keep_sparsity): a raylm pretraining run that starts from the pruned weights."""

    train: TrainSpec | None = Field(
        None,
        description="The loop's settings; default: the train section recorded by the pretraining run the "
        "model folder belongs to (the same schedule again).",
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    strategy: DDPStrategy | FSDPStrategy = Field(
        default_factory=lambda: DDPStrategy(name="ddp"),
        discriminator="name",
        description="ddp or fsdp (DeepSpeed's flat weight copies cannot be masked).",
    )

    _strategy_shorthand = field_validator("strategy", mode="before")(lambda cls, v: strategy_shorthand(v))


class Iterative(Section):
    """Iterative magnitude pruning with weight rewinding (the lottery-ticket procedure, Frankle & Carbin
    2019; Frankle et al. 2020): from the trained model, `rounds` times: prune each layer's smallest
    surviving weights by magnitude, rewind the survivors (and every other weight) to their values at
    the rewind point, retrain with the pruned weights held at zero."""

    name: Literal["iterative"]
    sparsity: float = Field(
        0.8, gt=0, lt=1, description="Share of each layer's weights zero after the last round."
    )
    rounds: int = Field(
        3, ge=1, description="Prune-rewind-retrain rounds; round r reaches 1 - (1 - sparsity)^(r / rounds)."
    )
    rewind: str = Field(
        "init",
        description='Where survivors go back to: "init" (the pretraining run\'s initialization, rebuilt from '
        "its recorded architecture and seed) or a model folder holding early weights of the same model.",
    )
    retrain: Retraining = Field(default_factory=Retraining, description="Each round's retraining.")

    pattern = property(lambda self: None)
    n_m = property(lambda self: None)

    def round_sparsity(self, r: int) -> float:
        return 1 - (1 - self.sparsity) ** (r / self.rounds)


class Structured(Section):
    """Remove whole attention heads (with their key / value group) and MLP channels from every layer:
    the saved model is smaller and its config says so."""

    name: Literal["structured"]
    heads: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="Share of each layer's key/value head groups removed (with their query heads).",
    )
    channels: float = Field(0.25, ge=0, lt=1, description="Share of each layer's MLP channels removed.")


PruneMethod = Annotated[Union[Magnitude, Wanda, Structured, Iterative], Field(discriminator="name")]  # noqa: UP007


class PruneJob(CompressionJob):
    """Pruning of a Hugging Face model folder, measured before and after."""

    kind: Literal["prune"]
    method: PruneMethod = Field(description="magnitude, wanda (optionally N:M), structured or iterative.")
    recover: Retraining | None = Field(
        None,
        description="A recovery training after pruning, the pruned weights held at zero; its run (and the "
        "iterative method's rounds) live in <output>.work/.",
    )

    @property
    def cpus_needed(self) -> float:
        """What an embedded local Ray is sized by: the task, or the retraining's workers."""
        retraining = self.recover or getattr(self.method, "retrain", None)
        if retraining is None:
            return self.resources.cpus
        workers = retraining.resources
        return max(self.resources.cpus, workers.max_workers * workers.cpus_per_worker)

    @model_validator(mode="after")
    def _one_retraining(self) -> PruneJob:
        if self.recover is not None and self.method.name == "iterative":
            raise ValueError("recover: the iterative method retrains in every round; use method.retrain")
        return self
