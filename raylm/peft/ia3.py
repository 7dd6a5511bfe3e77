"""IA3 through Hugging Face PEFT: learned vectors scaling keys, values and the feed-forward input."""

from __future__ import annotations

from raylm.peft.hf_peft import load, merge, save

__all__ = ["apply", "load", "merge", "save"]


def apply(model, method, tokenizer=None):
    from peft import IA3Config

    from raylm.peft.hf_peft import wrap

    return wrap(
        model,
        IA3Config(
            task_type="CAUSAL_LM",
            target_modules=method.target_modules,
            feedforward_modules=method.feedforward_modules,
        ),
    )
