"""Full fine-tuning: every weight trains; the artifact is a whole Hugging Face folder."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from raylm.methods.unimported import save_pretrained
from raylm.spec.sections import Section


class FullMethod(Section):
    """Every weight trains."""

    name: Literal["full"]


Spec = FullMethod

ARTIFACT = "model"


def apply(model, method, tokenizer=None):
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def save(model, folder: Path) -> None:
    save_pretrained(model, folder, safe_serialization=True)


def load(base, folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
