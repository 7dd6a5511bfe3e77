"""Preemption: the SIGTERM a spot instance or a Kubernetes pod eviction sends before the kill.

A training worker that receives SIGTERM does not die at once (Ray's own handler would end the process
and lose every step since the last checkpoint): it notes the signal, every rank learns of it through
the all-reduce each step already makes, and at the end of that step the run saves a checkpoint and
stops with `Preempted`. Ray Train then restarts the workers from that checkpoint when
`failure.max_failures` allows it (on the nodes still there), or running the spec again resumes there.
The handler is installed on each worker's main thread by a Ray Train worker callback (Ray runs the
training function on another thread, where Python cannot install signal handlers).
"""

from __future__ import annotations

import signal
import threading

from ray.train.v2._internal.execution.callback import WorkerCallback  # DeveloperAPI of Ray Train V2

_received = threading.Event()


class Preempted(RuntimeError):
    """The run stopped after a checkpoint because a worker was told to shut down."""


class SigtermNotice(WorkerCallback):
    """Installs the SIGTERM handler on each training worker (its main thread) before training starts."""

    def after_init_train_context(self) -> None:
        _received.clear()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _note)


def _note(signum, frame) -> None:
    _received.set()


def received() -> bool:
    """Whether this worker process got SIGTERM (every rank asks at each step; the loop reduces it)."""
    return _received.is_set()
