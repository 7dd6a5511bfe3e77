"""Driver of `kind: evaluate`: models, adapters and quantized artifacts side by side on held-out
perplexity and task files, one Ray task per model (at once where the cluster holds them).

    raylm run jobs/evaluate.yaml
    raylm run jobs/evaluate.yaml --set perplexity.blocks=16

The driver reads the text and the examples once (Ray Data, in a fixed order) and hands them to every
model's task, which tokenizes them with its own tokenizer (raylm/evaluate/measure.py). The output folder
gets `results.json` / `results.parquet` (one row per model, one column per metric), `answers.parquet`
(every example's prompt, answer, reference and verdict per model), `spec.yaml` and `summary.json`,
written into a staging folder and moved into place complete (raylm/compress/staging.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from raylm.spec.evaluate import RESERVED, EvaluateJob


class Evaluate:
    """kind: evaluate (a raylm.kinds.JobKind)."""

    def preflight(self, job: EvaluateJob) -> list[tuple[str, str]]:
        from raylm.compress import staging
        from raylm.data.pipeline import check_data
        from raylm.data.sft import check_sft_data
        from raylm.evaluate import endpoint

        problems = []
        for i, m in enumerate(job.models):
            if m.endpoint is not None:
                problems += endpoint.problems(m.endpoint, f"models.{i}")
                if m.endpoint.api_key_file:  # the Ray task may run in another folder
                    m.endpoint.api_key_file = str(Path(m.endpoint.api_key_file).expanduser().resolve())
                if "://" not in m.endpoint.tokenizer:
                    m.endpoint.tokenizer = str(Path(m.endpoint.tokenizer).expanduser().resolve())
            else:
                problems += model_problems(m, f"models.{i}")
        if job.perplexity is not None:
            problems += [(f"perplexity.{f}", what) for f, what in check_data(job.perplexity.data)]
        for i, task in enumerate(job.tasks):
            problems += [(f"tasks.{i}.{f}", what) for f, what in check_sft_data(task.data)]
        if job.harness is not None:
            problems += harness_problems(job.harness)
        return problems + staging.check_output(job)

    def run(self, job: EvaluateJob) -> dict:
        import ray

        from raylm.compress import remote, staging
        from raylm.runtime.storage import as_written

        recorded = staging.finished(job)
        if recorded is not None:
            print(f"[raylm] {job.output.path} already holds this evaluation; its results:", flush=True)
            for line in table(recorded["models"], recorded["metrics"]):
                print(f"[raylm] {line}", flush=True)
            return recorded
        texts, task_rows = read_inputs(job)
        print(
            f"[raylm] evaluate {len(job.models)} model(s)"
            + (f", perplexity over {len(texts)} document(s)" if job.perplexity else "")
            + "".join(f", {t.name} ({len(r)} examples)" for t, r in zip(job.tasks, task_rows, strict=True)),
            flush=True,
        )
        from raylm.evaluate.measure import evaluate_model

        task = ray.remote(evaluate_model).options(**remote.task_options(job.resources))
        spec = as_written(job)
        texts_ref, rows_ref = ray.put(texts), ray.put(task_rows)
        done = ray.get([task.remote(spec, i, texts_ref, rows_ref) for i in range(len(job.models))])
        rows = [row for row, _ in done]
        answers = [a for _, scored in done for a in scored]
        metrics = metric_names(job)
        metrics += [
            k for k in dict.fromkeys(k for r in rows for k in r) if k not in metrics and k not in RESERVED
        ]
        for line in table(rows, metrics):
            print(f"[raylm] {line}", flush=True)
        stage = staging.start(job.output.path.rstrip("/"))
        write_results(stage, rows, answers)
        summary = {
            "kind": "evaluate",
            "name": job.run_name,
            "output": job.output.path.rstrip("/"),
            "models": rows,
            "metrics": metrics,
            "answers": len(answers),
        }
        staging.publish(stage, job.output.path.rstrip("/"), spec, summary)
        return summary


def model_problems(entry, where: str) -> list[tuple[str, str]]:
    """A local model (or adapter base) path that does not exist or holds nothing raylm loads; a
    storage URI is fetched by the task on its node."""
    from raylm.runtime import storage
    from raylm.runtime.storage import run_artifact

    problems = []
    for field, raw in (("path", entry.path), ("base", entry.base)):
        if raw is None or storage.is_uri(raw):
            continue
        try:
            path = run_artifact(Path(raw).expanduser())
        except (OSError, ValueError) as err:  # an unreadable run summary
            problems.append((f"{where}.{field}", f"cannot read {raw}: {err}"))
            continue
        if not path.exists():
            problems.append((f"{where}.{field}", f"{raw} does not exist"))
            continue
        folder = any(
            (path / name).exists() for name in ("config.json", "adapter_config.json", "raylm_method.json")
        )
        ggufs = list(path.glob("*.gguf")) if path.is_dir() else []
        if not (path.suffix == ".gguf" or folder or len(ggufs) == 1):
            problems.append(
                (
                    f"{where}.{field}",
                    f"{raw} is not a model folder (config.json), an adapter folder, one GGUF file (or a "
                    "folder holding one) or a raylm run folder (summary.json)",
                )
            )
    return problems


def harness_problems(spec) -> list[tuple[str, str]]:
    """lm-eval missing, an include_path that is not there, a task name lm-eval does not know."""
    import difflib
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        return [("harness", "lm-evaluation-harness is not installed: pip install 'raylm[eval]'")]
    if spec.include_path and not Path(spec.include_path).expanduser().exists():
        return [("harness.include_path", f"{spec.include_path} does not exist")]
    from raylm.evaluate.harness import task_manager

    if spec.include_path:  # the Ray task may run in another folder
        spec.include_path = str(Path(spec.include_path).expanduser().resolve())
    known = task_manager(spec).all_tasks
    problems = []
    for i, name in enumerate(spec.tasks):
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f" or in {spec.include_path}" if spec.include_path else "; add its YAML with include_path"
            problems.append(
                (f"harness.tasks.{i}", f"lm-eval knows no task {name!r}{hint} (none of its own{where})")
            )
    return problems


def read_inputs(job: EvaluateJob) -> tuple[list[str], list[list[dict]]]:
    """The perplexity text's documents and each task's first `examples` rows, in a fixed order."""
    from raylm.data.pipeline import configure_ray_data, documents
    from raylm.data.sft import examples

    configure_ray_data()  # the same rows in the same order on every run
    texts = []
    if job.perplexity is not None:
        texts = [str(r["text"]) for r in documents(job.perplexity.data).take_all()]
    task_rows = [[dict(r) for r in examples(t.data).take(t.examples)] for t in job.tasks]
    return texts, task_rows


def metric_names(job: EvaluateJob) -> list[str]:
    return (["perplexity"] if job.perplexity is not None else []) + [t.name for t in job.tasks]


def table(rows: list[dict], metrics: list[str]) -> list[str]:
    """One line per model, one column per metric, each with its difference to the first model's."""
    first = rows[0]
    cells = [["model", *metrics]]
    for row in rows:
        line = [row["model"]]
        for name in metrics:
            value = row.get(name)
            text = "-" if value is None else f"{value:.4f}"
            if row is not first and value is not None and first.get(name) is not None:
                text += f" ({value - first[name]:+.4f})"
            line.append(text)
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells]


def write_results(stage: Path, rows: list[dict], answers: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (stage / "results.json").write_text(json.dumps(rows, indent=2))
    pq.write_table(pa.Table.from_pylist(rows), stage / "results.parquet")
    schema = pa.schema(
        [
            ("model", pa.string()),
            ("task", pa.string()),
            ("prompt", pa.string()),
            ("answer", pa.string()),
            ("reference", pa.string()),
            ("correct", pa.bool_()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(answers, schema=schema), stage / "answers.parquet")
