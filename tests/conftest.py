"""Shared fixtures: one local Ray for the whole session (each start costs seconds), tiny specs."""

import os

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from raylm.submit import start_local_ray

    # Logical CPUs: two training workers plus room for Ray Data's tasks on a 2-core machine.
    start_local_ray(num_cpus=4)
    from raylm.data import configure_ray_data

    configure_ray_data()
    yield ray
    ray.shutdown()


def tiny_spec(output, **sections) -> dict:
    """A pretrain spec small enough for a CPU test: 2 layers, hidden 64, char tokenizer."""
    spec = {
        "kind": "pretrain",
        "model": {"architecture": {"family": "llama", "layers": 2, "heads": 2, "hidden": 64, "context": 32}},
        "tokenizer": {"train": {"type": "char"}},
        "data": {"generate": {"documents": 400}, "seq_len": 32},
        "train": {
            "max_steps": 30,
            "batch_size": 8,
            "lr": 3e-3,
            "eval_every": 10,
            "checkpoint_every": 10,
            "log_every": 5,
        },
        "resources": {"num_workers": 2},
        "output": str(output),
    }
    for key, value in sections.items():
        spec[key] = {**spec[key], **value} if isinstance(spec.get(key), dict) else value
    return spec
