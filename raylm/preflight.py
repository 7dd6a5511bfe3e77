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
    return problems
