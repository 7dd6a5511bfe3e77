"""lineage.json: what a pipeline's stages produced and from what; `raylm lineage PATH` prints the chain
behind any artifact (a model folder, an adapter, a GGUF file) a pipeline wrote.

    raylm lineage runs/chain/sft/adapter

The pipeline writes lineage.json into its output after every stage, and a copy into each stage's output,
so an artifact finds its record by looking upwards from where it lies (a folder or a storage URI).
"""

from __future__ import annotations

import json
import time
from pathlib import Path, PurePosixPath

NAME = "lineage.json"


def read(folder: str) -> dict | None:
    from raylm.runtime import storage

    text = storage.read_text(folder, NAME)
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def write(folder: str, record: dict) -> None:
    from raylm.runtime import storage

    storage.write_text(folder, NAME, json.dumps(record, indent=2))


def new(job) -> dict:
    return {"pipeline": job.run_name, "output": job.output.path, "stages": {}}


def stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def find(path: str) -> tuple[dict, str] | None:
    """(the lineage record naming `path`, the stage that produced it), looking in `path` and upwards."""
    from raylm.runtime import storage

    target = normal(path)
    if storage.is_uri(path):
        scheme, _, rest = path.partition("://")
        parts = PurePosixPath(rest.rstrip("/"))
        folders = [f"{scheme}://{p}" for p in (parts, *parts.parents) if str(p) not in (".", "/")]
    else:
        here = Path(path).expanduser().resolve()
        folders = [str(p) for p in (here, *here.parents)]
    for folder in folders:
        record = read(folder)
        if record is None:
            continue
        for name, stage in record.get("stages", {}).items():
            produced = [stage.get("artifact"), *(stage.get("artifacts") or {}).values(), stage.get("output")]
            if any(
                p and (normal(p) == target or target.startswith(normal(p).rstrip("/") + "/"))
                for p in produced
            ):
                return record, name
    return None


def normal(path: str) -> str:
    from raylm.runtime import storage

    return path.rstrip("/") if storage.is_uri(path) else str(Path(path).expanduser().resolve())


def chain(record: dict, stage: str) -> list[str]:
    """`stage` and every stage it read from, directly or not, the earliest first."""
    stages = record["stages"]
    seen: list[str] = []

    def visit(name: str) -> None:
        if name in seen or name not in stages:
            return
        for parent in stages[name].get("parents", []):
            visit(parent["stage"])
        seen.append(name)

    visit(stage)
    return seen


def describe(record: dict, stage: str) -> list[str]:
    """The printed chain: one block per stage, the earliest first."""
    lines = [f"pipeline {record['pipeline']} ({record['output']})"]
    for name in chain(record, stage):
        s = record["stages"][name]
        lines.append(
            f"{name} ({s['kind']}, spec {s['hash'][:12]}, {s.get('status')}, {s.get('started', '?')} -> {s.get('ended', '?')})"
        )
        if s.get("artifact"):
            lines.append(f"    artifact  {s['artifact']} ({s.get('artifact_type')})")
        for parent in s.get("parents", []):
            lines.append(f"    read      {parent['artifact']} (from {parent['stage']})")
        for field, path in (s.get("inputs") or {}).items():
            lines.append(f"    read      {path} ({field})")
        metrics = s.get("metrics") or {}
        if metrics:
            lines.append("    metrics   " + ", ".join(f"{k} {short(v)}" for k, v in metrics.items()))
    return lines


def short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
