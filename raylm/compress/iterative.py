"""Iterative magnitude pruning with weight rewinding (the lottery-ticket procedure): round r prunes
each layer of the last trained model to 1 - (1 - sparsity)^(r / rounds) by magnitude (the weights
already pruned are zero, so they stay pruned), rewinds every weight to the rewind point with the
pruned ones zero, and retrains that with the zeros held (raylm/compress/retrain.py).

    raylm run jobs/prune-iterative.yaml

Each round leaves two folders in `<output>.work/`: `round-<r>/start` (the rewound, masked weights)
and `round-<r>/run` (its training run: model/, metrics.jsonl, checkpoints). A rerun continues from
the first round that is not finished.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from raylm.compress import retrain
from raylm.compress.inputs import check_causal_lm
from raylm.methods.unimported import save_pretrained

SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")


def problems(job) -> list[tuple[str, str]]:
    method = job.method
    found = retrain.problems(job, method.retrain, "method.retrain")
    if method.rewind == "init":
        if initial_model(job) is None:
            found.append(
                (
                    "method.rewind",
                    'rewind "init" rebuilds the initialization of the raylm pretraining run the model belongs '
                    "to; this model folder is not inside one: give a folder of its early weights",
                )
            )
        return found
    rewind = Path(method.rewind).expanduser()
    wrong = check_causal_lm(rewind, "method.rewind")
    if wrong:
        return found + wrong
    import json

    theirs = json.loads((rewind / "config.json").read_text())
    ours = json.loads((Path(job.model.path).expanduser() / "config.json").read_text())
    differ = [k for k in SHAPE_KEYS if theirs.get(k) != ours.get(k)]
    if differ:
        found.append(
            ("method.rewind", f"{rewind} is not the same model's shape (differs in {', '.join(differ)})")
        )
    return found


def initial_model(job) -> dict | None:
    """The model section the model's pretraining run started from, and its seed, if it is a run."""
    recorded = Path(job.model.path).expanduser().parent / "spec.yaml"
    if not recorded.exists():
        return None
    spec = yaml.safe_load(recorded.read_text()) or {}
    if spec.get("kind") != "pretrain" or not isinstance(spec.get("model"), dict):
        return None
    return {"model": spec["model"], "seed": (spec.get("train") or {}).get("seed", 0)}


def run_rounds(job) -> tuple[Path, list[dict]]:
    """Every round, in order (finished ones reused); (the last round's trained model, per-round facts)."""
    from raylm.compress import remote

    work = retrain.work_folder(job)
    trained = Path(job.model.path).expanduser()
    rounds = []
    for r in range(1, job.method.rounds + 1):
        target = job.method.round_sparsity(r)
        start, run = work / f"round-{r}" / "start", work / f"round-{r}" / "run"
        print(f"[raylm] round {r}/{job.method.rounds}: prune to {target:.1%}, rewind, retrain", flush=True)
        if not (start / "config.json").exists():
            remote.run(job, rewind_task, str(trained), str(start), target, initial_model(job))
        trained, summary = retrain.retrain(job, start, run, job.method.retrain, f"round-{r}")
        metrics = summary.get("metrics", {})
        rounds.append(
            {"round": r, "sparsity": round(target, 6), "val_ppl": metrics.get("val_ppl"), "run": str(run)}
        )
    return trained, rounds


def rewind_task(spec: dict, trained: str, start: str, sparsity: float, initial: dict | None) -> None:
    """On a Ray worker: masks from the trained model's magnitudes, applied to the rewound weights."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm.compress.sparsity import mask_lowest
    from raylm.methods.blocks import prunable
    from raylm.planning.models import build_model
    from raylm.runtime.startup_gc import after_startup
    from raylm.spec.compress import PruneJob
    from raylm.spec.sections import ModelSpec

    after_startup()  # Python's collection thresholds while the models' tensors live
    job = PruneJob(**spec)
    torch.set_num_threads(max(1, int(job.resources.cpus)))
    tokenizer = AutoTokenizer.from_pretrained(trained)
    model = AutoModelForCausalLM.from_pretrained(trained, use_safetensors=True)
    if (
        job.method.rewind == "init"
    ):  # the run's first weights: its model section and seed, as its workers built them
        rewound = build_model(
            ModelSpec(**initial["model"]), len(tokenizer), tokenizer=tokenizer, seed=initial["seed"]
        )
    else:
        rewound = AutoModelForCausalLM.from_pretrained(job.method.rewind, use_safetensors=True)
    layers = prunable(rewound)
    with torch.no_grad():
        for name, layer in prunable(model).items():
            pruned = mask_lowest(layer.weight.abs(), sparsity, None, per_row=False)
            layers[name].weight[pruned] = 0
    rewound.generation_config = model.generation_config
    partial = Path(start).parent / f".{Path(start).name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    save_pretrained(rewound, str(partial))
    tokenizer.save_pretrained(str(partial))
    partial.rename(start)
