"""engine: vllm without a GPU: what raylm hands Ray Serve's LLMConfig (the model resolved as the
transformers engine resolves it, GPUs, dtype, chat template, defaults) and what it refuses at
validate instead of ignoring. Running it needs vLLM and a GPU (tests/gpu)."""

import json

import pytest

from raylm.serve.driver import vllm_config, vllm_problems
from raylm.spec.loading import validate_dict

pytestmark = pytest.mark.quick


def job(tmp_path, **fields):
    return validate_dict({"kind": "serve", "engine": "vllm", "model": str(tmp_path / "run"), **fields})


def test_vllm_gets_the_resolved_model_gpus_dtype_template_and_defaults(tmp_path):
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "config.json").write_text("{}")
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"model": str(tmp_path / "run" / "model")}))
    spec = job(
        tmp_path,
        name="m",
        model={"path": str(tmp_path / "run"), "dtype": "bfloat16"},
        chat_template="{{ messages }}",
        defaults={"temperature": 0.7, "max_new_tokens": 100},
        scaling={"gpus_per_replica": 2, "replicas": 3, "max_ongoing_requests": 16},
    )
    config = vllm_config(spec)
    assert config["model_loading_config"] == {
        "model_id": "m",
        "model_source": str(tmp_path / "run" / "model"),
    }
    assert config["engine_kwargs"] == {
        "tensor_parallel_size": 2,
        "dtype": "bfloat16",
        "chat_template": "{{ messages }}",
        "override_generation_config": {"temperature": 0.7, "max_new_tokens": 100},
    }
    assert config["deployment_config"]["autoscaling_config"] == {"min_replicas": 3, "max_replicas": 3}
    assert config["deployment_config"]["max_ongoing_requests"] == 16
    assert vllm_problems(spec) == []


def test_what_vllm_cannot_honour_is_refused_by_field(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "adapter_config.json").write_text("{}")
    spec = job(
        tmp_path,
        max_tokens_limit=100,
        defaults={"stop": ["\n"], "num_beams": 2},
        scaling={"gpus_per_replica": 0.5},
        batching={"max_cached_tokens": 1000, "compile": True},
    )
    fields = {field for field, _ in vllm_problems(spec)}
    assert fields == {"model.path", "scaling.gpus_per_replica", "max_tokens_limit", "defaults",
                      "batching.max_cached_tokens", "batching.compile"}  # fmt: skip
