"""`raylm merge`: fold a saved LoRA / QLoRA / IA3 adapter into its base and save a plain HF folder.

raylm merge runs/lora --out runs/lora/merged             # the run folder: its adapter/ (raylm.cli)
raylm merge s3://bucket/runs/lora --out merged/          # fetched, its recorded base too
raylm merge runs/lora/adapter --out runs/lora/merged
raylm merge runs/lora/adapter --base some/other/copy/of/the/base --out merged/
"""

from __future__ import annotations

import json
from pathlib import Path

from raylm.methods.unimported import save_pretrained


class MergeError(Exception):
    pass


def merge_adapter(artifact: str, out: str, base: str | None = None) -> None:
    from transformers import AutoTokenizer

    from raylm import methods

    folder = Path(artifact)
    method = saved_method(folder)
    if method.name not in methods.mergeable():  # refused before loading anything
        raise MergeError(
            f"{folder} holds method {method.name}, which cannot be merged into its base (mergeable: "
            f"{', '.join(methods.mergeable())})"
            + (
                ": the folder is already a model that loads alone"
                if (folder / "config.json").exists()
                else ""
            )
        )
    model, method, base = load_adapter(folder, base)
    merged = methods.module(method.name).merge(model)
    save_pretrained(merged, out, safe_serialization=True)
    source = folder if (folder / "tokenizer_config.json").exists() else Path(base)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)


def saved_method(folder: Path):
    """The method of a folder a fine-tuning run wrote (raylm_method.json) or PEFT saved
    (adapter_config.json)."""
    from pydantic import TypeAdapter, ValidationError

    from raylm.methods import MethodSpec

    record, peft = folder / "raylm_method.json", folder / "adapter_config.json"
    if not record.exists() and not peft.exists():
        if (folder / "config.json").exists():
            raise MergeError(f"{folder} is a model that loads alone (a Hugging Face folder), not an adapter")
        raise MergeError(f"{folder} is not an adapter folder (no adapter_config.json)")
    try:
        if record.exists():
            saved = json.loads(record.read_text()).get("method")
        else:
            saved = {"name": str(json.loads(peft.read_text()).get("peft_type", "")).lower()}
    except (ValueError, AttributeError) as err:  # not JSON, not an object
        raise MergeError(f"{folder}: its adapter record is not readable ({err})") from None
    try:
        return TypeAdapter(MethodSpec).validate_python(saved)
    except ValidationError as err:
        raise MergeError(f"{folder}: not a method raylm knows ({err.errors()[0]['msg']})") from None


def load_adapter(folder: Path, base: str | None = None, device: str = "cpu"):
    """(the base with the saved adapter loaded onto it, the method, the base folder) for an adapter
    folder written by a fine-tuning run (raylm_method.json) or by PEFT (adapter_config.json)."""
    from transformers import AutoModelForCausalLM

    from raylm import methods

    method = saved_method(folder)  # (both records, where present, are JSON objects)
    record, peft = folder / "raylm_method.json", folder / "adapter_config.json"
    base = (
        base
        or (json.loads(record.read_text()).get("base") if record.exists() else None)
        or (json.loads(peft.read_text()).get("base_model_name_or_path") if peft.exists() else None)
    )
    if not base or not Path(base).exists():
        raise MergeError(f"base model {base!r} not found: pass --base FOLDER")
    module = methods.module(method.name)
    if hasattr(module, "load_base"):
        return module.load(module.load_base(base, method, device), folder), method, base
    plain = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True).to(device)
    return module.load(plain, folder), method, base
