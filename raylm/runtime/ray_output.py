"""Which of Ray's own output reaches the console: its INFO chatter (start-up, Ray Data's execution
plans, Ray Train's per-report lines) stays in Ray's session logs unless `raylm run --verbose`;
warnings, errors and tracebacks from any Ray process still show.

    from raylm.runtime.ray_output import quiet_ray_console
    quiet_ray_console()   # after ray.init, in the driver
"""

from __future__ import annotations

import logging
import re

from raylm.methods.hf_peft import DEPRECATION

# Lines from Ray's processes that reach the console without --verbose: warnings, errors, tracebacks.
IMPORTANT = re.compile(r"\b(WARNING|WARN|ERROR|CRITICAL|FATAL)\b|Traceback|Error\b|Exception\b|Warning\b")


KEPT_PREFIX = "[raylm] trial "  # a search's trial processes: one line as each starts and ends

# Import-time notices of libraries a job loads that say WARN(ING) yet leave nothing for a raylm user to do.
LIBRARY_NOTICES = (
    # torchao, imported by transformers' and PEFT's quantizer integrations, on a CPU build of torch
    "Detected no triton",
    # gptqmodel, imported where a job quantizes to GPTQ or loads a GPTQ model
    "Python GIL is enabled",
    # PEFT reading transformers 5's deprecated property when it loads an adapter
    DEPRECATION,
    # bitsandbytes on an AVX512-BF16 CPU, failing to fetch a hub kernel it can do without (raylm.cli.main)
    "Failed to load CPU gemm_4bit_forward",
)


def quiet_ray_console() -> None:
    """Keep Ray's INFO lines (its start-up, Ray Data's plans, Ray Train's per-report lines) off the
    console; they stay in the session's log files. Warnings, errors and tracebacks still show."""
    import ray.data  # noqa: F401 - configures the ray.data loggers, whose console handler is lowered

    logging.getLogger("ray").setLevel(logging.WARNING)
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    try:  # the worker-log printer is Ray's internal; without it, Ray prints everything as usual
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except (ImportError, AttributeError):  # a Ray without this printer: its lines stay as they are
        return
    with dispatcher._lock:
        dispatcher.handlers = [(name, _important_only(h)) for name, h in dispatcher.handlers]


def _important_only(handler):
    def handle(data: dict) -> None:
        kept, in_traceback = [], False
        for line in data.get("lines", []):
            in_traceback = in_traceback or "Traceback (most recent call last)" in line
            if "RayDeprecationWarning" in line and "/ray/" in line:
                continue  # Ray calling its own deprecated API: nothing a raylm user can act on
            if any(notice in line for notice in LIBRARY_NOTICES):
                continue
            if in_traceback or IMPORTANT.search(line) or line.startswith(KEPT_PREFIX):
                kept.append(line)
        if kept:
            handler({**data, "lines": kept})

    return handle
