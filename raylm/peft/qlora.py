"""QLoRA: the base loaded in 4 bits by bitsandbytes (NF4 or FP4, optionally double-quantised), prepared
for k-bit training, LoRA on top (PEFT), and bitsandbytes' paged 8-bit AdamW.

Merging folds the LoRA update into a de-quantised copy of the same 4-bit base: the merged model
computes what the trained one did, in full precision.
"""

from __future__ import annotations

import tempfile

from raylm.peft.hf_peft import load, save

__all__ = ["apply", "load", "load_base", "merge", "optimizer", "quantization_config", "save"]


def quantization_config(method):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.quant_type,
        bnb_4bit_use_double_quant=method.double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16 if method.compute_dtype == "bf16" else torch.float32,
    )


def load_base(path: str, method, device, revision=None, trust_remote_code=False):
    """The base model, its linear layers as bitsandbytes Linear4bit on `device`."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path,
        revision=revision,
        quantization_config=quantization_config(method),
        device_map={"": str(device)},
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
    )


def apply(model, method, tokenizer=None):
    from peft import prepare_model_for_kbit_training

    from raylm.peft import lora
    from raylm.peft.hf_peft import wrap

    # fp32 norms and embeddings; gradient checkpointing is the loop's (train.gradient_checkpointing)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return wrap(model, lora.config(method))


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
        merged = PeftModel.from_pretrained(base, folder).merge_and_unload()
    return merged.float()
