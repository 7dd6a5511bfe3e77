"""What the methods that Hugging Face PEFT implements share: wrap, save, load, merge."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

from raylm.methods.unimported import unimported_as_absent

# PEFT reads a property transformers 5 deprecated whenever it wraps a model or loads an adapter:
# nothing a raylm user can change, so not printed.
DEPRECATION = "`is_gradient_checkpointing` is deprecated"


@contextlib.contextmanager
def quiet_peft():
    """DEPRECATION not printed within (for a process whose other threads may warn meanwhile, the
    filter is not thread-safe: use silence_peft)."""
    with warnings.catch_warnings():
        silence_peft()
        yield


def silence_peft() -> None:
    """DEPRECATION never printed by this process (a training worker, a trial, the server's model
    process, where adapters load on the decoding thread while another thread generates)."""
    warnings.filterwarnings("ignore", DEPRECATION, FutureWarning)


def refuses_sharded_blocks(strategy, method, train) -> str | None:
    """Prompt learning keeps its virtual-token encoder outside the transformer blocks."""
    if strategy.name == "fsdp" or getattr(strategy, "stage", None) == 3:
        return (
            "(prompt learning) keeps its virtual-token encoder outside the transformer blocks, which fsdp "
            "and ZeRO-3 shard: use ddp or deepspeed stage 1 or 2"
        )
    return None


def wrap(model, config):
    from peft import get_peft_model

    with quiet_peft(), unimported_as_absent("gptqmodel"):  # LoRA's injection asks for GPTQ layers
        return get_peft_model(model, config)


def save(model, folder: Path) -> None:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    model.save_pretrained(folder, safe_serialization=True)


def load(base, folder):
    """The base with the adapter of `folder`, as PEFT's own loader puts it."""
    from peft import PeftModel

    with quiet_peft(), unimported_as_absent("gptqmodel"):
        return PeftModel.from_pretrained(base, str(folder))


def reference(model):
    """A context in which the model computes as its base: PEFT's adapters (and modules_to_save)
    switched off."""
    return model.disable_adapter()


def merge(model):
    """The base with the update folded into its weights: a plain transformers model."""
    return model.merge_and_unload()
