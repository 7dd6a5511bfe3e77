"""Prompt tuning through Hugging Face PEFT: trainable soft-prompt embeddings, random or from a text.

Text initialisation copies the embeddings of the text's tokens (repeated to the prompt length), as
PEFT's TEXT init does, from the tokenizer in hand rather than one PEFT would load by name.
"""

from __future__ import annotations

from raylm.peft.hf_peft import load, save

__all__ = ["apply", "load", "save"]


def apply(model, method, tokenizer=None):
    import torch
    from peft import PromptTuningConfig

    from raylm.peft.hf_peft import wrap

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
