"""Prompt tuning through Hugging Face PEFT: trainable soft-prompt embeddings, random or from a text.

Text initialisation copies the embeddings of the text's tokens (repeated to the prompt length), as
PEFT's TEXT init does, from the tokenizer in hand rather than one PEFT would load by name.
"""

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


class PromptMethod(Section):
    """Prompt tuning: trainable soft-prompt embeddings; base frozen."""

    name: Literal["prompt"]
    num_virtual_tokens: int = Field(20, ge=1, description="Soft-prompt length.")
    init_text: str | None = Field(
        None, description="Initialise the soft prompt from this text's token embeddings (default random)."
    )


Spec = PromptMethod


def apply(model, method, tokenizer=None):
    import torch
    from peft import PromptTuningConfig

    from raylm.methods.hf_peft import wrap

    init_ids = None
    if method.init_text is not None:
        if tokenizer is None:
            raise ValueError("method.init_text needs the tokenizer")
        ids = tokenizer(method.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError("method.init_text encodes to no tokens")
        init_ids = (ids * (method.num_virtual_tokens // len(ids) + 1))[: method.num_virtual_tokens]
    peft_model = wrap(
        model,
        PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=method.num_virtual_tokens, prompt_tuning_init="RANDOM"
        ),
    )
    if init_ids is not None:
        table = peft_model.get_input_embeddings()
        with torch.no_grad():
            start = table(torch.tensor(init_ids, device=table.weight.device))
            peft_model.prompt_encoder["default"].embedding.weight.copy_(start)
    return peft_model
