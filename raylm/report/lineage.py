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
    """The record in `folder`, or None when there is none or it is not one (cut short, edited by hand)."""
    from raylm.runtime import storage

    text = storage.read_text(folder, NAME)
    try:
        record = json.loads(text) if text is not None else None
    except ValueError:
        return None
    return record if _well_formed(record) else None


def _well_formed(record) -> bool:
    if not isinstance(record, dict) or not isinstance(record.get("stages"), dict):
        return False
    if not isinstance(record.get("pipeline", ""), str) or not isinstance(record.get("output", ""), str):
        return False
    for stage in record["stages"].values():
        fields = ("output", "artifact", "artifact_type", "hash", "status", "kind")
        if not isinstance(stage, dict) or not all(isinstance(stage.get(k), str | None) for k in fields):
            return False
        parents = stage.get("parents", [])
        if not isinstance(parents, list) or not all(
            isinstance(p, dict) and isinstance(p.get("stage"), str) for p in parents
        ):
            return False
        if not isinstance(stage.get("inputs", {}), dict) or not isinstance(stage.get("artifacts", {}), dict):
            return False
    return True


def write(folder: str, record: dict) -> None:
    """Write the record whole: locally a new file renamed over the old one (a kill never leaves half)."""
    import os

    from raylm.runtime import storage

    text = json.dumps(record, indent=2)
    if storage.is_uri(folder):
        storage.write_text(folder, NAME, text)
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    partial = Path(folder) / f".{NAME}.{os.getpid()}.partial"
    partial.write_text(text)
    os.replace(partial, Path(folder) / NAME)


def new(job) -> dict:
    return {"pipeline": job.run_name, "output": absolute(job.output.path), "stages": {}}


def stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def absolute(path: str) -> str:
    """A local path made absolute (a record read from elsewhere must still find it); a URI as it is."""
    from raylm.runtime import storage

    return path if storage.is_uri(path) else str(Path(path).expanduser().resolve())


def relocated(record: dict, folder: str) -> dict:
    """The record with the paths under the pipeline's recorded output moved to `folder`, where its
    lineage.json was found (a pipeline folder copied or moved since it ran)."""
    old = (record.get("output") or "").rstrip("/")
    root = absolute(folder).rstrip("/")
    if not old or old == root:
        return record

    def move(value):
        if isinstance(value, str) and (value == old or value.startswith(old + "/")):
            return root + value[len(old) :]
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        return value

    return {**move(record), "output": root}


def find(path: str) -> tuple[dict, str | None] | None:
    """(the lineage record naming `path`, the stage that produced it), looking in `path` and upwards; a
    pipeline's own folder gives its record and no stage."""
    from raylm.runtime import storage

    target = absolute(path).rstrip("/")
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
        if _is_root(record, folder):
            record = relocated(record, folder)
            if absolute(folder).rstrip("/") == target:
                return record, None
        for name, stage in record["stages"].items():
            produced = [stage.get("artifact"), *(stage.get("artifacts") or {}).values(), stage.get("output")]
            for p in produced:
                if isinstance(p, str) and (target == p.rstrip("/") or target.startswith(p.rstrip("/") + "/")):
                    return record, name
    return None


def _is_root(record: dict, folder: str) -> bool:
    """Whether `folder` holds the pipeline's own record, not a stage's copy of it."""
    outputs = {s["output"].rstrip("/") for s in record["stages"].values() if isinstance(s.get("output"), str)}
    return absolute(folder).rstrip("/") not in outputs


def chain(record: dict, stage: str | None) -> list[str]:
    """`stage` and every stage it read from, directly or not, the earliest first (every stage, for no
    stage); a circle in a hand-edited record ends where it closes."""
    stages = record["stages"]
    seen: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in visiting or name not in stages:
            return
        visiting.add(name)
        for parent in stages[name].get("parents", []):
            visit(parent["stage"])
        seen.append(name)

    for name in [stage] if stage is not None else list(stages):
        visit(name)
    return seen


def describe(record: dict, stage: str | None) -> list[str]:
    """The printed chain: one block per stage, the earliest first."""
    lines = [f"pipeline {record.get('pipeline', '?')} ({record.get('output', '?')})"]
    for name in chain(record, stage):
        s = record["stages"][name]
        lines.append(
            f"{name} ({s.get('kind')}, spec {(s.get('hash') or '?')[:12]}, {s.get('status')}, "
            f"{s.get('started', '?')} -> {s.get('ended', '?')})"
        )
        if s.get("artifact"):
            lines.append(f"    artifact  {s['artifact']} ({s.get('artifact_type')})")
        for parent in s.get("parents", []):
            lines.append(f"    read      {parent.get('artifact')} (from {parent['stage']})")
        for field, path in (s.get("inputs") or {}).items():
            lines.append(f"    read      {path} ({field})")
        metrics = s.get("metrics") if isinstance(s.get("metrics"), dict) else {}
        if metrics:
            lines.append("    metrics   " + ", ".join(f"{k} {short(v)}" for k, v in metrics.items()))
    return lines


def short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
