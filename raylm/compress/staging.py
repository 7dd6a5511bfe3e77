"""How a compression job writes its output: into a staging folder beside it, moved into place only
when everything is written and measured, so a failure leaves nothing half-written at `output`; the
same spec run again returns the recorded summary.

    stage = staging.start(output)
    ...                                      # write the artifact into `stage`, reload it, measure it
    staging.publish(stage, output, spec, summary)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml


def check_output(job) -> list[tuple[str, str]]:
    output = Path(job.output.path)
    if not output.exists() or finished(job) is not None:
        return []
    if (output / "spec.yaml").exists():
        return [
            (
                "output",
                f"{output} holds the result of a different spec: choose a new output folder, or remove it",
            )
        ]
    if output.is_file() or any(output.iterdir()):
        return [("output", f"{output} already holds other files: choose a new output folder")]
    return []


def finished(job) -> dict | None:
    """The summary of an earlier run of exactly this spec at `output`, if there is one."""
    output = Path(job.output.path)
    try:
        recorded = yaml.safe_load((output / "spec.yaml").read_text())
        summary = json.loads((output / "summary.json").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    from raylm.runtime.storage import as_written

    return summary if recorded == as_written(job) else None


def start(output: Path) -> Path:
    stage = output.parent / f".{output.name}.partial"
    shutil.rmtree(stage, ignore_errors=True)  # a staging folder is raylm's own: what a failure left
    stage.mkdir(parents=True)
    return stage


def publish(stage: Path, output: Path, spec: dict, summary: dict) -> None:
    (stage / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (stage / "summary.json").write_text(json.dumps(summary, indent=2))
    if output.exists():
        output.rmdir()  # empty: checked before the job started
    os.replace(stage, output)
