"""This process's host memory: its resident size and the peak since a reset (Linux /proc).

start = reset_peak()          # the peak counter restarts at the current resident size
...                           # load and shard a model
grew = peak() - start         # the most host memory the loading added, at any moment
"""

from __future__ import annotations

from pathlib import Path

STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def reset_peak() -> int | None:
    """Restart the peak-resident counter (VmHWM) at the present size; returns that size (None where
    the kernel does not offer it)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_bytes("VmRSS")


def peak() -> int | None:
    """The most resident memory since the last reset_peak."""
    return _status_bytes("VmHWM")
