"""P-Tuning through Hugging Face PEFT: virtual tokens produced by an LSTM or MLP prompt encoder."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raylm.methods.hf_peft import (  # noqa: F401 - the method's artifact
    load,
    reference,  # noqa: F401 - its base, for preference objectives
    save,
)
from raylm.methods.hf_peft import refuses_sharded_blocks as refuses  # noqa: F401
from raylm.spec.sections import Section


class PTuningMethod(Section):
    """P-Tuning: virtual tokens produced by a prompt encoder (LSTM or MLP); base frozen."""

    name: Literal["ptuning"]
    num_virtual_tokens: int = Field(20, ge=1, description="Virtual tokens prepended to every input.")
    encoder_type: Literal["lstm", "mlp"] = Field("mlp", description="Prompt encoder.")
    encoder_hidden_size: int = Field(128, ge=1, description="Hidden size of the prompt encoder.")
    encoder_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout in the prompt encoder.")


Spec = PTuningMethod


def apply(model, method, tokenizer=None):
    from peft import PromptEncoderConfig

    from raylm.methods.hf_peft import wrap

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
