"""Fine-tuning methods, one module each, registered by name (like peft/tuners/<method>/).

A method module holds its spec block and what it does to a model:

    Spec                                  the pydantic model of its `method:` block (`name: Literal[...]`)
    apply(model, method, tokenizer)       marks what trains (wraps the model if need be) -> model
    save(model, folder) / load(base, folder)   its artifact, and putting a saved artifact back on a base
optional:
    merge(model) -> plain model           the method can be folded into the base (`output.merge`)
    ARTIFACT = "model"                    the artifact folder's name under the output (default "adapter")
    refuses(strategy, method, train) -> str | None   why a (concrete) strategy cannot run it
    check(job)                            raise ValueError for a spec combination it cannot run
    load_base(path, method, device, revision, trust_remote_code)   a base it loads its own way (4-bit)
    optimizer(params, lr, betas, method)  an optimizer other than AdamW
    reference(model)                      a context in which the model computes as its base (the
                                          preference objectives' reference; without it: a frozen copy)
    base_bits(method), counted_as(method) what the memory estimate counts for it

    from raylm import methods
    model = methods.apply(base, job.method, tokenizer)

Adding a method: its module here, one line in METHODS, and a row in tests/methods/test_methods.py.
Method modules import torch / peft inside functions: the spec (and `raylm --help`) loads them.
"""

from __future__ import annotations

from types import ModuleType
from typing import Annotated, Union

from pydantic import Field

from raylm.methods import adapter, freeze, full, ia3, lora, prefix, prompt, ptuning, qlora

METHODS: dict[str, ModuleType] = {
    "full": full,
    "freeze": freeze,
    "adapter": adapter,
    "lora": lora,
    "qlora": qlora,
    "ia3": ia3,
    "ptuning": ptuning,
    "prefix": prefix,
    "prompt": prompt,
}

MethodSpec = Annotated[Union[tuple(m.Spec for m in METHODS.values())], Field(discriminator="name")]  # noqa: UP007


def module(name: str) -> ModuleType:
    return METHODS[name]


def apply(model, method, tokenizer=None):
    return METHODS[method.name].apply(model, method, tokenizer)


def artifact_dir(name: str) -> str:
    return getattr(METHODS[name], "ARTIFACT", "adapter")


def reference(name: str):
    """The method's `reference(model)` context (its adapters off), or None: it trains the base itself."""
    return getattr(METHODS[name], "reference", None)


def mergeable() -> list[str]:
    return [name for name, m in METHODS.items() if hasattr(m, "merge")]


def refusal(method, strategy, train) -> str | None:
    """Why `strategy` (a concrete strategy spec) cannot run `method` with the `train` section, or None."""
    refuses = getattr(METHODS[method.name], "refuses", None)
    return refuses(strategy, method, train) if refuses else None
