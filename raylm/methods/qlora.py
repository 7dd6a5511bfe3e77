"""QLoRA: the base loaded in 4 bits by bitsandbytes (NF4 or FP4, optionally double-quantised), prepared
for k-bit training, LoRA on top (PEFT), and bitsandbytes' paged 8-bit AdamW.

Under fsdp and ZeRO-3 the 4-bit base is sharded the way FSDP-QLoRA does it: the packed 4-bit codes are
stored in the compute dtype (`bnb_4bit_quant_storage`), so they shard and gather like any tensor, and
each layer's quantisation constants (small) stay whole on its module. Every worker loads the 4-bit base
on its host; each keeps its shard. bitsandbytes' optimizers step plain tensors only, so a sharded run
trains the LoRA weights with torch's AdamW (`optimizer: adamw`).

Merging folds the LoRA update into a de-quantised copy of the same 4-bit base: the merged model
computes what the trained one did, in full precision.
"""

from __future__ import annotations

import tempfile
from typing import Literal

from pydantic import Field

from raylm.methods.hf_peft import (  # noqa: F401 - the method's artifact
    load,
    quiet_peft,
    reference,  # noqa: F401 - its base, for preference objectives
    save,
)
from raylm.methods.lora import LoraMethod
from raylm.methods.unimported import unimported_as_absent

# Bits per base weight stored by bitsandbytes' 4-bit formats: the 4-bit codes plus an fp32 absmax per
# 64 weights, or (double quantization) an 8-bit absmax per 64 and an fp32 scale per 256 of those.
QUANT_BITS = {"nf4": 4 + 32 / 64, "nf4-dq": 4 + 8 / 64 + 32 / (64 * 256)}


class QLoraMethod(LoraMethod):
    """QLoRA: the base loaded in 4 bits by bitsandbytes, LoRA on top, a paged 8-bit optimizer."""

    name: Literal["qlora"]  # type: ignore[assignment]
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the base weights.")
    double_quant: bool = Field(True, description="Quantise the quantisation constants too (~0.4 bit/param).")
    compute_dtype: Literal["bf16", "fp32"] = Field("bf16", description="dtype of the de-quantised matmuls.")
    optimizer: Literal["paged_adamw_8bit", "adamw_8bit", "adamw"] = Field(
        "paged_adamw_8bit", description="bitsandbytes paged 8-bit AdamW, plain 8-bit AdamW, or torch AdamW."
    )


Spec = QLoraMethod


def refuses(strategy, method, train) -> str | None:
    if strategy.name in ("ddp", "auto"):
        return None
    if strategy.name == "deepspeed" and train.precision != "fp32":
        return (
            f"under deepspeed with train.precision {train.precision}: DeepSpeed's {train.precision} mode "
            "casts every weight, the packed 4-bit codes too; leave precision fp32 (the base already "
            "computes in method.compute_dtype)"
        )
    if strategy.name == "deepspeed" and strategy.stage < 3:
        return (
            f"with ZeRO-{strategy.stage} keeps a whole 4-bit base on every worker, as ddp does: use "
            "strategy ddp, or deepspeed stage 3 to partition the base"
        )
    if method.optimizer != "adamw":
        return (
            f"with strategy {strategy.name} needs method.optimizer: adamw (bitsandbytes' "
            f"{method.optimizer} steps plain tensors, not sharded ones)"
        )
    return None


def base_bits(method) -> float:
    return QUANT_BITS["nf4-dq" if method.double_quant else "nf4"]


def counted_as(method):
    """The same LoRA on a full-precision base (the meta device cannot quantise) for counting."""
    fields = {k: v for k, v in method.model_dump().items() if k in LoraMethod.model_fields}
    return LoraMethod.model_validate({**fields, "name": "lora"})


def quantization_config(method):
    import torch
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if method.compute_dtype == "bf16" else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.quant_type,
        bnb_4bit_use_double_quant=method.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,  # codes packed into compute-dtype elements: fsdp / ZeRO-3 shard them
    )


def check(job) -> None:
    if job.train.compile:
        raise ValueError(
            "train.compile with method qlora: bitsandbytes' 4-bit matmuls break torch.compile's graphs "
            "(no speed-up); leave compile off"
        )


def load_base(path: str, method, device, revision=None, trust_remote_code=False, attention=None):
    """The base model, its linear layers as bitsandbytes Linear4bit on `device`."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=revision,
        quantization_config=quantization_config(method),
        device_map={"": str(device)},
        trust_remote_code=trust_remote_code,
        attn_implementation=attention,
        use_safetensors=True,
    )
    if str(device) == "cpu":
        # On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight in place for its
        # inference kernel the first time it runs in eval mode, which fails for layers whose
        # out_features are not a multiple of 64 and leaves the weight in another layout for the
        # training steps that follow an evaluation. One layout for training and evaluation:
        for layer in model.modules():
            if isinstance(layer, bnb.nn.Linear4bit):
                layer.support_avx512bf16_for_cpu = False
    return model


def apply(model, method, tokenizer=None):
    from peft import prepare_model_for_kbit_training

    from raylm.methods.hf_peft import wrap
    from raylm.methods.lora import config

    # fp32 norms and embeddings; gradient checkpointing is the loop's (train.gradient_checkpointing)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return wrap(model, config(method))


def optimizer(params, lr: float, betas, method):
    import bitsandbytes as bnb
    import torch

    if method.optimizer == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=lr, betas=betas)
    if method.optimizer == "adamw_8bit":
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas)
    return torch.optim.AdamW(params, lr=lr, betas=betas)


def merge(model):
    """A plain full-precision model: the 4-bit base de-quantised, the LoRA update merged in."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = model.peft_config["default"]
    quant = model.get_base_model().config.quantization_config
    with tempfile.TemporaryDirectory(prefix="raylm-qlora-") as folder:
        model.save_pretrained(folder)
        base = AutoModelForCausalLM.from_pretrained(
            config.base_model_name_or_path,
            quantization_config=quant,
            device_map={"": "cpu"},
            use_safetensors=True,
        )
        base = base.dequantize()
        with quiet_peft(), unimported_as_absent("gptqmodel"):
            merged = PeftModel.from_pretrained(base, folder).merge_and_unload()
    return merged.float()
