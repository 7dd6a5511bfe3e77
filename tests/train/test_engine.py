"""The engine's compiled training step (train.compile) computes what the eager one does."""

import contextlib

import pytest
import torch


def tiny_llama(attention="sdpa"):
    from raylm.planning.models import build_model
    from raylm.spec.sections import ModelSpec

    spec = ModelSpec(
        architecture={"layers": 2, "heads": 2, "hidden": 32, "context": 32, "vocab_size": 64},
        attention=attention,
    )
    return build_model(spec, vocab_size=64, seed=0)


def engine_for(model, compiled: bool):
    from raylm.spec.sections import TrainSpec
    from raylm.train import optim
    from raylm.train.engine import Engine

    spec = TrainSpec(lr=1e-2, compile=compiled, max_steps=3)
    optimizer = optim.adamw(model, spec)
    engine = Engine(model, optimizer, optim.scheduler(optimizer, spec, 3), spec, contextlib.nullcontext())
    if compiled:
        engine.compile()
    return engine


def test_compiled_steps_match_eager_steps():
    torch.manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 64, (4, 32))} for _ in range(3)]
    eager, compiled = engine_for(tiny_llama(), False), engine_for(tiny_llama(), True)
    items = torch.tensor(4 * 31.0)  # labelled positions of a batch: every token but the first of a row
    for batch in batches:
        a = eager.micro_step(batch, items, boundary=True)
        b = compiled.micro_step(batch, items, boundary=True)
        assert abs(a - b) / 124 < 1e-4
    for (name, p), q in zip(eager.module.named_parameters(), compiled.module.parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-4, rtol=1e-4, msg=name)
    assert compiled.compiled is not None and eager.compiled is None


@pytest.mark.quick
def test_attention_kernels_agree():
    """model.attention picks the kernel: eager and sdpa compute the same logits."""
    ids = torch.randint(0, 64, (2, 16))
    sdpa, eager = tiny_llama("sdpa").eval(), tiny_llama("eager").eval()
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(
            sdpa(input_ids=ids).logits, eager(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )
