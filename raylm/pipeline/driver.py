"""Driver of `kind: pipeline`: the stages one after another in dependency order, each by its own kind's
driver on the same Ray, skipping what is already done.

    raylm run jobs/pipeline.yaml                    # runs what is missing or changed
    raylm run jobs/pipeline.yaml --from sft         # sft and every stage that reads from it, again
    raylm run jobs/pipeline.yaml --only eval        # one stage (its inputs must be complete)
    raylm lineage runs/pipeline/search/best         # the chain that produced an artifact

A stage's hash covers its spec with every reference resolved and the summary of every stage it reads
(a re-run upstream changes it). A stage is skipped when its hash is the recorded one and its output holds
summary.json; a stage interrupted before that runs again with the same output, and resumes as its kind
resumes (training from its last checkpoint). A stage whose spec changed starts over: its old output
is moved aside to `<output>.superseded-<old hash>`, never deleted. Stages run one at a time, each with
the whole cluster (its own `resources` say what it takes of it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from pathlib import Path

from raylm.report import lineage
from raylm.spec.reading import Problems, SpecError


class Pipeline:
    """kind: pipeline (a raylm.kinds.JobKind)."""

    def preflight(self, job) -> Problems:
        """Each stage's own checks, for the stages whose inputs exist already (the first stages; those
        after them are checked just before they run)."""
        from raylm.kinds import preflight

        problems: Problems = []
        try:
            held_by = lock_problem(job.output.path.rstrip("/"))
            if held_by:
                return [held_by]
            record = lineage.read(job.output.path) or lineage.new(job)
            plan = {n: _complete(job, n, record) for n in job.order}
        except OSError as err:  # a bucket that cannot be reached, no credentials
            return [("output", f"cannot read {job.output.path}: {err}")]
        for name in job.order:
            if job.only is not None and name != job.only:
                continue  # --only: the other stages do not run
            if job.parents(name) and not all(plan[p] for p in job.parents(name)):
                continue
            if job.job(name).kind == "serve" or plan[name]:
                continue  # a serve stage is checked when it starts (its inputs may be re-run first)
            found = preflight(job.job(name))
            if _superseded(job, name, record):  # its output moves aside before it runs
                found = [(where, what) for where, what in found if where != "output"]
            problems += [(f"stages.{name}.{where}", what) for where, what in found]
        return problems

    def run(self, job) -> dict:
        with held(job.output.path.rstrip("/")):
            return self._run(job)

    def _run(self, job) -> dict:
        from raylm.kinds import driver, preflight

        root = job.output.path.rstrip("/")
        record = lineage.relocated(lineage.read(root) or lineage.new(job), root)
        plan = decide(job, record)
        for name in job.order:
            print(f"[raylm] stage {name} ({job.job(name).kind}): {plan[name]}", flush=True)
        ran: dict[str, float] = {}
        summaries: dict[str, dict] = {}
        for name in job.order:
            if not plan[name].startswith("run"):
                _promote(job, name, None)  # a skipped search: its merged best where a stage wants it
                continue
            stage_job = runnable(job, name)
            digest = stage_hash(job, name)
            _supersede(job, name, record)
            problems = preflight(stage_job)
            if problems:
                raise SpecError(
                    [(f"stages.{name}.{where}", what) for where, what in problems], source="preflight"
                )
            if stage_job.kind == "serve":  # it keeps running: the report of what came before it now
                _report(root)
            entry = _entry(job, name, digest)
            entry.update(
                status="serving" if stage_job.kind == "serve" else "running", started=lineage.stamp()
            )
            record["stages"][name] = entry
            lineage.write(root, record)
            print(f"[raylm] ---- stage {name} ({stage_job.kind}) ----", flush=True)
            began = time.monotonic()
            try:
                summary = driver(stage_job).run(stage_job)
                _promote(job, name, summary)
            except BaseException:
                entry.update(status="interrupted", ended=lineage.stamp())
                lineage.write(root, record)
                raise
            ran[name] = time.monotonic() - began
            summaries[name] = summary
            if stage_job.kind == "quantize":  # the file itself (a GGUF export names it after its source)
                entry["artifact"] = lineage.absolute(summary.get("artifact") or entry["artifact"])
            entry.update(
                status="stopped" if summary.get("stopped") else "complete",
                ended=lineage.stamp(),
                seconds=round(ran[name], 1),
                metrics=key_metrics(summary),
                summary_sha256=_summary_digest(job, name),
            )
            lineage.write(root, record)
            numbers = ", ".join(f"{k} {lineage.short(v)}" for k, v in entry["metrics"].items())
            print(f"[raylm] stage {name} done in {ran[name]:.0f} s: {numbers}", flush=True)
            if stage_job.kind != "serve":
                lineage.write(stage_job.output.path, record)
        for line in table(job, record, plan, ran):
            print(f"[raylm] {line}", flush=True)
        summary = {
            "kind": "pipeline",
            "name": job.run_name,
            "output": root,
            "lineage": f"{root}/{lineage.NAME}",
            "stages": {
                n: {
                    "kind": job.job(n).kind,
                    "ran": n in ran,
                    "status": record["stages"].get(n, {}).get("status"),
                    "artifact": record["stages"].get(n, {}).get("artifact"),
                    "metrics": record["stages"].get(n, {}).get("metrics", {}),
                }
                for n in job.order
            },
        }
        serving = [s for s in summaries.values() if s.get("kind") == "serve"]
        if serving:
            summary["url"] = serving[0].get("url")
        from raylm.runtime import storage

        storage.write_text(root, "summary.json", json.dumps(summary, indent=2))
        summary["report"] = _report(root)
        return summary


def _report(root: str) -> str | None:
    """The pipeline's report page (and each stage's); a failure to draw it is not the pipeline's."""
    from raylm.report.sections import write_report

    try:
        written = write_report(root)
    except Exception as err:  # noqa: BLE001 - matplotlib and file errors alike: say so, keep the results
        print(f"[raylm] the report could not be written: {type(err).__name__}: {err}", flush=True)
        return None
    print(f"[raylm] report: {written}", flush=True)
    return written


LOCK = ".raylm-pipeline.lock"


@contextlib.contextmanager
def held(root: str):
    """The pipeline's lock for this run: a second `raylm run` of the same pipeline would resume the
    stage the first is writing, or move its output aside under it. A lock whose process is gone (on this
    machine) is taken over; one from another machine must be removed by hand once that run is gone."""
    import os
    import socket

    from raylm.runtime import storage

    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": lineage.stamp()})
    if storage.is_uri(root):  # no exclusive create in object storage: check, write, read back
        problem = lock_problem(root)
        if problem:
            raise SpecError([problem])
        storage.write_text(root, LOCK, mine)
        if storage.read_text(root, LOCK) != mine:
            raise SpecError([("output", f"another raylm run took {root}/{LOCK} at the same moment")])
    else:
        Path(root).mkdir(parents=True, exist_ok=True)
        lock = Path(root) / LOCK
        for attempt in (1, 2):
            try:
                descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                problem = lock_problem(root)
                if problem or attempt == 2:
                    raise SpecError(
                        [problem or ("output", f"another raylm run took {lock} at the same moment")]
                    ) from None
                lock.unlink(missing_ok=True)  # its process is gone: taken over
        with os.fdopen(descriptor, "w") as out:
            out.write(mine)
    try:
        yield
    finally:
        storage.remove(root, LOCK)


def lock_problem(root: str) -> tuple[str, str] | None:
    """("output", why) when a live run holds the pipeline's lock."""
    from raylm.runtime import storage

    try:
        other = json.loads(storage.read_text(root, LOCK) or "null")
    except ValueError:
        other = None
    if isinstance(other, dict) and _alive(other):
        return (
            "output",
            f"another raylm run (pid {other.get('pid')} on {other.get('host')}, since {other.get('since')}) "
            f"is running this pipeline; wait for it, or remove {root}/{LOCK} if it is gone",
        )
    return None


def _alive(lock: dict) -> bool:
    import os
    import socket

    if lock.get("host") != socket.gethostname():
        return True  # cannot be checked from here
    try:
        os.kill(int(lock.get("pid")), 0)
    except (OSError, TypeError, ValueError):
        return False
    return int(lock["pid"]) != os.getpid()


def decide(job, record: dict) -> dict[str, str]:
    """Per stage: `run (why)` or `skip (why)`, from the recorded hashes and the --from / --only flags."""
    forced = set()
    if job.only is not None:
        for parent in job.parents(job.only):
            if not _complete(job, parent, record):
                raise SpecError(
                    [
                        (
                            "only",
                            f"stage {job.only} reads stage {parent}, which is not complete: run the pipeline without --only first",
                        )
                    ]
                )
        return {n: "run (--only)" if n == job.only else "skip (--only another stage)" for n in job.order}
    if job.rerun_from is not None:
        forced = {job.rerun_from, *job.dependants(job.rerun_from)}
    plan: dict[str, str] = {}
    for name in job.order:
        if name in forced:
            plan[name] = "run (--from)"
        elif job.job(name).kind == "serve":
            plan[name] = "run (serving)"
        elif any(plan[p].startswith("run") for p in job.parents(name)):
            plan[name] = "run (an input is re-run)"
        elif name not in record["stages"]:
            plan[name] = "run (new)"
        elif record["stages"][name].get("hash") != stage_hash(job, name):
            plan[name] = "run (spec or input changed)"
        elif not _complete(job, name, record):
            plan[name] = "run (not complete: resumes)"
        else:
            plan[name] = "skip (unchanged and complete)"
    return plan


def stage_hash(job, name: str) -> str:
    """SHA-256 of the stage's spec (references resolved), the summaries of the stages it reads and the
    fingerprints of the files it reads that no stage wrote."""
    inputs = {parent: _summary_digest(job, parent) for parent in job.parents(name)}
    inputs |= {where: _fingerprint(path) for where, path in _external_inputs(job, name).items()}
    text = json.dumps({"spec": job.resolved(name), "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _summary_digest(job, name: str) -> str | None:
    from raylm.runtime import storage

    output = getattr(getattr(job.job(name), "output", None), "path", None)
    text = storage.read_text(output, "summary.json") if output else None
    return hashlib.sha256(text.encode()).hexdigest() if text is not None else None


def _complete(job, name: str, record: dict) -> bool:
    entry = record["stages"].get(name)
    return (
        entry is not None
        and entry.get("status") == "complete"
        and entry.get("hash") == stage_hash(job, name)
        and entry.get("summary_sha256") is not None
        and entry.get("summary_sha256") == _summary_digest(job, name)
    )


def _supersede(job, name: str, record: dict) -> None:
    """Move a stage's output written by another spec (or forced to re-run) out of its way."""
    from raylm.runtime import storage

    if not _superseded(job, name, record, forced=True):
        return
    output = job.job(name).output.path
    entry = record["stages"][name]
    when = re.sub(r"\D", "", entry.get("ended") or entry.get("started") or "")[:14]
    tag = (entry.get("hash") or "unknown")[:8]
    aside = f"{output.rstrip('/')}.superseded-{tag}-{when}"
    taken = (
        set(storage.listing(str(Path(output.rstrip("/")).parent)))
        if not storage.is_uri(output)
        else set(storage.subfolders(output.rstrip("/").rsplit("/", 1)[0]))
    )
    for number in range(2, 10_000):  # never onto an earlier one
        if aside.rsplit("/", 1)[-1] not in taken:
            break
        aside = f"{output.rstrip('/')}.superseded-{tag}-{when}-{number}"
    print(f"[raylm] stage {name}: its earlier output moves to {aside}", flush=True)
    storage.move_dir(output.rstrip("/"), aside)


def _superseded(job, name: str, record: dict, forced: bool = False) -> bool:
    """Whether the stage's output holds an earlier run to move aside before it runs: one of another
    spec (or inputs), or, for a stage forced to re-run, a complete one. An interrupted run of the same
    spec resumes; a folder no pipeline recorded is the kind's to judge."""
    from raylm.runtime import storage

    output = getattr(getattr(job.job(name), "output", None), "path", None)
    entry = record["stages"].get(name)
    if output is None or entry is None or not storage.listing(output.rstrip("/")):
        return False
    if entry.get("hash") != stage_hash(job, name):
        return True
    return forced and entry.get("status") == "complete"


def runnable(job, name: str):
    """The stage's job as it runs: its validated spec, or for a stage taken from a search's best spec,
    that spec (best.yaml, written by the search that just ran) with the stage's changes."""
    import yaml

    from raylm.runtime import storage
    from raylm.spec.loading import validate_dict
    from raylm.spec.pipeline import best_spec_stage, with_output

    whole = [r for r in job.references(name) if r.location == ()]
    if not whole:
        return job.job(name)
    search = job.job(whole[0].stage)
    text = storage.read_text(search.output.path.rstrip("/"), "best.yaml")
    if text is None:
        raise SpecError(
            [
                (
                    f"stages.{name}",
                    f"stage {whole[0].stage} has no best trial (no best.yaml): no trial completed",
                )
            ]
        )
    stage = with_output(job.stages[name], "finetune", job.output.path.rstrip("/"), name)
    return validate_dict(
        best_spec_stage(stage, search, yaml.safe_load(text)), f"stages.{name} (from best.yaml)"
    )


def _promote(job, name: str, summary: dict | None) -> None:
    """What later stages take from this one beyond its own artifact: a search's best trial merged
    into its base, where a stage asks for `pick: merged` (for a skipped search, when it is missing)."""
    wanted = any(r.stage == name and r.pick == "merged" for later in job.order for r in job.references(later))
    if not (job.job(name).kind == "tune" and wanted):
        return
    from raylm.methods.merging import MergeError, merge_adapter
    from raylm.runtime import storage

    target = job.artifact(name, "merged").path
    if summary is None:  # skipped: merge only what is missing, from the recorded result
        if storage.exists(target, "config.json"):
            return
        summary = json.loads(storage.read_text(job.job(name).output.path.rstrip("/"), "summary.json") or "{}")
    best = summary.get("best")
    if best is None:
        raise SpecError(
            [(f"stages.{name}", "no trial completed: there is no best trial to merge and hand on")]
        )
    try:
        if storage.is_uri(target):
            import tempfile

            with tempfile.TemporaryDirectory() as scratch:
                merge_adapter(storage.localize(best["artifact"]), f"{scratch}/merged")
                storage.copy_dir(f"{scratch}/merged", target)
        else:
            merge_adapter(best["artifact"], target)
    except MergeError as err:  # the best trial's method cannot merge (a search over methods)
        raise SpecError(
            [(f"stages.{name}", f"its best trial cannot be merged for pick: merged: {err}")]
        ) from None
    print(f"[raylm] stage {name}: best trial {best['trial_id']} merged into its base: {target}", flush=True)


def _entry(job, name: str, digest: str) -> dict:
    stage_job = job.job(name)
    output = getattr(getattr(stage_job, "output", None), "path", None)
    entry = {
        "kind": stage_job.kind,
        "hash": digest,
        "output": lineage.absolute(output) if output else None,
        "parents": [
            {"stage": r.stage, "artifact": lineage.absolute(job.artifact(r.stage, r.pick).path)}
            for r in job.references(name)
        ],
        "inputs": {k: lineage.absolute(v) for k, v in _external_inputs(job, name).items()},
    }
    try:
        produced = job.artifact(name)
    except ValueError:  # evaluate, serve: results, not an artifact
        return entry
    entry.update(artifact=lineage.absolute(produced.path), artifact_type=produced.type)
    if any(r.stage == name and r.pick == "merged" for later in job.order for r in job.references(later)):
        entry["artifacts"] = {"merged": lineage.absolute(job.artifact(name, "merged").path)}
    return entry


def _output(job, name: str) -> str | None:
    return getattr(getattr(job.job(name), "output", None), "path", None)


def _external_inputs(job, name: str) -> dict[str, str]:
    """The files and folders a stage reads that no stage produced (models, adapters, tokenizers, data),
    by their dotted place in the stage's spec."""
    from raylm.runtime.storage import as_written

    from_stages = {job.artifact(r.stage, r.pick).path for r in job.references(name)}
    # what lies in a stage's output is followed by that stage's summary, not by file times (a report
    # rewritten there would look like a changed input)
    outputs = [lineage.absolute(o).rstrip("/") for n in job.order if (o := _output(job, n))]

    def ours(path: str) -> bool:
        where = lineage.absolute(path).rstrip("/")
        return any(where == o or where.startswith(o + "/") for o in outputs)

    found: dict[str, str] = {}

    def walk(node, where: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "output":
                    continue  # what the stage writes
                paths = value if isinstance(value, list) else [value]
                named = key in INPUT_KEYS or where[-1:] == ("adapters",)
                if named and all(isinstance(v, str) for v in paths):
                    for i, path in enumerate(paths):
                        if path not in from_stages and not ours(path):
                            found[".".join((*where, key, *([str(i)] if isinstance(value, list) else [])))] = (
                                path
                            )
                else:
                    walk(value, (*where, key))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, (*where, str(i)))

    walk(as_written(job.job(name)), ())
    return found


# The spec fields that name files a stage reads: models, adapters, tokenizers, data, task YAMLs, a
# DeepSpeed config, few-shot exemplars, ReAct documents, a chat template file.
INPUT_KEYS = {
    "path",
    "base",
    "tokenizer",
    "include_path",
    "config",
    "data_files",
    "exemplars",
    "documents",
    "chat_template",
}


def _fingerprint(path: str) -> str | None:
    from raylm.runtime import storage

    try:
        return storage.fingerprint(path)
    except (OSError, ValueError) as err:  # too long a name, an unreachable bucket: not a file to follow
        return f"unreadable: {type(err).__name__}"


def key_metrics(summary: dict) -> dict:
    """The few numbers a reader of the lineage wants from each kind's summary."""
    kind = summary.get("kind")
    if kind in ("quantize", "prune"):
        after = "quantized" if kind == "quantize" else "pruned"
        return {
            "weights_fraction": summary["weights_bytes"]["ratio"],
            "perplexity_before": summary["perplexity"]["original"],
            "perplexity": summary["perplexity"][after],
            "greedy_agreement": summary["greedy_agreement"],
        }
    if kind == "tune":
        best = summary.get("best") or {}
        return {"best_trial": best.get("trial_id"), summary["metric"]: best.get(summary["metric"])}
    if kind == "evaluate":
        return {f"{row['model']}.{m}": row.get(m) for row in summary["models"] for m in summary["metrics"]}
    if kind == "serve":
        return {"url": summary.get("url")}
    metrics = summary.get("metrics") or {}
    names = ("val_loss", "val_ppl", "val_accuracy", "reward_accuracy", "reward_margin")
    found = {k: metrics[k] for k in names if k in metrics}
    exact = (summary.get("exact_match") or {}).get("exact_match")
    if exact is not None:
        found["exact_match"] = exact
    return {"steps": summary.get("steps"), **found}


def _shown(path) -> str:
    """A recorded (absolute) path as the user wrote it: relative to this folder when inside it."""
    import os

    path = str(path)
    if "://" in path or not path.startswith("/"):
        return path
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def table(job, record: dict, plan: dict, ran: dict) -> list[str]:
    rows = [("stage", "kind", "this run", "status", "seconds", "artifact")]
    for name in job.order:
        entry = record["stages"].get(name, {})
        rows.append(
            (
                name,
                job.job(name).kind,
                "ran" if name in ran else "skipped",
                str(entry.get("status", "-")),
                f"{ran[name]:.0f}" if name in ran else "-",
                _shown(
                    entry.get("artifact")
                    or entry.get("output")
                    or (entry.get("metrics") or {}).get("url")
                    or "-"
                ),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
