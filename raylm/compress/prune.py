"""Driver of `kind: prune`: magnitude, Wanda (unstructured or N:M) and structured pruning as one Ray
task, measured before and after.

    raylm run jobs/prune-wanda.yaml
    raylm run jobs/prune-wanda.yaml --set method.pattern=2:4 --set output=runs/quickstart-wanda-2-4

Like quantization (raylm/compress/quantize.py): held-out blocks and prompts (and, for Wanda, training
blocks for calibration) are read on the driver; the task measures the original, prunes, saves a
safetensors folder into a staging folder, reloads it with transformers, counts the sparsity reached
from the saved tensors, measures, and only then moves the folder to `output`.
"""

from __future__ import annotations

from pathlib import Path

from raylm.compress import inputs, remote, staging
from raylm.spec.compress import PruneJob


class Prune:
    """kind: prune (a raylm.kinds.JobKind)."""

    def preflight(self, job: PruneJob) -> list[tuple[str, str]]:
        problems = inputs.check_inputs(job)
        if problems:
            return problems
        return method_problems(job) + staging.check_output(job)

    def run(self, job: PruneJob) -> dict:
        recorded = staging.finished(job)
        if recorded is not None:
            print(f"[raylm] {job.output.path} already holds this pruning; its summary:", flush=True)
            return recorded
        blocks, prompts = inputs.held_out(job)
        calibration = inputs.calibration(job) if job.method.name == "wanda" else []
        print(
            f"[raylm] prune {job.model.path} with {describe(job.method)}: {len(blocks)} held-out blocks, "
            f"{len(prompts)} prompts" + (f", {len(calibration)} calibration blocks" if calibration else ""),
            flush=True,
        )
        return remote.run(job, prune_task, blocks, prompts, calibration)


def describe(method) -> str:
    if method.name == "structured":
        return (
            f"structured pruning ({method.heads:.0%} of head groups, {method.channels:.0%} of MLP channels)"
        )
    shape = f"{method.pattern} semi-structured" if method.pattern else f"{method.sparsity:.0%} unstructured"
    return f"{method.name} ({shape})"


def method_problems(job) -> list[tuple[str, str]]:
    """What the method needs of the model's shapes, checked on the meta device."""
    from transformers import AutoConfig

    from raylm.compress import sparsity, structured
    from raylm.models import meta_model

    model = meta_model(AutoConfig.from_pretrained(job.model.path))
    if job.method.name == "structured":
        return [("method", reason) for reason in structured.problems(model)]
    layers = sparsity.prunable(model)
    if not layers:
        return [("method", f"found no linear layers inside {type(model).__name__}'s decoder blocks")]
    if job.method.n_m is not None:
        m = job.method.n_m[1]
        odd = [
            f"{name} ({layer.in_features} inputs)" for name, layer in layers.items() if layer.in_features % m
        ]
        if odd:
            return [
                (
                    "method.pattern",
                    f"{job.method.pattern} needs input features in multiples of {m}: {', '.join(odd[:3])}",
                )
            ]
    return []


def prune_task(spec: dict, blocks, prompts, calibration) -> dict:
    """On the Ray worker: measure, prune, save into a staging folder, reload, count, measure, publish."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm.compress import measure, sparsity
    from raylm.compress.structured import prune_structured
    from raylm.models import build_model, count_parameters

    job, device, stage = remote.start(PruneJob, spec)
    source, output = Path(job.model.path).expanduser(), Path(job.output.path)

    model = build_model(job.model, vocab_size=0).to(device)
    before = measure.model_measures(model, blocks, prompts, job.measure.new_tokens)
    parameters_before = count_parameters(model)[1]
    before_shape = {"heads": model.config.num_attention_heads, "channels": model.config.intermediate_size}
    names = [f"{name}.weight" for name in sparsity.prunable(model)]
    method = job.method
    if method.name == "structured":
        model = prune_structured(model, method.heads, method.channels)
    elif method.name == "wanda":
        sparsity.prune_wanda(model, torch.tensor(calibration), method.sparsity, method.n_m)
    else:
        sparsity.prune_magnitude(model, method.sparsity, method.n_m)
    model.save_pretrained(str(stage))
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(stage))
    del model

    pruned = AutoModelForCausalLM.from_pretrained(str(stage), use_safetensors=True).to(device)
    after = measure.model_measures(
        pruned, blocks, prompts, job.measure.new_tokens, reference=before.pop("continuations")
    )
    size = {"original": measure.weights_bytes(source), "pruned": measure.weights_bytes(stage)}
    summary = {
        "kind": "prune",
        "method": method.model_dump(mode="json"),
        "model": str(source),
        "artifact": str(output),
        "weights_bytes": {**size, "ratio": round(size["pruned"] / size["original"], 4)},
        "parameters": {"original": parameters_before, "pruned": count_parameters(pruned)[1]},
        "perplexity": {
            "original": before["perplexity"],
            "pruned": after["perplexity"],
            "blocks": len(blocks),
        },
        "greedy_agreement": after["agreement"],
        "tokens_per_s": {"original": before["tokens_per_s"], "pruned": after["tokens_per_s"]},
        "measured_on": device,
    }
    if method.name == "structured":
        config = pruned.config
        summary["removed"] = {
            "heads_per_layer": before_shape["heads"] - config.num_attention_heads,
            "channels_per_layer": before_shape["channels"] - config.intermediate_size,
        }
    else:  # sparsity reached, counted from the saved tensors
        saved = {}
        for file in stage.glob("*.safetensors"):
            saved.update(load_file(str(file)))
        per_layer = sparsity.layer_sparsity(saved, names)
        zeros = sum(per_layer[n] * saved[n].numel() for n in names)
        summary["sparsity"] = {
            "target": method.sparsity,
            "pruned_layers": round(zeros / sum(saved[n].numel() for n in names), 6),
            "min_layer": min(per_layer.values()),
            "max_layer": max(per_layer.values()),
            "layers": len(names),
        }
    staging.publish(stage, output, spec, summary)
    return summary
