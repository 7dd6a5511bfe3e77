"""What `raylm generate` (and the server) can load: a Hugging Face model folder (full precision, or
quantized by bitsandbytes or GPTQ: its quantization_config says which), a PEFT / raylm adapter folder
over its base, a GGUF file (or a folder holding one), or a raylm run folder (its artifact or model).

    model, tokenizer, what = load_for_generation("runs/quickstart", device="cpu")
"""

from __future__ import annotations

import json
from pathlib import Path


class LoadError(ValueError):
    """The path is not something raylm can generate from; the message says what it expected."""


def adapter_base(folder: Path, base: str | None) -> str | None:
    """`base`, else the base the adapter folder recorded (raylm_method.json); this node's copy where it
    names a storage URI."""
    from raylm.runtime.storage import fetch_artifact

    record = folder / "raylm_method.json"
    if base is None and record.exists():
        base = json.loads(record.read_text()).get("base")
    return fetch_artifact(base) or None


def load_for_generation(path: str, base: str | None = None, device: str = "cpu", dtype: str = "auto"):
    """(model, tokenizer, a description of what was loaded); weights in the checkpoint's own dtype
    unless `dtype` names another."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its per-load "Loading weights" bar says nothing here

    from raylm.runtime.storage import fetch_artifact, run_artifact

    path, base = fetch_artifact(path), fetch_artifact(base)  # a storage URI: this node's copy
    try:
        target = run_artifact(Path(path).expanduser())
    except ValueError as err:  # RunFolderError: a run folder that leads nowhere
        raise LoadError(str(err)) from None
    if target.is_dir() and not (target / "config.json").exists():
        ggufs = sorted(target.glob("*.gguf"))
        if len(ggufs) == 1:
            target = ggufs[0]
    if target.is_file() and target.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(target.parent), gguf_file=target.name)
        model = _cast(model, dtype)
        return model.to(device), gguf_tokenizer(target), f"GGUF {target} (de-quantized by transformers)"
    if (target / "adapter_config.json").exists() or (target / "raylm_method.json").exists():
        from raylm.methods.merging import MergeError, load_adapter

        try:
            model, method, base_folder = load_adapter(target, adapter_base(target, base), device)
        except MergeError as err:
            raise LoadError(str(err)) from None
        model = _cast(model, dtype)
        source = target if (target / "tokenizer_config.json").exists() else Path(base_folder)
        return (
            model,
            AutoTokenizer.from_pretrained(str(source)),
            f"{method.name} adapter {target} over {base_folder}",
        )
    if not (target / "config.json").exists():
        raise LoadError(
            f"{path} is not a model folder (config.json), an adapter folder (adapter_config.json), a GGUF "
            "file or a raylm run folder (summary.json)"
        )
    config = json.loads((target / "config.json").read_text())
    quantized = (config.get("quantization_config") or {}).get("quant_method")
    if quantized == "gptq":
        from raylm.compress.gptq import import_gptqmodel

        import_gptqmodel()  # gptqmodel's CPU worker pools sized before transformers loads it
    model = AutoModelForCausalLM.from_pretrained(
        str(target), use_safetensors=True, device_map={"": device}, dtype="auto" if quantized else dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    return model, tokenizer, f"{target}" + (f" ({quantized})" if quantized else "")


def _cast(model, dtype: str):
    """A model in `dtype` (auto: as loaded); quantized weights keep their own storage."""
    if dtype == "auto" or getattr(model, "is_quantized", False):
        return model
    import torch

    return model.to(getattr(torch, dtype))


def gguf_tokenizer(file: Path):
    """The tokenizer beside a GGUF file, or the one of the model a raylm quantization converted, or
    else the GGUF's own as transformers converts it (which puts SentencePiece's space before the
    text even where the file says not to)."""
    from transformers import AutoTokenizer

    folder = file.parent
    if (folder / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(folder))
    if (folder / "summary.json").exists():
        source = Path(json.loads((folder / "summary.json").read_text()).get("model", ""))
        if (source / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(str(source))
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=file.name)
