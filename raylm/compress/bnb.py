"""bitsandbytes quantization (NF4 / FP4 with optional double quantization, LLM.int8()) of a Hugging
Face folder into a folder that `from_pretrained` reloads in its quantized form.

    from raylm.compress import bnb
    bnb.write(Path("runs/tiny/model"), Path("runs/tiny-nf4"), method, "cpu")
    model = bnb.load(Path("runs/tiny-nf4"), "cpu")     # Linear4bit layers, quantization_config kept

The linear layers of the decoder are quantized; embeddings, norms and the LM head stay as they are
(transformers' bitsandbytes integration keeps the output layer in full precision). On CPU,
bitsandbytes' 4-bit kernel needs a layer's input features in multiples of its block size (64) and its
output features in multiples of 32: other layers stay in full precision, and the summary lists them.
"""

from __future__ import annotations

from pathlib import Path

from raylm.methods.unimported import save_pretrained

BLOCK = 64  # bitsandbytes' 4-bit block size, as transformers uses it
CPU_ROWS = 32  # the CPU kernel packs output rows in groups of 32


def config(method, keep: list[str]):
    import torch
    from transformers import BitsAndBytesConfig

    # Naming the kept modules replaces transformers' default list, which is the LM head.
    skip = ["lm_head", *keep]
    if method.name == "int8":
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=method.threshold, llm_int8_skip_modules=skip
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.name,
        bnb_4bit_use_double_quant=method.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, method.compute_dtype),
        llm_int8_skip_modules=skip,
    )


def kept_in_full_precision(source: Path, method, device: str) -> list[str]:
    """Linear layers the 4-bit CPU kernel cannot run (their shapes), found on the meta device."""
    if method.name == "int8" or device != "cpu":
        return []
    import torch
    from transformers import AutoConfig

    from raylm.planning.models import meta_model

    model = meta_model(AutoConfig.from_pretrained(str(source)))
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name != "lm_head"
        and (module.in_features % BLOCK or module.out_features % CPU_ROWS)
    ]


def write(source: Path, target: Path, method, device: str, keep: list[str]) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(source), quantization_config=config(method, keep), device_map={"": device}, use_safetensors=True
    )
    save_pretrained(model, str(target))
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(target))
    return target


def load(artifact: Path, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(artifact), device_map={"": device}, use_safetensors=True)
