"""How a compression job runs: one Ray task with the spec's resources (a GPU when `use_gpu`), given
the spec as a dict and what the driver read; on the worker, the spec back, the device and the staging
folder its output is written into.

    summary = remote.run(job, prune_task, blocks, prompts)       # on the driver
    job, device, stage = remote.start(PruneJob, spec)            # first lines of the task
"""

from __future__ import annotations

from raylm.compress import staging


def run(job, task, *args) -> dict:
    import ray

    from raylm.runtime.storage import as_written

    # the model's storage URI, not the driver's copy of it: the task fetches it on its own node
    return ray.get(ray.remote(task).options(**task_options(job.resources)).remote(as_written(job), *args))


def task_options(resources) -> dict:
    """Ray options of a task with `resources` (cpus, use_gpu)."""
    options = {"num_cpus": resources.cpus, "num_gpus": 1 if resources.use_gpu else 0}
    if not resources.use_gpu:  # DeepSpeed (imported by transformers' integrations) need not guess
        options["runtime_env"] = {"env_vars": {"DS_ACCELERATOR": "cpu"}}
    return options


def start(spec_model, spec: dict):
    """(the job, its device, a fresh staging folder beside its output), with torch's threads set to the
    task's CPUs."""
    import torch

    from raylm.runtime.startup_gc import after_startup
    from raylm.runtime.storage import localize_inputs_here

    after_startup()  # Python's collection thresholds while the model's tensors live
    job = spec_model(**spec)
    localize_inputs_here(job)  # a model named by a storage URI: this node's copy
    torch.set_num_threads(max(1, int(job.resources.cpus)))
    device = "cuda" if job.resources.use_gpu else "cpu"
    return job, device, staging.start(job.output.path.rstrip("/"))
