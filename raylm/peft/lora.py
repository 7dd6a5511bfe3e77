"""LoRA through Hugging Face PEFT: a low-rank update B·A (scaled alpha / r) beside target linears."""

from __future__ import annotations

from raylm.peft.hf_peft import load, merge, save

__all__ = ["apply", "config", "load", "merge", "save"]


def config(method):
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=method.target_modules,
        bias=method.bias,
        use_rslora=method.use_rslora,
        use_dora=method.use_dora,
        modules_to_save=method.modules_to_save or None,
    )


def apply(model, method, tokenizer=None):
    from raylm.peft.hf_peft import wrap

    return wrap(model, config(method))
