"""The DeepSpeed config raylm writes from a spec, and the user's override (mapping or JSON file)."""

import json

import pytest

from raylm.runtime.preflight import check_strategy_files
from raylm.spec.loading import validate_dict
from raylm.train.strategies.deepspeed import config
from tests.conftest import tiny_spec

pytestmark = pytest.mark.quick


def job_with(strategy, **train):
    return validate_dict(tiny_spec("/tmp/unused", strategy=strategy, train=train))


def test_generated_config_follows_the_spec():
    job = job_with(
        {"name": "deepspeed", "stage": 3, "offload_optimizer": True, "offload_params": True},
        batch_size=4,
        grad_accum=8,
        grad_clip=0.5,
        precision="bf16",
        lr=2e-4,
    )
    ds = config(job.strategy, job.train, job.train.precision, 64)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 8
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["optimizer"]["params"]["lr"] == 2e-4 and ds["optimizer"]["params"]["torch_adam"]


def test_override_merges_deeply_from_a_mapping_or_a_file(tmp_path):
    inline = job_with(
        {"name": "deepspeed", "stage": 2, "config": {"zero_optimization": {"overlap_comm": True}}}
    )
    ds = config(inline.strategy, inline.train, "fp32", 64)
    sized = {
        "reduce_bucket_size": 64 * 64,
        "stage3_prefetch_bucket_size": 3686,
        "stage3_param_persistence_threshold": 640,
    }
    assert ds["zero_optimization"] == {"stage": 2, **sized, "overlap_comm": True}
    file = tmp_path / "ds.json"
    file.write_text(
        json.dumps({"zero_optimization": {"contiguous_gradients": False}, "wall_clock_breakdown": True})
    )
    from_file = job_with({"name": "deepspeed", "config": str(file)})
    assert check_strategy_files(from_file.strategy) == []
    ds = config(from_file.strategy, from_file.train, "fp32", 64)
    assert (
        ds["zero_optimization"] == {"stage": 2, **sized, "contiguous_gradients": False}
        and ds["wall_clock_breakdown"]
    )


def test_bad_override_files_are_reported(tmp_path):
    missing = job_with({"name": "deepspeed", "config": str(tmp_path / "none.json")})
    assert "cannot read" in dict(check_strategy_files(missing.strategy))["strategy.config"]
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert (
        "not valid JSON"
        in dict(check_strategy_files(job_with({"name": "deepspeed", "config": str(broken)}).strategy))[
            "strategy.config"
        ]
    )
    owned = tmp_path / "owned.json"
    owned.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2}))
    problem = dict(check_strategy_files(job_with({"name": "deepspeed", "config": str(owned)}).strategy))
    assert "train_micro_batch_size_per_gpu" in problem["strategy.config"]
