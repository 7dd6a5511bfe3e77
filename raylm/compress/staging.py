"""How a compression job writes its output: into a staging folder beside it, moved into place only
when everything is written and measured, so a failure leaves nothing half-written at `output`; the
same spec run again returns the recorded summary. An output in object storage (s3://, gs://) is staged
in a local folder and uploaded when it is complete, `spec.yaml` and then `summary.json` last (a reader
takes a folder without summary.json for unfinished).

    stage = staging.start(output)
    ...                                      # write the artifact into `stage`, reload it, measure it
    staging.publish(stage, output, spec, summary)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml


def check_output(job) -> list[tuple[str, str]]:
    from raylm.runtime import storage

    output = job.output.path.rstrip("/")
    if finished(job) is not None:
        return []
    if storage.exists(output, "spec.yaml"):
        return [
            (
                "output",
                f"{output} holds the result of a different spec: choose a new output folder, or remove it",
            )
        ]
    if storage.listing(output) or (not storage.is_uri(output) and Path(output).is_file()):
        return [("output", f"{output} already holds other files: choose a new output folder")]
    return []


def finished(job) -> dict | None:
    """The summary of an earlier run of exactly this spec at `output`, if there is one."""
    from raylm.runtime.storage import as_written, read_text

    output = job.output.path.rstrip("/")
    try:
        recorded = yaml.safe_load(read_text(output, "spec.yaml") or "null")
        summary_text = read_text(output, "summary.json")
        summary = json.loads(summary_text) if summary_text is not None else None
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return summary if summary is not None and recorded == as_written(job) else None


def start(output: str) -> Path:
    from raylm.runtime.storage import is_uri

    if is_uri(output):
        return Path(tempfile.mkdtemp(prefix="raylm-stage-"))
    output_path = Path(output)
    stage = output_path.parent / f".{output_path.name}.partial"
    shutil.rmtree(stage, ignore_errors=True)  # a staging folder is raylm's own: what a failure left
    stage.mkdir(parents=True)
    return stage


def publish(stage: Path, output: str, spec: dict, summary: dict) -> None:
    from raylm.runtime import storage

    if storage.is_uri(output):
        storage.publish_files(stage, output, sorted(p.name for p in stage.iterdir()))
        storage.write_text(output, "spec.yaml", yaml.safe_dump(spec, sort_keys=False))
        storage.write_text(output, "summary.json", json.dumps(summary, indent=2))
        shutil.rmtree(stage, ignore_errors=True)
        return
    (stage / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (stage / "summary.json").write_text(json.dumps(summary, indent=2))
    output_path = Path(output)
    if output_path.exists():
        output_path.rmdir()  # empty: checked before the job started
    os.replace(stage, output_path)
