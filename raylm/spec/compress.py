"""Spec of the compression kinds: `kind: quantize` (bitsandbytes NF4 / FP4 / int8, GGUF).

    kind: quantize
    model: {path: runs/tiny/model}
    method: {name: nf4}                  # nf4 | fp4 | int8 | gguf
    output: runs/tiny-nf4

Held-out text for the before / after perplexity comes from `data` (the pretraining data section), or,
for a model folder inside a raylm pretraining run, from that run's own data and validation split.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from raylm.spec.sections import DataSpec, ModelSpec, OutputSpec, Section


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


QuantizeMethod = Annotated[Union[BnbFourBit, BnbInt8, Gguf], Field(discriminator="name")]  # noqa: UP007


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

    # What an embedded local Ray is sized by (raylm.submit.ensure_ray), as for a training job.
    max_workers = property(lambda self: 1)
    cpus_per_worker = property(lambda self: self.cpus)


class QuantizeJob(Section):
    """Post-training quantization of a Hugging Face model folder, measured before and after."""

    kind: Literal["quantize"]
    name: str | None = Field(None, description="Job name; default: the output folder's name.")
    model: ModelSpec = Field(description="The model folder to quantize (model.path).")
    method: QuantizeMethod = Field(description="nf4, fp4, int8 (bitsandbytes) or gguf.")
    data: DataSpec | None = Field(
        None,
        description="Text for held-out perplexity (its validation split) and prompts; default: the "
        "pretraining data of the raylm run the model folder belongs to.",
    )
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    resources: CompressResources = Field(default_factory=CompressResources)
    output: OutputSpec

    _method_shorthand = field_validator("method", mode="before")(
        lambda cls, v: {"name": v} if isinstance(v, str) else v
    )
    _output_shorthand = field_validator("output", mode="before")(
        lambda cls, v: {"path": v} if isinstance(v, str) else v
    )

    @model_validator(mode="after")
    def _a_folder(self) -> QuantizeJob:
        if self.model.path is None:
            raise ValueError("model.path: quantization needs a trained model folder, not an architecture")
        return self

    @property
    def run_name(self) -> str:
        return self.name or PurePosixPath(self.output.path.rstrip("/")).name or "raylm-quantize"
