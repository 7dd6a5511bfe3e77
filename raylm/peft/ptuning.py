"""P-Tuning through Hugging Face PEFT: virtual tokens produced by an LSTM or MLP prompt encoder."""

from __future__ import annotations

from raylm.peft.hf_peft import load, save

__all__ = ["apply", "load", "save"]


def apply(model, method, tokenizer=None):
    from peft import PromptEncoderConfig

    from raylm.peft.hf_peft import wrap

    return wrap(
        model,
        PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=method.num_virtual_tokens,
            encoder_reparameterization_type=method.encoder_type.upper(),
            encoder_hidden_size=method.encoder_hidden_size,
            encoder_dropout=method.encoder_dropout,
        ),
    )
