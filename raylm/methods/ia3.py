"""IA3 through Hugging Face PEFT: learned vectors scaling keys, values and the feed-forward input."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raylm.methods.hf_peft import (  # noqa: F401 - the method's artifact
    load,
    merge,
    reference,  # noqa: F401 - its base, for preference objectives
    save,
)
from raylm.spec.sections import Section


class IA3Method(Section):
    """IA3: learned scaling vectors on keys, values and the feed-forward input; base frozen."""

    name: Literal["ia3"]
    target_modules: list[str] | None = Field(
        None,
        description="Modules scaled; default PEFT's for the architecture (llama: k_proj, v_proj, down_proj).",
    )
    feedforward_modules: list[str] | None = Field(
        None,
        description="Which targets are feed-forward (scaled on their input); must be among target_modules.",
    )

    @model_validator(mode="after")
    def _feedforward_among_targets(self) -> IA3Method:
        if self.feedforward_modules and self.target_modules is not None:
            extra = set(self.feedforward_modules) - set(self.target_modules)
            if extra:
                raise ValueError(f"feedforward_modules {sorted(extra)} are not in target_modules")
        if self.feedforward_modules and self.target_modules is None:
            raise ValueError("feedforward_modules needs target_modules too")
        return self


Spec = IA3Method


def apply(model, method, tokenizer=None):
    from peft import IA3Config

    from raylm.methods.hf_peft import wrap

    return wrap(
        model,
        IA3Config(
            task_type="CAUSAL_LM",
            target_modules=method.target_modules,
            feedforward_modules=method.feedforward_modules,
        ),
    )
