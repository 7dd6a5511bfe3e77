"""LoRA through Hugging Face PEFT: a low-rank update B·A (scaled alpha / r) beside target linears."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raylm.methods.hf_peft import (  # noqa: F401 - the method's artifact
    load,
    merge,
    reference,  # noqa: F401 - its base, for preference objectives
    save,
)
from raylm.spec.sections import Section

ALL_LINEAR = "all-linear"


class LoraMethod(Section):
    """LoRA: a trainable low-rank update B·A beside chosen linear layers; base frozen."""

    name: Literal["lora"]
    r: int = Field(8, ge=1, description="Rank of the update.")
    alpha: float = Field(
        16, gt=0, description="Scale: the update is multiplied by alpha / r (alpha / sqrt(r) with rsLoRA)."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch's input.")
    target_modules: str | list[str] = Field(
        ALL_LINEAR,
        description='Module names (suffixes) to adapt, or "all-linear" (every linear but the LM head).',
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    use_dora: bool = Field(
        False, description="DoRA: weight-decomposed LoRA (a trained magnitude per output)."
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full beside LoRA and saved with the adapter."
    )


Spec = LoraMethod


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
    from raylm.methods.hf_peft import wrap

    return wrap(model, config(method))
