"""Python's garbage collector while a process of a job starts.

Every Ray worker process of a raylm job imports before it does anything: a training worker torch,
ray.train, transformers and PEFT (6-10 s of CPU on a 2-core machine), Ray Train's controller and its
helper actors ray.train. Python's cyclic collector examines its youngest generation after every 700 net
allocations of container objects, and an import of that size allocates hundreds of thousands (classes,
functions, dicts): about a sixth of a training worker's import CPU went to collections that find almost
nothing. So each process of a job collects rarely while it starts (the `worker_process_setup_hook` of
the job's runtime environment, set by `raylm.runtime.cluster` and `raylm.submit`), and the code that then
holds tensors for long (the training loop, a server's model process, the quantization, pruning,
evaluation and preference-reference tasks) restores Python's thresholds once its imports are done, so
that cyclic garbage holding tensors is freed as promptly as in any other PyTorch program. Processes that
hold no tensors (Ray Train's controller, Tune's trials, Serve's replicas, Ray Data's tasks) keep the rare
collections for their life. benchmarks/startup_gc.py measures it (BENCHMARKS.md).
"""

from __future__ import annotations

import gc

HOOK = "raylm.runtime.startup_gc.during_startup"
# The youngest generation's threshold while a process starts (Python's default: 700); the older
# generations keep theirs, so a full collection stays as rare relative to young ones as before.
STARTUP_THRESHOLD = 100_000

_usual: tuple[int, ...] | None = None


def during_startup() -> None:
    """Collect the youngest generation rarely (a Ray worker process's setup hook)."""
    global _usual
    if _usual is None:
        _usual = gc.get_threshold()
    gc.set_threshold(STARTUP_THRESHOLD, *_usual[1:])


def after_startup() -> None:
    """Python's thresholds again, as they were before `during_startup` (nothing if it never ran)."""
    global _usual
    if _usual is not None:
        gc.set_threshold(*_usual)
        _usual = None
