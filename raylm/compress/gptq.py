"""GPTQ quantization through gptqmodel (the maintained successor of auto-gptq) of a Hugging Face folder
into a GPTQ folder that gptqmodel and transformers' GPTQ integration (optimum + gptqmodel) reload.

    pip install 'raylm[gptq]'
    from raylm.compress import gptq
    gptq.write(Path("runs/tiny/model"), Path("runs/tiny-gptq"), method, "cpu", calibration_blocks)
    model = gptq.load(Path("runs/tiny-gptq"), "cpu")

The decoder's linear layers are quantized (codes packed in int32, fp16 scales, zero points and the
column order `g_idx`); embeddings, norms and the LM head keep the original's dtype. The original's
generation config is kept as it was (gptqmodel's save writes its own sampling defaults).
"""

from __future__ import annotations

import shutil
from pathlib import Path

INSTALL = "pip install 'raylm[gptq]'"


def import_gptqmodel():
    """gptqmodel (quiet, its environment kept: raylm.methods.gptqmodel_import) and its model map."""
    from raylm.methods.gptqmodel_import import import_gptqmodel as quiet_import

    gptqmodel = quiet_import()
    from gptqmodel.models.auto import MODEL_MAP

    return gptqmodel, MODEL_MAP


def problems(model_type: str) -> list[str]:
    """Why gptqmodel cannot quantize this model here (not installed, architecture it lacks)."""
    import importlib.util

    if importlib.util.find_spec("gptqmodel") is None:
        return [f"gptq needs the gptqmodel package: {INSTALL}"]
    _, model_map = import_gptqmodel()
    if model_type not in model_map:
        return [f"gptqmodel has no support for {model_type!r} models"]
    return []


def write(source: Path, target: Path, method, device: str, calibration: list[list[int]]) -> Path:
    """Quantize `source` layer by layer on `calibration` blocks and save the GPTQ folder to `target`."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    gptqmodel, _ = import_gptqmodel()
    config = gptqmodel.QuantizeConfig(
        bits=method.bits,
        group_size=method.group_size,
        desc_act=method.desc_act,
        sym=method.sym,
        damp_percent=method.damp_percent,
    )
    dtype = AutoConfig.from_pretrained(str(source)).dtype or torch.float32
    model = gptqmodel.GPTQModel.load(str(source), quantize_config=config, device=device, dtype=dtype)
    model.quantize(
        [{"input_ids": block, "attention_mask": [1] * len(block)} for block in calibration],
        batch_size=min(8, len(calibration)),
        calibration_sort=None,  # keep raylm's fixed order of the blocks
    )
    model.save(str(target))
    if (source / "generation_config.json").exists():
        shutil.copy2(source / "generation_config.json", target / "generation_config.json")
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(target))
    return target


def load(artifact: Path, device: str):
    """The GPTQ folder through transformers' integration (optimum + gptqmodel), de-quantizing on the
    fly in gptqmodel's kernels."""
    import_gptqmodel()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(artifact), device_map={"": device}, use_safetensors=True)
