"""A finished search's results: the trials table, the best spec and artifact, the curves, the summary.

Statuses: completed (every step run, artifact written), stopped (ended early by the scheduler),
rejected (did not fit by the memory estimate; never started), failed (after its retries), not started.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path, PurePosixPath

import yaml

from raylm.runtime import storage
from raylm.train.metrics import read_metrics


def trial_rows(grid, output: str, space, metric: str, mode: str, steps: int | None) -> list[dict]:
    """One row per trial of Tune's ResultGrid, read from the trial's run folder (or URI) under
    `output`."""
    by_tune_dir = {}
    for trial_id in storage.subfolders(f"{output}/trials"):
        folder = f"{output}/trials/{trial_id}"
        text = storage.read_text(folder, "trial.json")
        if text is not None:
            record = json.loads(text)
            by_tune_dir[PurePosixPath(str(record.get("tune_dir"))).name] = (folder, record)
    rows = []
    for result in grid:
        folder, record = by_tune_dir.get(PurePosixPath(str(result.path)).name, (None, None))
        config = result.config or {}
        overrides = record["overrides"] if record else space.overrides(config)
        row = {"trial_id": record["trial_id"] if record else result.metrics.get("trial_id")}
        row.update(parameters(space, config, overrides))
        curve = evaluations(folder, metric) if folder else []
        values = [v for _, v in curve]
        better = min if mode == "min" else max
        row.update(
            status=status(folder, result),
            attempts=record["attempts"] if record else 0,
            steps=last_step(folder) if folder else 0,
            planned_steps=steps,
            **{
                f"best_{metric}": better(values) if values else None,
                f"last_{metric}": values[-1] if values else None,
            },
            wall_s=result.metrics.get("time_total_s"),
            artifact=None,
            reason=None,
        )
        if row["status"] == "completed":
            row["artifact"] = json.loads(storage.read_text(folder, "summary.json")).get("artifact")
        elif row["status"] == "rejected":
            row["reason"] = json.loads(storage.read_text(folder, "rejected.json"))["reason"]
        elif row["status"] == "failed":
            row["reason"] = str(result.error).strip().splitlines()[0][:300] if result.error else None
        row["curve"] = curve
        rows.append(row)
    return sorted(rows, key=lambda r: str(r["trial_id"]))


def parameters(space, config: dict, overrides: dict) -> dict:
    """The searched values of a trial: each searched path, the method's name, and `method.<field>`
    for the fields searched for that trial's method only."""
    out = {path: _plain(overrides.get(path)) for path in space.searched_paths()}
    if space.methods is not None:
        method = overrides["method"]
        out["method"] = method["name"]
        label = config.get("method")
        option = space.option(label) if label else None
        for option_ in space.methods:
            for name in option_.varied:
                out.setdefault(f"method.{name}", None)
        if option is not None:
            for name in option.varied:
                out[f"method.{name}"] = _plain(method.get(name))
    return out


def status(folder: str | None, result) -> str:
    if result.error is not None:
        return "failed"
    if folder is None:
        return "not started"
    if storage.exists(folder, "rejected.json"):
        return "rejected"
    if storage.exists(folder, "summary.json"):
        return "completed"
    return "stopped"


def evaluations(folder: str, metric: str) -> list[tuple[int, float]]:
    return [(r["step"], r[metric]) for r in read_metrics(folder) if r.get(metric) is not None]


def last_step(folder: str) -> int:
    return max((r.get("step", 0) for r in read_metrics(folder)), default=0)


def write(job, output: str, rows: list[dict], space, steps: int, seconds: float) -> dict:
    """trials.parquet / .csv, the printed table, best.yaml and best/, curves.png, and summary.json
    last (in object storage, the mark of a finished search)."""
    stage = storage.stage_dir(output)  # the folder itself, or a local one published to the URI
    table_rows = [{k: v for k, v in r.items() if k != "curve"} for r in rows]
    write_table(table_rows, stage)
    print_table(table_rows, job.metric)
    completed = [r for r in rows if r["status"] == "completed" and r[f"last_{job.metric}"] is not None]
    pick = min if job.better == "min" else max
    best = pick(completed, key=lambda r: r[f"last_{job.metric}"]) if completed else None
    summary = {
        "kind": "tune",
        "run": job.run_name,
        "metric": job.metric,
        "mode": job.better,
        "trials": {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})},
        "trial_steps": {
            "run": sum(r["steps"] for r in rows if r["status"] != "rejected"),
            "all_to_the_end": (steps * sum(r["status"] != "rejected" for r in rows)) if steps else None,
        },
        "seconds": seconds,
        "table": f"{output}/trials.parquet",
        "curves": f"{output}/curves.png",
        "best": None,
    }
    if best is not None:
        summary["best"] = {
            "trial_id": best["trial_id"],
            job.metric: best[f"last_{job.metric}"],
            "values": {
                k: v for k, v in best.items() if k == "method" or k in job.search or k.startswith("method.")
            },
            "spec": f"{output}/best.yaml",
            "artifact": f"{output}/best",
        }
        write_best(job, output, best)
    draw_curves(rows, stage / "curves.png", job.metric)
    if storage.is_uri(output):
        storage.publish_files(stage, output, ["trials.parquet", "trials.csv", "curves.png"])
        shutil.rmtree(stage, ignore_errors=True)
    storage.write_text(output, "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def write_table(rows: list[dict], output: Path) -> None:
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])
    pq.write_table(table, output / "trials.parquet")
    pcsv.write_csv(table, output / "trials.csv")


def print_table(rows: list[dict], metric: str) -> None:
    hidden = {"planned_steps", "artifact", "reason", "wall_s"}
    columns = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in hidden]
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(f"[raylm] {len(rows)} trial(s):", flush=True)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    for r in rows:
        if r.get("reason"):
            print(f"[raylm] trial {r['trial_id']} {r['status']}: {r['reason']}")


def write_best(job, output: str, best: dict) -> None:
    """best.yaml: the base spec with the best trial's values (validated), and best/: its artifact."""
    from raylm.spec.loading import validate_dict
    from raylm.spec.tune import trial_spec

    record = json.loads(storage.read_text(f"{output}/trials/{best['trial_id']}", "trial.json"))
    base = job.base.model_dump(mode="json", exclude_unset=True)  # as the user wrote it
    spec = trial_spec(base, record["overrides"])
    spec["data"].setdefault("cache", f"{output}/data-cache")  # the trials' tokenized data
    spec["output"] = {**spec.get("output", {}), "path": f"{output}/best-run"}
    spec.pop("name", None)
    validate_dict(spec, source="best.yaml")
    header = (
        f"# The best trial ({best['trial_id']}) of the search in {output}: "
        f"{job.metric} {best[f'last_{job.metric}']:.4g}\n# raylm run {output}/best.yaml\n"
    )
    storage.write_text(output, "best.yaml", header + yaml.safe_dump(spec, sort_keys=False))
    storage.copy_dir(best["artifact"], f"{output}/best")


def draw_curves(rows: list[dict], path: Path, metric: str) -> None:
    """The metric against the step, one line per trial; stopped trials dashed and ending in an x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for r in rows:
        if not r["curve"]:
            continue
        steps, values = zip(*r["curve"], strict=True)
        stopped = r["status"] == "stopped"
        label = f"{r['trial_id']} {r.get('method', '')} ({r['status']})".replace("  ", " ")
        (line,) = axes.plot(
            steps, values, linestyle="--" if stopped else "-", marker="o", markersize=3, label=label
        )
        if stopped:
            axes.plot(steps[-1], values[-1], marker="x", markersize=10, color=line.get_color())
    axes.set_xlabel("step")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} per trial (dashed, x: stopped early)")
    if axes.lines:
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plain(value):
    """A table cell: scalars as they are, lists and mappings as JSON text."""
    return value if value is None or isinstance(value, bool | int | float | str) else json.dumps(value)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)
