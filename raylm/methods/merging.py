"""`raylm merge`: fold a saved LoRA / QLoRA / IA3 adapter into its base and save a plain HF folder.

raylm merge runs/lora --out runs/lora/merged             # the run folder: its adapter/ (raylm.cli)
raylm merge runs/lora/adapter --out runs/lora/merged
raylm merge runs/lora/adapter --base some/other/copy/of/the/base --out merged/
"""

from __future__ import annotations

import json
from pathlib import Path


class MergeError(Exception):
    pass


def merge_adapter(artifact: str, out: str, base: str | None = None) -> None:
    from transformers import AutoTokenizer

    from raylm import methods

    model, method, base = load_adapter(Path(artifact), base)
    if method.name not in methods.mergeable():
        raise MergeError(
            f"method {method.name} cannot be merged into its base (mergeable: {', '.join(methods.mergeable())})"
        )
    merged = methods.module(method.name).merge(model)
    merged.save_pretrained(out, safe_serialization=True)
    folder = Path(artifact)
    source = folder if (folder / "tokenizer_config.json").exists() else Path(base)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)


def load_adapter(folder: Path, base: str | None = None, device: str = "cpu"):
    """(the base with the saved adapter loaded onto it, the method, the base folder) for an adapter
    folder written by a fine-tuning run (raylm_method.json) or by PEFT (adapter_config.json)."""
    from pydantic import TypeAdapter, ValidationError
    from transformers import AutoModelForCausalLM

    from raylm import methods
    from raylm.methods import MethodSpec

    record = folder / "raylm_method.json"
    if not record.exists():
        if not (folder / "adapter_config.json").exists():
            raise MergeError(f"{folder} is not an adapter folder (no adapter_config.json)")
        peft_type = json.loads((folder / "adapter_config.json").read_text()).get("peft_type", "").lower()
        saved = {"method": {"name": peft_type}, "base": None}
    else:
        saved = json.loads(record.read_text())
    try:
        method = TypeAdapter(MethodSpec).validate_python(saved["method"])
    except ValidationError as err:
        raise MergeError(f"{record}: not a method raylm knows ({err.errors()[0]['msg']})") from None
    base = (
        base
        or saved.get("base")
        or json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    )
    if not base or not Path(base).exists():
        raise MergeError(f"base model {base!r} not found: pass --base FOLDER")
    module = methods.module(method.name)
    if hasattr(module, "load_base"):
        return module.load(module.load_base(base, method, device), folder), method, base
    plain = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True).to(device)
    return module.load(plain, folder), method, base
