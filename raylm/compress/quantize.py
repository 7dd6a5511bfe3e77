"""Driver of `kind: quantize`: post-training quantization as one Ray task, measured before and after.

    raylm run jobs/quantize-nf4.yaml
    raylm run jobs/quantize-nf4.yaml --set method=gguf --set output=runs/quickstart-gguf
    raylm run jobs/quantize-gptq.yaml                   # needs pip install 'raylm[gptq]'

The driver reads held-out blocks and prompts (and GPTQ's calibration blocks) from the data (Ray Data,
as pretraining packs them); the
task (on a GPU worker when `resources.use_gpu`) measures the original model, writes the quantized one
into a staging folder, reloads it with its own library, measures it the same way, and only then moves
the folder to `output` with summary.json. A failure leaves nothing half-written at `output`; running
the same spec again after success returns the recorded summary.
"""

from __future__ import annotations

from pathlib import Path

from raylm.compress import inputs, remote, staging
from raylm.spec.compress import QuantizeJob

WRITERS = {
    "nf4": "bnb",
    "fp4": "bnb",
    "int8": "bnb",
    "gptq": "gptq",
    "gguf": "gguf",
}  # method -> raylm.compress.<module>


class Quantize:
    """kind: quantize (a raylm.kinds.JobKind)."""

    def preflight(self, job: QuantizeJob) -> list[tuple[str, str]]:
        problems = inputs.check_inputs(job)
        if any(where == "model.path" for where, _ in problems):
            return problems  # nothing more to learn from a folder that is not a model
        source = Path(job.model.path).expanduser()
        if job.method.name == "gguf":
            from raylm.compress.gguf import problems as gguf_problems

            problems += [("method", reason) for reason in gguf_problems(source)]
        if job.method.name == "gptq":
            from transformers import AutoConfig

            from raylm.compress.gptq import problems as gptq_problems

            model_type = AutoConfig.from_pretrained(str(source)).model_type
            problems += [("method", reason) for reason in gptq_problems(model_type)]
        return problems + staging.check_output(job)

    def run(self, job: QuantizeJob) -> dict:
        output = job.output.path
        recorded = staging.finished(job)
        if recorded is not None:
            print(f"[raylm] {output} already holds this quantization; its summary:", flush=True)
            return recorded
        blocks, prompts = inputs.held_out(job)
        calibration = inputs.calibration(job) if job.method.name == "gptq" else []
        print(
            f"[raylm] quantize {job.model.path} with {describe(job.method)}: {len(blocks)} held-out blocks, "
            f"{len(prompts)} prompts" + (f", {len(calibration)} calibration blocks" if calibration else ""),
            flush=True,
        )
        return remote.run(job, quantize_task, blocks, prompts, calibration)


def describe(method) -> str:
    if method.name == "gguf":
        return f"gguf {method.type}"
    if method.name == "int8":
        return "bitsandbytes int8"
    if method.name == "gptq":
        group = "per row" if method.group_size == -1 else f"groups of {method.group_size}"
        return f"gptq {method.bits}-bit ({group}{', act-order' if method.desc_act else ''})"
    return f"bitsandbytes {method.name}" + (" (double quantization)" if method.double_quant else "")


def quantize_task(spec: dict, blocks: list[list[int]], prompts: list[list[int]], calibration) -> dict:
    """On the Ray worker: measure, quantize into a staging folder, reload, measure, publish."""
    import importlib

    from raylm.compress import measure
    from raylm.planning.models import build_model

    job, device, stage = remote.start(QuantizeJob, spec)
    source, output = Path(job.model.path).expanduser(), job.output.path.rstrip("/")  # a folder or a URI

    original = build_model(job.model, vocab_size=0).to(device)
    before = measure.model_measures(original, blocks, prompts, job.measure.new_tokens)
    del original

    writer = importlib.import_module(f"raylm.compress.{WRITERS[job.method.name]}")
    if job.method.name == "gguf":
        named = source.parent if source.name in ("model", "merged") else source  # runs/<name>/model
        artifact = stage / f"{named.name}-{job.method.type}.gguf"
        writer.write(source, artifact, job.method.type)
        quantized = writer.load(artifact).to(device)
        kept = []
    elif job.method.name == "gptq":
        artifact = writer.write(source, stage, job.method, device, calibration)
        quantized = writer.load(artifact, device)
        kept = []
    else:
        kept = writer.kept_in_full_precision(source, job.method, device)
        artifact = writer.write(source, stage, job.method, device, kept)
        quantized = writer.load(artifact, device)
    after = measure.model_measures(
        quantized, blocks, prompts, job.measure.new_tokens, reference=before.pop("continuations")
    )

    bits = measure.bits_per_parameter(
        measure.saved_tensors(source), measure.saved_tensors(artifact), job.method.name == "gguf"
    )
    size = {"original": measure.weights_bytes(source), "quantized": measure.weights_bytes(artifact)}
    summary = {
        "kind": "quantize",
        "method": job.method.model_dump(mode="json"),
        "model": job.model._source or str(source),  # a fetched model: the URI it came from
        "artifact": f"{output}/{artifact.name}" if artifact != stage else output,
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
        "generated": {
            "prompts": len(prompts),
            "new_tokens": measure.new_tokens(quantized, prompts, job.measure.new_tokens),
        },
        "measured_on": device
        + (" (GGUF de-quantized to float32 by transformers)" if job.method.name == "gguf" else ""),
    }
    staging.publish(stage, output, spec, summary)
    return summary
