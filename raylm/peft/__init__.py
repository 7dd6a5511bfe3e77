"""Fine-tuning methods, one module each, registered by name (like peft/tuners/<method>/).

Every module has `apply(model, method, tokenizer) -> model` (marks what trains), `save(model, folder)`
(the method's artifact) and `load(base, folder) -> model` (puts a saved artifact back on a base);
mergeable methods have `merge(model) -> plain model`; qlora also `load_base(...)` (the 4-bit base).

    from raylm import peft
    model = peft.apply(base, job.method, tokenizer)
"""

from __future__ import annotations

import importlib

METHODS = {
    "full": "raylm.peft.full",
    "freeze": "raylm.peft.freeze",
    "adapter": "raylm.peft.adapter",
    "lora": "raylm.peft.lora",
    "qlora": "raylm.peft.qlora",
    "ia3": "raylm.peft.ia3",
    "ptuning": "raylm.peft.ptuning",
    "prefix": "raylm.peft.prefix",
    "prompt": "raylm.peft.prompt",
}
ARTIFACT = {"full": "model", "freeze": "model"}  # folder name under the output; others: "adapter"


def module(name: str):
    return importlib.import_module(METHODS[name])


def apply(model, method, tokenizer=None):
    return module(method.name).apply(model, method, tokenizer)


def artifact_dir(name: str) -> str:
    return ARTIFACT.get(name, "adapter")
