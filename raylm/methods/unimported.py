"""Library checks that import a whole package only to ask whether an object is one of its types.

transformers' `save_pretrained` unwraps the model through accelerate, which imports DeepSpeed whenever
it is installed, to test `isinstance(model, DeepSpeedEngine)`; PEFT imports gptqmodel as it injects or
loads LoRA layers, to test each target for a GPTQ layer. Each import costs a process 1-2 s of CPU in
every save and every LoRA worker (DeepSpeed adds ~140 MiB of resident code and prints its accelerator
line; gptqmodel prints a banner and rewrites the environment). No object can be an instance of a class
whose module was never imported, so while a package is not imported its check can answer "not
installed" with the same outcome; once it is imported (a DeepSpeed run, a GPTQ model) the library's own
answer stands.

    from raylm.methods.unimported import unimported_as_absent
    with unimported_as_absent("deepspeed"):
        model.save_pretrained(folder)
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
from collections.abc import Iterator

# package -> (the library whose modules hold the check, the module defining it, the check's name)
CHECKS = {
    "deepspeed": ("accelerate", "accelerate.utils.imports", "is_deepspeed_available"),
    "gptqmodel": ("peft", "peft.import_utils", "is_gptqmodel_available"),
}

_lock = threading.Lock()
_users: dict[str, int] = {}
_swapped: dict[str, tuple] = {}


@contextlib.contextmanager
def unimported_as_absent(package: str) -> Iterator[None]:
    """Within the block, the library's availability check for `package` says False while `package`
    is not imported, for every thread. raylm's saves and LoRA injections run these checks only to test
    types; accelerate also asks before building a DeepSpeed Accelerator, which raylm never builds."""
    library, home, name = CHECKS[package]
    with _lock:
        if not _users.get(package):
            original = getattr(importlib.import_module(home), name)

            def check() -> bool:
                return package in sys.modules and original()

            _swapped[package] = (original, check)
            _replace(library, name, original, check)
        _users[package] = _users.get(package, 0) + 1
    try:
        yield
    finally:
        with _lock:
            _users[package] -= 1
            if not _users[package]:
                original, check = _swapped.pop(package)
                # in any module: one imported within the block, of any package, took the replacement
                _replace(None, name, check, original)


def _replace(library: str | None, name: str, old, new) -> None:
    """Each module (of `library`, or any) that imported the check by name holds its own reference to it
    (read from the module's __dict__: a lazy module's __getattr__ is not triggered)."""
    for module_name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)  # sys.modules may hold None or other objects
        if (
            library in (None, module_name.split(".")[0])
            and isinstance(namespace, dict)
            and namespace.get(name) is old
        ):
            setattr(module, name, new)


def save_pretrained(model, folder, **kwargs) -> None:
    """`model.save_pretrained(folder, **kwargs)`, without importing DeepSpeed for its unwrap check."""
    with unimported_as_absent("deepspeed"):
        model.save_pretrained(folder, **kwargs)
