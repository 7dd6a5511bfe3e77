"""Prefix tuning through Hugging Face PEFT: trainable key/value prefixes at every layer."""

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


class PrefixMethod(Section):
    """Prefix tuning: trainable key/value prefixes at every layer; base frozen."""

    name: Literal["prefix"]
    num_virtual_tokens: int = Field(20, ge=1, description="Prefix length.")
    projection: bool = Field(False, description="Reparameterise the prefixes through a 2-layer MLP.")
    encoder_hidden_size: int = Field(128, ge=1, description="Hidden size of that MLP.")


Spec = PrefixMethod


def apply(model, method, tokenizer=None):
    from peft import PrefixTuningConfig

    from raylm.methods.hf_peft import wrap

    return wrap(
        model,
        PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=method.num_virtual_tokens,
            prefix_projection=method.projection,
            encoder_hidden_size=method.encoder_hidden_size,
        ),
    )
