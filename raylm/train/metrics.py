"""Run metrics: JSONL rows (one per logged step), TensorBoard event files and the tracking runs
(MLflow, W&B: raylm.train.tracking), written by rank 0."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def read_metrics(run_dir: Path | str) -> list[dict]:
    """The rows of a run's metrics.jsonl (a folder or a storage URI), oldest first ([] before the
    first row is written)."""
    from raylm.runtime.storage import read_text

    text = read_text(str(run_dir), "metrics.jsonl") or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class MetricsLog:
    """Appends metric rows to `metrics.jsonl` and TensorBoard under `run_dir`.

    On resume, rows past the checkpoint's step are dropped first: those steps are about to be
    replayed, and a log with two different values for one step would mislead.
    """

    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool = True, sinks=()):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [row for row in read_metrics(run_dir) if row.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        self.file = open(self.path, "a")  # noqa: SIM115 - closed in close()
        self.tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(
                str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
            )
        self.sinks = list(sinks)

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tensorboard.add_scalar(key, value, row["step"])
        for sink in list(self.sinks):
            try:
                sink.log(row)
            except Exception as err:  # a tracking server's hiccup must not end a training run
                emit(f"[raylm] warning: {type(sink).__name__} stopped logging: {err}")
                self.sinks.remove(sink)

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        for sink in self.sinks:
            sink.close()


_channel = None  # rank 0's queue to the driver's console (raylm.train.console), when there is one


def connect(queue) -> None:
    """Send this process's raylm lines and progress rows to the driver's console."""
    global _channel
    _channel = queue


def emit(line: str) -> None:
    """A raylm line from a Train worker: to the driver's console, else printed once (Train V2 routes
    `print` through logging, which doubles it)."""
    if _send(("line", line)):
        return
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def progress(row: dict, max_steps: int) -> None:
    """A logged step: the driver's console turns it into the progress bar or a line."""
    if _send(("row", row)):
        return
    from raylm.train.console import format_progress

    emit(format_progress(row, max_steps))


def _send(item) -> bool:
    """To the driver's console; False (and printed here from then on) when there is none or it is gone:
    a console line never costs a training run."""
    global _channel
    if _channel is None:
        return False
    try:
        _channel.put(item)
        return True
    except Exception:  # the queue actor died (its node was lost, Ray is shutting down)
        _channel = None
        return False
