"""Transfer learning by freezing: the embeddings and the first `layers` blocks (and any parameter
matching `patterns`) keep their pretrained values; the rest trains, optionally with a new LM head."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field

from raylm.methods.full import load, save  # noqa: F401 - the method's artifact
from raylm.spec.sections import Section


class FreezeMethod(Section):
    """Transfer learning: freeze the bottom of the network, train the rest."""

    name: Literal["freeze"]
    layers: int = Field(1, ge=0, description="Freeze the first N transformer blocks.")
    freeze_embeddings: bool = Field(True, description="Freeze the input embeddings (and a tied LM head).")
    patterns: list[str] = Field(
        default_factory=list,
        description="Also freeze parameters whose names match these regular expressions.",
    )
    new_head: bool = Field(
        False, description="Re-initialise the LM head (a new output layer; needs untied embeddings)."
    )


Spec = FreezeMethod

ARTIFACT = "model"


def check(job) -> None:
    if job.method.new_head and job.model.architecture is not None and job.model.architecture.tie_embeddings:
        raise ValueError("method.new_head needs untied embeddings (model.architecture.tie_embeddings: false)")


def apply(model, method, tokenizer=None):
    from raylm.methods.blocks import transformer_blocks

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
