"""`raylm runs [DIR]`: the run folders under DIR (default runs/), one line each: kind, name, status,
steps, the metric that matters for its kind, its artifact and its age.

    raylm runs                 # runs/
    raylm runs s3://bucket/runs

A folder with summary.json is complete (a search that completed no trial: failed); one with spec.yaml
and no summary.json is running when something in it was written in the last two minutes, else
interrupted (it resumes when its spec is run again). A pipeline's stages are listed under it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

RECENT_S = 120


def describe(run: str) -> dict | None:
    """What `raylm runs` shows of one folder, or None when it is not a raylm run."""
    from raylm.runtime import storage

    run = run.rstrip("/")
    summary = _read_json(run, "summary.json")
    spec = _read_yaml(run, "spec.yaml")
    summary = summary if isinstance(summary, dict) else None
    spec = spec if isinstance(spec, dict) else None
    lineage = _read_json(run, "lineage.json") if summary is None and spec is None else None
    lineage = lineage if isinstance(lineage, dict) and isinstance(lineage.get("stages"), dict) else None
    if summary is None and not isinstance(spec, dict) and lineage is None:
        return None
    kind = (summary or {}).get("kind") or (spec or {}).get("kind") or ("pipeline" if lineage else "?")
    name = Path(run).name  # the folder: what a user types next
    age = _age(run)
    if lineage is not None:  # a pipeline without its summary: running while one of its stages is
        running = [
            s.get("output")
            for s in lineage.get("stages", {}).values()
            if s.get("status") in ("running", "serving")
        ]
        stage_ages = [a for out in running if out and (a := _age(out)) is not None]
        age = min([age, *stage_ages], key=lambda a: float("inf") if a is None else a)
    if summary is not None:
        status = "failed" if kind == "tune" and summary.get("best") is None else "complete"
    elif age is not None and age < RECENT_S:
        status = "running"
    else:
        status = "interrupted"
    rows = []
    for line in (storage.read_text(run, "metrics.jsonl") or "").splitlines()[-1:]:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    steps = (summary or {}).get("steps") or (rows[-1].get("step") if rows else None)
    return {
        "kind": kind,
        "name": name,
        "status": status,
        "steps": steps,
        "metric": _headline(summary or {}, rows),
        "artifact": _artifact(summary or {}),
        "age": age,
        "path": run,
    }


def _headline(summary: dict, rows: list[dict]) -> str | None:
    kind = summary.get("kind")
    if kind == "tune":
        best = summary.get("best") or {}
        return f"best {summary.get('metric')} {_fmt(best.get(summary.get('metric')))}" if best else None
    if kind in ("quantize", "prune"):
        after = "quantized" if kind == "quantize" else "pruned"
        ppl = summary.get("perplexity") or {}
        return f"perplexity {_fmt(ppl.get('original'))} -> {_fmt(ppl.get(after))}"
    if kind == "evaluate":
        models, metrics = summary.get("models") or [], summary.get("metrics") or []
        if models and metrics:
            return f"{metrics[0]}: " + ", ".join(f"{m['model']} {_fmt(m.get(metrics[0]))}" for m in models)
        return None
    if kind == "pipeline":
        stages = summary.get("stages") or {}
        return f"{sum(s.get('status') == 'complete' for s in stages.values())}/{len(stages)} stages complete"
    exact = (summary.get("exact_match") or {}).get("exact_match")
    rewards = (summary.get("metrics") or {}).get("reward_accuracy")
    if rewards is not None:  # a preference run
        return f"reward accuracy {_fmt(rewards)}" + (
            f", exact match {_fmt(exact)}" if exact is not None else ""
        )
    if exact is not None:
        return f"exact match {_fmt(exact)}"
    metrics = summary.get("metrics") or (rows[-1] if rows else {})
    return f"val_loss {_fmt(metrics['val_loss'])}" if "val_loss" in metrics else None


def _artifact(summary: dict) -> str | None:
    if summary.get("kind") == "tune":
        return (summary.get("best") or {}).get("artifact")
    if summary.get("kind") == "pipeline":
        return summary.get("lineage")
    return (
        summary.get("artifact") or summary.get("model")
        if summary.get("kind") != "evaluate"
        else summary.get("output")
    )


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _read_json(run: str, name: str):
    from raylm.runtime import storage

    try:
        text = storage.read_text(run, name)
        return json.loads(text) if text is not None else None
    except (OSError, ValueError):
        return None


def _read_yaml(run: str, name: str):
    from raylm.runtime import storage

    try:
        text = storage.read_text(run, name)
        return yaml.safe_load(text) if text is not None else None
    except (OSError, yaml.YAMLError):
        return None


def _age(run: str) -> float | None:
    """Seconds since the newest of the run's own record files changed."""
    from raylm.runtime import storage

    if storage.is_uri(run):
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(run)
        infos = fs.get_file_info(
            [f"{root}/{n}" for n in ("summary.json", "metrics.jsonl", "spec.yaml", "lineage.json")]
        )
        times = [i.mtime.timestamp() for i in infos if i.type == pafs.FileType.File and i.mtime is not None]
    else:
        times = [
            (Path(run) / n).stat().st_mtime
            for n in ("summary.json", "metrics.jsonl", "spec.yaml", "lineage.json")
            if (Path(run) / n).is_file()
        ]
    return time.time() - max(times) if times else None


def listing(folder: str) -> list[dict]:
    """Every run directly under `folder` (and a pipeline's stages after it), the newest first."""
    from raylm.runtime import storage

    found = []
    for name in storage.subfolders(folder.rstrip("/")):
        info = _described(f"{folder.rstrip('/')}/{name}")
        if info is not None:
            found.append(info)
    found.sort(key=lambda r: r["age"] if r["age"] is not None else float("inf"))
    rows = []
    for info in found:
        rows.append(info)
        if info["kind"] == "pipeline":
            for name in storage.subfolders(info["path"]):
                stage = _described(f"{info['path']}/{name}")
                if stage is not None:
                    rows.append({**stage, "name": f"  {info['name']}/{name}"})
    return rows


def _described(run: str) -> dict | None:
    """describe(run), or a row saying its records cannot be read (edited by hand, cut short)."""
    try:
        info = describe(run)
    except (AttributeError, TypeError, KeyError, ValueError, IndexError) as err:
        info = {"kind": "?", "status": f"unreadable ({type(err).__name__})", "steps": None}
        info |= {"metric": None, "artifact": None, "age": None, "path": run}
    if info is not None:  # every cell as text
        info = {**info, "name": Path(run).name, "kind": str(info["kind"])}
        for key in ("metric", "artifact"):
            info[key] = None if info[key] is None else str(info[key])
    return info


def age_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"
