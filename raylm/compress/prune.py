"""Driver of `kind: prune`: magnitude, Wanda (unstructured or N:M) and structured pruning as one Ray
task, iterative magnitude pruning with rewinding (raylm/compress/iterative.py), and an optional
recovery training with the zeros held (raylm/compress/retrain.py); measured before and after.

    raylm run jobs/prune-wanda.yaml
    raylm run jobs/prune-wanda.yaml --set method.pattern=2:4 --set output=runs/quickstart-wanda-2-4
    raylm run jobs/prune-iterative.yaml

Like quantization (raylm/compress/quantize.py): held-out blocks and prompts (and, for Wanda, training
blocks for calibration) are read on the driver; the task measures the original, prunes (or takes the
retrained model), saves a safetensors folder into a staging folder, reloads it with transformers,
counts the sparsity reached from the saved tensors, measures, and only then moves the folder to
`output`. Retraining runs live in `<output>.work/`; a rerun resumes them.
"""

from __future__ import annotations

from pathlib import Path

from raylm.compress import inputs, iterative, remote, retrain, staging
from raylm.methods.blocks import prunable
from raylm.methods.unimported import save_pretrained
from raylm.spec.compress import PruneJob


class Prune:
    """kind: prune (a raylm.kinds.JobKind)."""

    def preflight(self, job: PruneJob) -> list[tuple[str, str]]:
        from raylm.runtime import storage

        problems = inputs.check_inputs(job)
        if problems:
            return problems
        if job.method.name == "iterative":
            problems += iterative.problems(job)
        if job.recover is not None:
            problems += retrain.problems(job, job.recover, "recover")
        if storage.is_uri(job.output.path) and (job.method.name == "iterative" or job.recover is not None):
            problems.append(
                (
                    "output",
                    "pruning with retraining (iterative rounds, recover) keeps its training runs in a work "
                    "folder beside the output: give a local or shared output path (a bucket takes the "
                    "one-shot methods)",
                )
            )
        return problems + method_problems(job) + staging.check_output(job)

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
        if job.method.name == "iterative":
            trained, rounds = iterative.run_rounds(job)
            return remote.run(
                job, prune_task, blocks, prompts, [], {"trained": str(trained), "rounds": rounds}
            )
        if job.recover is None:
            return remote.run(job, prune_task, blocks, prompts, calibration, {})
        pruned = retrain.work_folder(job) / "pruned"
        if not (pruned / "config.json").exists():
            remote.run(job, prune_only_task, calibration, str(pruned))
        print(f"[raylm] recovery training of {pruned}, its zeros held", flush=True)
        trained, summary = retrain.retrain(
            job, pruned, retrain.work_folder(job) / "recover", job.recover, "recover"
        )
        facts = {"trained": str(trained), "pruned": str(pruned), "recovery_run": str(trained.parent)}
        return remote.run(job, prune_task, blocks, prompts, [], facts)


def describe(method) -> str:
    if method.name == "iterative":
        return (
            f"iterative magnitude pruning ({method.sparsity:.0%} in {method.rounds} round(s), rewinding to "
            f"{method.rewind})"
        )
    if method.name == "structured":
        return (
            f"structured pruning ({method.heads:.0%} of head groups, {method.channels:.0%} of MLP channels)"
        )
    shape = f"{method.pattern} semi-structured" if method.pattern else f"{method.sparsity:.0%} unstructured"
    return f"{method.name} ({shape})"


def method_problems(job) -> list[tuple[str, str]]:
    """What the method needs of the model's shapes, checked on the meta device."""
    from transformers import AutoConfig

    from raylm.compress import structured
    from raylm.planning.models import meta_model

    model = meta_model(AutoConfig.from_pretrained(job.model.path))
    if job.method.name == "structured":
        return [("method", reason) for reason in structured.problems(model)]
    layers = prunable(model)
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


def apply_method(model, method, calibration):
    """`model` pruned by a one-shot method (in place; structured pruning returns a smaller model)."""
    import torch

    from raylm.compress import sparsity
    from raylm.compress.structured import prune_structured

    if method.name == "structured":
        return prune_structured(model, method.heads, method.channels)
    if method.name == "wanda":
        sparsity.prune_wanda(model, torch.tensor(calibration), method.sparsity, method.n_m)
    else:
        sparsity.prune_magnitude(model, method.sparsity, method.n_m)
    return model


def prune_only_task(spec: dict, calibration, folder: str) -> None:
    """On a Ray worker: the one-shot pruned model, written to `folder` for its recovery training."""
    import shutil

    import torch
    from transformers import AutoTokenizer

    from raylm.planning.models import build_model
    from raylm.runtime.startup_gc import after_startup

    after_startup()  # Python's collection thresholds while the model's tensors live
    job = PruneJob(**spec)
    torch.set_num_threads(max(1, int(job.resources.cpus)))
    device = "cuda" if job.resources.use_gpu else "cpu"
    model = apply_method(build_model(job.model, vocab_size=0).to(device), job.method, calibration)
    partial = Path(folder).parent / f".{Path(folder).name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    save_pretrained(model, str(partial))
    AutoTokenizer.from_pretrained(job.model.path).save_pretrained(str(partial))
    partial.rename(folder)


def prune_task(spec: dict, blocks, prompts, calibration, retrained: dict) -> dict:
    """On the Ray worker: measure, prune (or take the retrained model: `retrained["trained"]`), save
    into a staging folder, reload, count, measure, publish."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm.compress import measure, sparsity
    from raylm.planning.models import build_model, count_parameters

    job, device, stage = remote.start(PruneJob, spec)
    source, output = Path(job.model.path).expanduser(), job.output.path.rstrip("/")  # a folder or a URI

    model = build_model(job.model, vocab_size=0).to(device)
    before = measure.model_measures(model, blocks, prompts, job.measure.new_tokens)
    parameters_before = count_parameters(model)[1]
    before_shape = {"heads": model.config.num_attention_heads, "channels": model.config.intermediate_size}
    names = [f"{name}.weight" for name in prunable(model)]
    method = job.method
    if retrained:
        generation = model.generation_config
        model = AutoModelForCausalLM.from_pretrained(retrained["trained"], use_safetensors=True)
        model.generation_config = generation  # the original's (a training run saves use_cache off)
    else:
        model = apply_method(model, method, calibration)
    save_pretrained(model, str(stage))
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
        "model": job.model._source or str(source),  # a fetched model: the URI it came from
        "artifact": output,
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
    if "pruned" in retrained:  # the one-shot pruned model before its recovery training
        unrecovered = AutoModelForCausalLM.from_pretrained(retrained["pruned"], use_safetensors=True)
        summary["perplexity"]["before_recovery"] = round(
            measure.perplexity(unrecovered.to(device), blocks), 4
        )
        summary["recovery_run"] = retrained["recovery_run"]
    if "rounds" in retrained:
        summary["rounds"] = retrained["rounds"]
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
