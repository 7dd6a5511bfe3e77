"""Python's garbage collector while a job's processes start (raylm.runtime.startup_gc).

pytest tests/runtime/test_startup_gc.py
"""

from __future__ import annotations

import gc
import uuid

import pytest

from raylm.runtime import startup_gc


@pytest.fixture
def thresholds():
    saved = gc.get_threshold()
    yield saved
    gc.set_threshold(*saved)
    startup_gc._usual = None


@pytest.mark.quick
def test_startup_raises_the_youngest_threshold_and_after_startup_restores_the_process_own(thresholds):
    gc.set_threshold(500, 7, 9)  # a process's own thresholds, not Python's defaults
    startup_gc.after_startup()  # never started: nothing to restore
    assert gc.get_threshold() == (500, 7, 9)
    startup_gc.during_startup()
    assert gc.get_threshold() == (startup_gc.STARTUP_THRESHOLD, 7, 9)
    startup_gc.during_startup()  # twice: the thresholds to restore are still the process's own
    startup_gc.after_startup()
    assert gc.get_threshold() == (500, 7, 9)
    startup_gc.after_startup()
    assert gc.get_threshold() == (500, 7, 9)


def test_the_embedded_rays_processes_start_collecting_rarely(ray_local):
    """The setup hook of the job's runtime environment runs in its tasks and actors (Ray Train's
    workers and controller are actors), also in those with runtime environments of their own (merged
    with the job's, as the compress tasks' and Ray Train's are); the driver keeps Python's thresholds.
    (A fresh process each: a pooled worker that ran a restoring task has Python's thresholds again.)"""
    ray = ray_local
    own = {"env_vars": {"RAYLM_TEST_PROCESS": uuid.uuid4().hex}}

    @ray.remote(num_cpus=0, runtime_env=own)
    def task_threshold():
        return gc.get_threshold()

    @ray.remote(num_cpus=0, runtime_env=own)
    class Actor:
        def threshold(self):
            return gc.get_threshold()

    assert ray.get(task_threshold.remote())[0] == startup_gc.STARTUP_THRESHOLD
    actor = Actor.remote()
    assert ray.get(actor.threshold.remote())[0] == startup_gc.STARTUP_THRESHOLD
    ray.kill(actor)
    assert gc.get_threshold()[0] != startup_gc.STARTUP_THRESHOLD
