"""What the compression kinds read: a causal-LM folder, and text packed as pretraining packs it
(held-out blocks and prompts for the measurements, training blocks for calibration).

    from raylm.compress.inputs import calibration, check_causal_lm, held_out
    blocks, prompts = held_out(job)           # validation blocks, and prompts cut from them
    calibration(job)                          # training blocks for Wanda or GPTQ
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from raylm.spec.reading import SpecError


def check_causal_lm(folder: Path, where: str) -> list[tuple[str, str]]:
    """A local Hugging Face folder of a causal language model (safetensors weights)."""
    if not folder.is_dir():
        return [(where, f"{folder} is not a folder here (compression reads a local model folder)")]
    if not (folder / "config.json").exists():
        hint = (
            " (a raylm run folder: use its model/ or merged/ folder)" if (folder / "model").is_dir() else ""
        )
        return [(where, f"{folder} has no config.json: not a Hugging Face model folder{hint}")]
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        return [(where, f"{folder}/config.json is not readable JSON ({err})")]
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return [(where, f"{folder} holds a {config.get('model_type')!r} model, not a causal language model")]
    if config.get("quantization_config"):
        return [
            (where, f"{folder} is already quantized ({config['quantization_config'].get('quant_method')})")
        ]
    if not list(folder.glob("*.safetensors")):
        return [(where, f"{folder} has no .safetensors weights (raylm loads weights with safetensors only)")]
    try:
        AutoConfig.from_pretrained(str(folder))
    except Exception as err:  # a config transformers cannot read: say so before any work
        return [(where, f"{folder}/config.json: {err}")]
    return []


def check_inputs(job) -> list[tuple[str, str]]:
    """The model folder and the text a compression job reads, before any work."""
    from raylm.data.pipeline import check_data

    problems = check_causal_lm(Path(job.model.path).expanduser(), "model.path")
    if problems:
        return problems
    data, where = text_data(job)
    if data is None:
        return [("data", where)]
    return [(f"{where}{p[len('data') :]}", what) for p, what in check_data(data)]


def text_data(job) -> tuple[object | None, str]:
    """(the data section to measure on, where it comes from) or (None, why there is none)."""
    if job.data is not None:
        return job.data, "data"
    run = Path(job.model.path).expanduser().parent
    recorded = run / "spec.yaml"
    if recorded.exists():
        spec = yaml.safe_load(recorded.read_text()) or {}
        if spec.get("kind") == "pretrain" and isinstance(spec.get("data"), dict):
            from raylm.spec.sections import DataSpec

            return DataSpec(**spec["data"]), f"{recorded}: data"
    return None, (
        "give held-out text for perplexity (a pretraining data section: path, format, seq_len); only a "
        "model inside a raylm pretraining run can default to its run's data"
    )


def packed(job, validation: bool, count: int, seq_len: int | None = None) -> list[list[int]]:
    """Up to `count` blocks (of `seq_len` tokens, default the data's) of the validation (or the
    training) split of the job's text, tokenized and packed by the same Ray Data pipeline as
    pretraining, in a fixed order."""
    from ray.data.expressions import col

    from raylm.data.pipeline import configure_ray_data, documents, packed_blocks
    from raylm.data.tokenizer import load_tokenizer

    configure_ray_data()  # the same blocks in the same order on every run
    data, _ = text_data(job)
    if seq_len is not None:
        data = data.model_copy(update={"seq_len": seq_len})
    tokenizer = load_tokenizer(job.model.path)
    split = col("val") if validation else ~col("val")
    rows = packed_blocks(documents(data), tokenizer, data).filter(expr=split).take(count)
    return [list(map(int, row["input_ids"])) for row in rows]


def held_out(job) -> tuple[list[list[int]], list[list[int]]]:
    """Validation blocks for perplexity, and prompts: the starts of held-out blocks."""
    measure = job.measure
    blocks = packed(job, True, max(measure.perplexity_blocks, measure.prompts))
    if len(blocks) < 2:
        data, _ = text_data(job)
        raise SpecError(
            [
                (
                    "data",
                    f"only {len(blocks)} held-out blocks of {data.seq_len} tokens: give more text or "
                    "raise data.val_fraction",
                )
            ]
        )
    prompts = [b[: measure.prompt_tokens] for b in blocks[: measure.prompts]]
    return blocks[: measure.perplexity_blocks], prompts


def calibration(job) -> list[list[int]]:
    """The method's calibration blocks from the training split; too few is the spec's problem."""
    method = job.method
    blocks = packed(job, False, method.calibration_blocks, method.calibration_tokens)
    if len(blocks) < method.calibration_blocks:
        raise SpecError(
            [
                (
                    "method.calibration_blocks",
                    f"the data's training split holds {len(blocks)} blocks, fewer than the "
                    f"{method.calibration_blocks} asked for: lower it (or method.calibration_tokens) or "
                    "give more text",
                )
            ]
        )
    return blocks
