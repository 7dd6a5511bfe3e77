"""A model built from an architecture block is what the block says: the family's regularisation and
numerics come from the spec (defaults stated in the schema), not from transformers' own defaults."""

import pytest
import torch

from raylm.planning.models import build_model
from raylm.spec.loading import validate_dict
from raylm.spec.sections import Architecture, ModelSpec

pytestmark = pytest.mark.quick
SMALL = {"layers": 2, "heads": 2, "hidden": 32, "context": 32, "vocab_size": 64}


def built(**architecture):
    return build_model(ModelSpec(architecture={**SMALL, **architecture}), vocab_size=64, seed=0)


def train_mode_logits_twice(model) -> tuple[torch.Tensor, torch.Tensor]:
    model.train()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits, model(input_ids=ids).logits


def test_gpt2_trains_without_dropout_unless_the_spec_asks():
    model = built(family="gpt2")
    config = model.config
    assert (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) == (0.0, 0.0, 0.0)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    first, second = train_mode_logits_twice(model)
    torch.testing.assert_close(first, second, atol=0, rtol=0)  # nothing random in a training forward

    noisy = built(family="gpt2", dropout=0.1)
    assert (noisy.config.resid_pdrop, noisy.config.embd_pdrop, noisy.config.attn_pdrop) == (0.1, 0.1, 0.1)
    first, second = train_mode_logits_twice(noisy)
    assert not torch.allclose(first, second)


def test_llama_takes_dropout_norm_eps_rope_theta_and_init_from_the_spec():
    config = built(family="llama", dropout=0.05, norm_eps=1e-5, rope_theta=500000.0, init_std=0.01).config
    assert config.attention_dropout == 0.05 and config.rms_norm_eps == 1e-5
    assert config.rope_parameters["rope_theta"] == 500000.0 and config.initializer_range == 0.01
    plain = built(family="llama").config
    assert plain.attention_dropout == 0.0 and plain.rms_norm_eps == 1e-6
    assert (
        plain.rope_parameters["rope_theta"] == 10000.0 and plain.intermediate_size == 96
    )  # 8/3 x 32, to 32s


def test_the_schema_states_each_default_and_the_record_holds_the_resolved_values():
    fields = Architecture.model_json_schema()["properties"]
    assert fields["dropout"]["default"] == 0.0 and fields["init_std"]["default"] == 0.02
    assert (
        "1e-6 (llama" in fields["norm_eps"]["description"]
        and "1e-5 (gpt2" in fields["norm_eps"]["description"]
    )
    assert "default 10000" in fields["rope_theta"]["description"]
    assert "4*hidden (gpt2)" in fields["intermediate"]["description"]
    job = validate_dict(
        {
            "kind": "pretrain",
            "model": {"architecture": {"family": "gpt2", "hidden": 64, "heads": 4}},
            "data": {"generate": {"documents": 10}},
            "output": "runs/x",
        }
    )
    recorded = job.model_dump(mode="json")["model"]["architecture"]  # what spec.yaml is written from
    assert recorded["intermediate"] == 256 and recorded["norm_eps"] == 1e-5 and recorded["dropout"] == 0.0
    assert recorded["rope_theta"] is None  # gpt2 learns its positions
    with pytest.raises(ValueError, match="rope_theta is only supported by family: llama"):
        Architecture(family="gpt2", rope_theta=1e4)
