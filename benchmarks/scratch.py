"""A benchmark's scratch folder, removed when the benchmark exits (a memory benchmark leaves GBs of
checkpoints otherwise).

    from scratch import scratch_dir
    work = scratch_dir("raylm-bench-")
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path


def scratch_dir(prefix: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, True)
    return folder
