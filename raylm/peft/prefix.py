"""Prefix tuning through Hugging Face PEFT: trainable key/value prefixes at every layer."""

from __future__ import annotations

from raylm.peft.hf_peft import load, save

__all__ = ["apply", "load", "save"]


def apply(model, method, tokenizer=None):
    from peft import PrefixTuningConfig

    from raylm.peft.hf_peft import wrap

    return wrap(
        model,
        PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=method.num_virtual_tokens,
            prefix_projection=method.projection,
            encoder_hidden_size=method.encoder_hidden_size,
        ),
    )
