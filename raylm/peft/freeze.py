"""Transfer learning by freezing: the embeddings and the first `layers` blocks (and any parameter
matching `patterns`) keep their pretrained values; the rest trains, optionally with a new LM head."""

from __future__ import annotations

import re

from raylm.peft.full import load, save

__all__ = ["apply", "load", "save"]


def apply(model, method, tokenizer=None):
    from raylm.train.strategies import transformer_blocks

    frozen = set()
    if method.freeze_embeddings:
        frozen |= {id(p) for p in model.get_input_embeddings().parameters()}
    blocks = transformer_blocks(model)
    if method.layers > len(blocks):
        raise ValueError(f"method.layers={method.layers} but the model has {len(blocks)} blocks")
    for block in blocks[: method.layers]:
        frozen |= {id(p) for p in block.parameters()}
    patterns = [re.compile(p) for p in method.patterns]
    for name, param in model.named_parameters():
        if id(param) in frozen or any(p.search(name) for p in patterns):
            param.requires_grad_(False)
        else:
            param.requires_grad_(True)
    if method.new_head:
        head = model.get_output_embeddings()
        head.reset_parameters()
        head.weight.requires_grad_(True)
    return model
