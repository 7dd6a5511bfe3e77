"""A run folder (a folder or a storage URI) -> its report page, one section builder per kind.

from raylm.report.sections import write_report
write_report("runs/pipeline")     # runs/pipeline/report.html, and each stage's own report
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import yaml

from raylm.report import page, plots
from raylm.report.runs import describe

NAME = "report.html"


def write_report(run: str) -> str:
    """Write `<run>/report.html` (for a pipeline, each stage's report too); returns its path."""
    from raylm.runtime import storage

    run = run.rstrip("/")
    try:
        info = describe(run)
    except (AttributeError, TypeError, KeyError, ValueError, IndexError) as err:  # a record edited by hand
        raise ValueError(
            f"{run}: its records are not what raylm wrote ({type(err).__name__}: {err})"
        ) from None
    if info is None:
        raise FileNotFoundError(f"{run}: not a raylm run folder (no summary.json, spec.yaml or lineage.json)")
    summary = _json(run, "summary.json")
    summary = summary if isinstance(summary, dict) else {}
    builder = BUILDERS.get(info["kind"], _training)
    try:
        sections = builder(run, summary, info)
    except (AttributeError, TypeError, KeyError, ValueError, IndexError) as err:  # a record edited by hand
        raise ValueError(
            f"{run}: its records are not what raylm wrote ({type(err).__name__}: {err})"
        ) from None
    text = page.document(f"{info['kind']} · {info['name']}", f"{run} · {info['status']}", sections)
    storage.write_text(run, NAME, text)
    return f"{run}/{NAME}"


def _json(run: str, name: str):
    from raylm.runtime import storage

    text = storage.read_text(run, name)
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def _bytes(run: str, name: str) -> bytes | None:
    from raylm.runtime import storage

    if not storage.exists(run, name):
        return None
    if not storage.is_uri(run):
        return Path(run, name).read_bytes()
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(run)
    with fs.open_input_stream(f"{root}/{name}") as source:
        return source.read()


def metric_rows(run: str) -> list[dict]:
    from raylm.runtime import storage

    rows = []
    for line in (storage.read_text(run, "metrics.jsonl") or "").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill
    return rows


def _series(rows: list[dict], *names: str) -> dict[str, list[tuple[float, float]]]:
    def point(row, name):
        ok = isinstance(row, dict) and isinstance(row.get(name), int | float)
        return ok and isinstance(row.get("step"), int | float)

    return {n: [(r["step"], r[n]) for r in rows if point(r, n)] for n in names}


def _training(run: str, summary: dict, info: dict) -> list[tuple[str, str]]:
    rows = metric_rows(run)
    throughput = summary.get("throughput") or {}
    memory = summary.get("host_memory") or {}
    strategy = summary.get("strategy") or {}
    params = summary.get("parameters") or {}
    exact = (summary.get("exact_match") or {}).get("exact_match")
    before = (summary.get("exact_match_before") or {}).get("exact_match")
    overview = {
        "status": info["status"],
        "steps": f"{summary.get('steps', info.get('steps'))}"
        + (f" (resumed from step {summary['resumed_from']})" if summary.get("resumed_from") else ""),
        "strategy": f"{strategy.get('name')} ({strategy.get('why')})" if strategy else None,
        "method": (summary.get("method") or {}).get("name"),
        "trainable parameters": f"{params['trainable']:,} of {params['total']:,} ({params['trainable_percent']:.3f}%)"
        if params
        else None,
        "exact match (before -> after)": f"{before} -> {exact}" if exact is not None else None,
        "throughput": f"{throughput['tokens_per_s']:,.0f} tokens/s over {throughput['tokens']:,} tokens"
        if throughput.get("tokens_per_s")
        else None,
        "peak host memory per worker": ", ".join(
            f"{max(v) / 2**20:,.0f} MiB ({k})" for k, v in memory.items() if v
        )
        or None,
        "model": summary.get("model"),
        "artifact": summary.get("artifact"),
        "merged": summary.get("merged") if isinstance(summary.get("merged"), str) else None,
        "worker nodes": ", ".join(summary.get("worker_nodes") or []) or None,
    }
    sections = [("Overview", page.facts(overview))]
    final = summary.get("metrics") or {}
    if final:
        sections.append(
            ("Final metrics", page.facts({k: v for k, v in final.items() if not isinstance(v, dict)}))
        )
    if rows:
        plots_html = [
            page.image(plots.curves(_series(rows, "loss", "val_loss"), "loss"), "loss and validation loss")
        ]
        if any("reward_accuracy" in r for r in rows):  # a preference objective's held-out pairs
            rewards = _series(rows, "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")
            plots_html.append(page.image(plots.curves(rewards, "reward"), "preference rewards and accuracy"))
        if any("lr" in r for r in rows):
            plots_html.append(page.image(plots.curves(_series(rows, "lr"), "learning rate"), "learning rate"))
        if any("tokens_per_s" in r for r in rows):
            plots_html.append(
                page.image(plots.curves(_series(rows, "tokens_per_s"), "tokens / s"), "throughput")
            )
        memory_keys = sorted({k for r in rows for k in r if "memory" in k})
        if memory_keys:
            plots_html.append(page.image(plots.curves(_series(rows, *memory_keys), "bytes"), "memory"))
        sections.append(("Curves", "\n".join(plots_html)))
    sample = summary.get("sample") or {}
    if sample:
        sections.append(
            ("Sample", page.facts({"prompt": sample.get("prompt"), "completion": sample.get("completion")}))
        )
    return sections


def _search(run: str, summary: dict, info: dict) -> list[tuple[str, str]]:
    from raylm.runtime import storage

    best = summary.get("best") or {}
    metric = summary.get("metric")
    overview = {
        "status": info["status"],
        "metric": f"{metric} ({summary.get('mode', 'max')})" if metric else None,
        "trials": ", ".join(f"{n} {s}" for s, n in (summary.get("trials") or {}).items()),
        "best trial": f"{best.get('trial_id')}: {metric} {best.get(metric)}" if best else "none completed",
        "best values": ", ".join(f"{k}={v}" for k, v in (best.get("values") or {}).items() if v is not None)
        or None,
        "best spec": best.get("spec"),
        "best artifact": best.get("artifact"),
        "seconds": summary.get("seconds"),
    }
    sections = [("Overview", page.facts(overview))]
    png = _bytes(run, "curves.png")
    if png:
        sections.append(("Trial curves", page.image(png, "each trial's metric by step")))
    text = storage.read_text(run, "trials.csv")
    if text:
        rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]
        sections.append(("Trials", page.table(rows)))
    return sections


def _compressed(run: str, summary: dict, info: dict) -> list[tuple[str, str]]:
    after = "quantized" if summary.get("kind") == "quantize" else "pruned"
    size, ppl, speed = (
        summary.get("weights_bytes", {}),
        summary.get("perplexity", {}),
        summary.get("tokens_per_s", {}),
    )
    rows = [
        {"measure": "weights (bytes)", "original": size.get("original"), after: size.get(after)},
        {
            "measure": f"perplexity ({ppl.get('blocks')} held-out blocks)",
            "original": ppl.get("original"),
            after: ppl.get(after),
        },
        {
            "measure": f"greedy tokens/s ({summary.get('measured_on')})",
            "original": speed.get("original"),
            after: speed.get(after),
        },
    ]
    overview = {
        "status": info["status"],
        "method": json.dumps(summary.get("method")) if summary.get("method") else None,
        "source model": summary.get("model"),
        "artifact": summary.get("artifact"),
        "size ratio": size.get("ratio"),
        "bits per parameter": (summary.get("bits_per_parameter") or {}).get("all"),
        "greedy tokens agreeing with the original": summary.get("greedy_agreement"),
        "sparsity": (summary.get("sparsity") or {}).get("pruned_layers"),
    }
    return [
        ("Overview", page.facts(overview)),
        ("Before and after", page.table(rows, ["measure", "original", after])),
    ]


def _evaluation(run: str, summary: dict, info: dict) -> list[tuple[str, str]]:
    models, metrics = summary.get("models") or [], summary.get("metrics") or []
    rows = []
    for row in models:
        cells = {"model": row["model"]}
        for m in metrics:
            cells[m] = row.get(m)
            if (
                models
                and row is not models[0]
                and isinstance(row.get(m), int | float)
                and isinstance(models[0].get(m), int | float)
            ):
                cells[f"{m} vs {models[0]['model']}"] = f"{row[m] - models[0][m]:+.4g}"
        rows.append(cells)
    sections = [("Comparison", page.table(rows))]
    charts = [
        page.image(plots.bars([r["model"] for r in models], [r[m] for r in models], m), m)
        for m in metrics
        if models and all(isinstance(r.get(m), int | float) for r in models)
    ]
    if charts:
        sections.append(("Side by side", "\n".join(charts)))
    sections.append(
        (
            "Output",
            page.facts(
                {"results": f"{run}/results.parquet", "per-example answers": f"{run}/answers.parquet"}
            ),
        )
    )
    return sections


def _pipeline(run: str, summary: dict, info: dict) -> list[tuple[str, str]]:
    from raylm.report.lineage import read, relocated

    record = relocated(read(run) or {"stages": {}}, run)  # a pipeline folder moved since: its own stages
    stages = record["stages"]
    order = list(stages)
    rows = []
    for name in order:
        stage = stages[name]
        output = stage.get("output")
        report = None
        same = bool(output) and output.rstrip("/") == run.rstrip("/")  # a record edited by hand
        if output and not same and describe(output) is not None:
            try:
                report = write_report(output)
            except (OSError, ValueError) as err:
                print(f"[raylm] no report for stage {name}: {err}", flush=True)
        local = bool(output) and "://" not in output
        inside = local and Path(output).resolve().parent == Path(run).resolve()
        href = f"{Path(output).name}/{NAME}" if inside else report
        if local and report and not inside:
            href = Path(report).resolve().as_uri()
        rows.append(
            {
                "stage": page.link(href, name) if report else name,
                "kind": stage.get("kind"),
                "status": stage.get("status"),
                "seconds": stage.get("seconds"),
                "artifact": stage.get("artifact") or output,
                "reads": ", ".join(p["stage"] for p in stage.get("parents", [])) or None,
                "metrics": ", ".join(f"{k} {page.number(v)}" for k, v in (stage.get("metrics") or {}).items())
                or None,
            }
        )
    sections = []
    if stages:
        sections.append(
            ("Stages", page.image(plots.stage_graph(stages, order), "the stages and what each reads"))
        )
    sections.append(("Stage by stage", page.table(rows)))
    if summary.get("url"):
        sections.append(("Serving", page.facts({"OpenAI-compatible API": summary["url"]})))
    return sections


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text or None


BUILDERS = {
    "tune": _search,
    "quantize": _compressed,
    "prune": _compressed,
    "evaluate": _evaluation,
    "pipeline": _pipeline,
}


def spec_kind(run: str) -> str | None:
    from raylm.runtime import storage

    try:
        spec = yaml.safe_load(storage.read_text(run, "spec.yaml") or "null")
    except yaml.YAMLError:
        return None
    return spec.get("kind") if isinstance(spec, dict) else None
