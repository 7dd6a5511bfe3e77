"""Checks that need the filesystem, run before any Ray worker starts (and by `raylm validate`)."""

from __future__ import annotations

from pathlib import Path

from raylm.data import check_data
from raylm.spec import PretrainJob


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~")) and "://" not in path


def check_model_folder(path: str, where: str, marker: str) -> list[tuple[str, str]]:
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / marker).exists():
            return [(where, f"{path} has no {marker}: not a Hugging Face folder")]
        return []
    if _looks_like_hub_id(path):
        return []  # a hub id: resolved (or refused, when offline) by transformers at load time
    return [(where, f"{path} does not exist (a local folder, or a hub id like org/name)")]


def check_job(job: PretrainJob) -> list[tuple[str, str]]:
    problems = check_data(job.data)
    if job.model.path is not None:
        problems += check_model_folder(job.model.path, "model.path", "config.json")
    if job.tokenizer.path is not None:
        problems += check_model_folder(job.tokenizer.path, "tokenizer.path", "tokenizer_config.json")
    problems += check_strategy_files(job.strategy)
    return problems


def check_strategy_files(strategy) -> list[tuple[str, str]]:
    import json

    path = getattr(strategy, "config", None)
    if not isinstance(path, str):
        return []
    try:
        loaded = json.loads(Path(path).expanduser().read_text())
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
