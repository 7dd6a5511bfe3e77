"""Checks that need the filesystem, run before any Ray worker starts (and by `raylm validate`)."""

from __future__ import annotations

from pathlib import Path


def check_model_folder(path: str, where: str, marker: str) -> list[tuple[str, str]]:
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / marker).exists():
            return [(where, f"{path} has no {marker}: not a Hugging Face folder")]
        return []
    if folder.is_file():
        return [(where, f"{path} is a file, not a Hugging Face folder (a GGUF file is served, evaluated or "
                        "generated from, not trained or compressed: give the model it was exported from)")]  # fmt: skip
    from raylm.planning.models import looks_like_hub_id

    if looks_like_hub_id(path):
        return []  # a hub id: resolved (or refused, when offline) by transformers at load time
    return [(where, f"{path} does not exist (a local folder, or a hub id like org/name)")]


def check_training_inputs(job) -> list[tuple[str, str]]:
    """What every training kind reads besides its data: the model and tokenizer folders, and a
    DeepSpeed config file."""
    problems = []
    if job.model.path is not None:
        problems += check_model_folder(job.model.path, "model.path", "config.json")
    if job.tokenizer.path is not None:
        problems += check_model_folder(job.tokenizer.path, "tokenizer.path", "tokenizer_config.json")
    return problems + check_strategy_files(job.strategy) + check_logging(job.logging, job.output.path)


def check_logging(logging, output: str) -> list[tuple[str, str]]:
    """MLflow's default store is a SQLite file in the run folder, which a bucket is not; W&B online
    needs credentials here (its workers would fail at their first step otherwise)."""
    import os

    from raylm.runtime.storage import is_uri

    problems = []
    if (
        logging.mlflow is not None
        and logging.mlflow.tracking_uri is None
        and not os.environ.get("MLFLOW_TRACKING_URI")
        and is_uri(output)
    ):
        problems.append(
            (
                "logging.mlflow.tracking_uri",
                f"the output {output} is a storage URI, which cannot hold MLflow's default SQLite store: "
                "set tracking_uri (or MLFLOW_TRACKING_URI) to an MLflow server, http://host:5000 (a local "
                ".db file serves one machine only: rank 0 logs from its own node)",
            )
        )
    if logging.wandb is None or logging.wandb.mode != "online":
        return problems
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if os.environ.get("WANDB_API_KEY") or (netrc.is_file() and "api.wandb.ai" in netrc.read_text()):
        return problems
    return problems + [
        (
            "logging.wandb.mode",
            "online needs W&B credentials: set WANDB_API_KEY (or run `wandb login`), or use mode: offline",
        )
    ]


def check_finetune(job) -> list[tuple[str, str]]:
    """What needs the model: a tokenizer source, target modules that exist, a chat template."""
    from raylm.data.tokenizer import load_tokenizer

    if job.model.path is None and job.tokenizer.path is None:
        return [("tokenizer.path", "a model built from an architecture needs tokenizer.path")]
    problems = _check_targets(job)
    if job.data.format == "chat" and job.data.chat_template is None:
        tokenizer = load_tokenizer(
            job.tokenizer.path or job.model.path, job.model.revision, job.model.trust_remote_code
        )
        if not tokenizer.chat_template:
            problems.append(
                ("data.chat_template", "the tokenizer has no chat template: give one (a Jinja string) here")
            )
    return problems


def _check_targets(job) -> list[tuple[str, str]]:
    """Module names the method targets must exist in the model (built on the meta device: no memory)."""
    from raylm.methods.lora import ALL_LINEAR
    from raylm.planning.models import meta_model, model_config

    method = job.method
    wanted = {
        "target_modules": getattr(method, "target_modules", None),
        "feedforward_modules": getattr(method, "feedforward_modules", None),
        "modules_to_save": getattr(method, "modules_to_save", None) or None,
    }
    if not any(isinstance(v, list) for v in wanted.values()) and method.name != "freeze":
        return []
    model = meta_model(model_config(job))
    names = [name for name, _ in model.named_modules() if name]
    problems = []
    for field, targets in wanted.items():
        if not isinstance(targets, list) or targets == ALL_LINEAR:
            continue
        absent = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if absent:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names if "." in n})
            problems.append(
                (
                    f"method.{field}",
                    f"no module named {', '.join(map(repr, absent))} in this model; its modules: {', '.join(leaves)}",
                )
            )
    if method.name == "freeze":
        from raylm.methods.blocks import transformer_blocks

        blocks = len(transformer_blocks(model))
        if method.layers > blocks:
            problems.append(
                ("method.layers", f"the model has {blocks} transformer blocks, fewer than {method.layers}")
            )
    return problems


def check_strategy_files(strategy) -> list[tuple[str, str]]:
    import json

    path = getattr(strategy, "config", None)
    if not isinstance(path, str):
        return []
    try:
        loaded = strategy.override()
    except OSError as err:
        return [("strategy.config", f"cannot read {path}: {err.strerror}")]
    except json.JSONDecodeError as err:
        return [("strategy.config", f"{path} is not valid JSON: {err}")]
    if not isinstance(loaded, dict):
        return [("strategy.config", f"{path} must hold a JSON object")]
    from raylm.spec.strategies import DEEPSPEED_OWNED_KEYS

    owned = [k for k in DEEPSPEED_OWNED_KEYS if k in loaded]
    if owned:
        return [
            ("strategy.config", f"{path} sets {', '.join(owned)}: raylm sets these from train.*; remove them")
        ]
    return []
