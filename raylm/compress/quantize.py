"""Driver of `kind: quantize`: post-training quantization as one Ray task, measured before and after.

    raylm run jobs/quantize-nf4.yaml
    raylm run jobs/quantize-nf4.yaml --set method.name=gguf --set output=runs/tiny-gguf

The driver reads held-out blocks and prompts from the data (Ray Data, as pretraining packs them); the
task (on a GPU worker when `resources.use_gpu`) measures the original model, writes the quantized one
into a staging folder, reloads it with its own library, measures it the same way, and only then moves
the folder to `output` with summary.json. A failure leaves nothing half-written at `output`; running
the same spec again after success returns the recorded summary.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from raylm.spec import SpecError
from raylm.spec.compress import QuantizeJob

WRITERS = {"nf4": "bnb", "fp4": "bnb", "int8": "bnb", "gguf": "gguf"}  # method -> raylm.compress.<module>


class Quantize:
    """kind: quantize (a raylm.kinds.JobKind)."""

    def preflight(self, job: QuantizeJob) -> list[tuple[str, str]]:
        from raylm.data import check_data

        folder = Path(job.model.path).expanduser()
        problems = check_causal_lm(folder, "model.path")
        if problems:
            return problems
        if job.method.name == "gguf":
            from raylm.compress.gguf import problems as gguf_problems

            problems += [("method", reason) for reason in gguf_problems(folder)]
        data, where = held_out_data(job)
        if data is None:
            problems.append(("data", where))
        else:
            problems += [(f"{where}{p[len('data') :]}", what) for p, what in check_data(data)]
        problems += check_output(job)
        return problems

    def run(self, job: QuantizeJob) -> dict:
        import ray

        output = Path(job.output.path)
        recorded = finished(job)
        if recorded is not None:
            print(f"[raylm] {output} already holds this quantization; its summary:", flush=True)
            return recorded
        blocks, prompts = held_out(job)
        print(
            f"[raylm] quantize {job.model.path} with {describe(job.method)}: {len(blocks)} held-out blocks, "
            f"{len(prompts)} prompts",
            flush=True,
        )
        task = ray.remote(quantize_task).options(
            num_cpus=job.resources.cpus, num_gpus=1 if job.resources.use_gpu else 0
        )
        return ray.get(task.remote(job.model_dump(mode="json"), blocks, prompts))


def describe(method) -> str:
    if method.name == "gguf":
        return f"gguf {method.type}"
    if method.name == "int8":
        return "bitsandbytes int8"
    return f"bitsandbytes {method.name}" + (" (double quantization)" if method.double_quant else "")


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


def held_out_data(job) -> tuple[object | None, str]:
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


def held_out(job) -> tuple[list[list[int]], list[list[int]]]:
    """Validation blocks for perplexity and prompts (the starts of further blocks), tokenized and
    packed by the same Ray Data pipeline as pretraining."""
    from raylm.data import configure_ray_data, documents, packed_blocks
    from raylm.tokenizer import load_tokenizer

    configure_ray_data()  # the same blocks in the same order on every run
    data, _ = held_out_data(job)
    tokenizer = load_tokenizer(job.model.path)
    measure = job.measure
    wanted = max(measure.perplexity_blocks, measure.prompts)
    from ray.data.expressions import col

    rows = packed_blocks(documents(data), tokenizer, data).filter(expr=col("val")).take(wanted)
    blocks = [list(map(int, row["input_ids"])) for row in rows]
    if len(blocks) < 2:
        raise SpecError(
            [
                (
                    "data",
                    f"only {len(blocks)} held-out blocks of {data.seq_len} tokens: give more text or raise data.val_fraction",
                )
            ]
        )
    prompts = [b[: measure.prompt_tokens] for b in blocks[: measure.prompts]]  # held-out text too
    return blocks[: measure.perplexity_blocks], prompts


def check_output(job) -> list[tuple[str, str]]:
    output = Path(job.output.path)
    if not output.exists() or finished(job) is not None:
        return []
    if output.is_file() or any(output.iterdir()):
        return [("output", f"{output} already holds other files: choose a new output folder")]
    return []


def finished(job) -> dict | None:
    """The summary of an earlier run of exactly this spec at `output`, if there is one."""
    output = Path(job.output.path)
    try:
        recorded = yaml.safe_load((output / "spec.yaml").read_text())
        summary = json.loads((output / "summary.json").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return summary if recorded == job.model_dump(mode="json") else None


def quantize_task(spec: dict, blocks: list[list[int]], prompts: list[list[int]]) -> dict:
    """On the Ray worker: measure, quantize into a staging folder, reload, measure, publish."""
    import importlib
    import os

    import torch

    from raylm.compress import measure
    from raylm.models import build_model

    job = QuantizeJob(**spec)
    torch.set_num_threads(max(1, int(job.resources.cpus)))
    device = "cuda" if job.resources.use_gpu else "cpu"
    source, output = Path(job.model.path).expanduser(), Path(job.output.path)
    stage = output.parent / f".{output.name}.partial"
    shutil.rmtree(stage, ignore_errors=True)  # a staging folder is raylm's own: what a failure left
    stage.mkdir(parents=True)

    original = build_model(job.model, vocab_size=0).to(device)
    before = _measure(original, blocks, prompts, job)
    del original

    writer = importlib.import_module(f"raylm.compress.{WRITERS[job.method.name]}")
    if job.method.name == "gguf":
        named = source.parent if source.name in ("model", "merged") else source  # runs/<name>/model
        artifact = stage / f"{named.name}-{job.method.type}.gguf"
        writer.write(source, artifact, job.method.type)
        quantized = writer.load(artifact).to(device)
        kept = []
    else:
        kept = writer.kept_in_full_precision(source, job.method, device)
        artifact = writer.write(source, stage, job.method, device, kept)
        quantized = writer.load(artifact, device)
    after = _measure(quantized, blocks, prompts, job, reference=before.pop("continuations"))

    bits = measure.bits_per_parameter(
        measure.saved_tensors(source), measure.saved_tensors(artifact), job.method.name == "gguf"
    )
    size = {"original": measure.weights_bytes(source), "quantized": measure.weights_bytes(artifact)}
    summary = {
        "kind": "quantize",
        "method": job.method.model_dump(mode="json"),
        "model": str(source),
        "artifact": str(output / artifact.name) if artifact != stage else str(output),
        "weights_bytes": {**size, "ratio": round(size["quantized"] / size["original"], 4)},
        "bits_per_parameter": bits,
        "kept_full_precision": kept,
        "perplexity": {
            "original": before["perplexity"],
            "quantized": after["perplexity"],
            "blocks": len(blocks),
        },
        "greedy_agreement": after["agreement"],
        "tokens_per_s": {"original": before["tokens_per_s"], "quantized": after["tokens_per_s"]},
        "generated": {"prompts": len(prompts), "new_tokens": new_tokens(quantized, prompts, job)},
        "measured_on": device
        + (" (GGUF de-quantized to float32 by transformers)" if job.method.name == "gguf" else ""),
    }
    (stage / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (stage / "summary.json").write_text(json.dumps(summary, indent=2))
    if output.exists():
        output.rmdir()  # empty: checked before the job started
    os.replace(stage, output)
    return summary


def new_tokens(model, prompts, job) -> int:
    """measure.new_tokens, within the model's context after the longest prompt."""
    room = model.config.max_position_embeddings - max(len(p) for p in prompts)
    return max(1, min(job.measure.new_tokens, room))


def _measure(model, blocks, prompts, job, reference=None) -> dict:
    from raylm.compress import measure

    continuations, speed = measure.greedy(model, prompts, new_tokens(model, prompts, job))
    out = {
        "perplexity": round(measure.perplexity(model, blocks), 4),
        "tokens_per_s": round(speed, 2),
        "continuations": continuations,
    }
    if reference is not None:
        out["agreement"] = round(measure.agreement(model, prompts, reference), 4)
    return out
