"""`strategy: auto` picks the least sharding that the memory estimate fits, for a table of model sizes
and device memories (the estimate's own arithmetic is tested in test_memory.py)."""

import pytest

from raylm.planning import memory, plan
from raylm.planning.memory import GiB

pytestmark = pytest.mark.quick

# params, workers, GiB per device, precision, gradient checkpointing -> expected choice
TABLE = [
    (125e6, 8, 80, "bf16", False, "ddp"),  # small model: everything fits, no sharding needed
    (1e9, 8, 80, "bf16", True, "ddp"),  # 16 GB of states + checkpointed activations < 72 GB
    (7e9, 8, 80, "bf16", True, "zero1"),  # 112 GB of states: sharding Adam's 84 GB is enough
    (7e9, 8, 24, "bf16", True, "fsdp"),  # 24 GB cards: weights must be sharded too
    # two 80 GB cards: ZeRO-2's 16-bit module (14 GB), half of the fp32 master and moments (42 GB) and
    # at the step half of the fp32 gradients and AdamW's temporary (28 GB) do not fit; fsdp shards it all
    (7e9, 2, 80, "bf16", True, "fsdp"),
    (13e9, 8, 40, "bf16", True, "fsdp"),
    (1e9, 1, 16, "fp32", False, None),  # 16 GB of states alone on one 16 GB card: nothing fits
]


@pytest.mark.parametrize("params,workers,gib,precision,checkpointing,expected", TABLE)
def test_auto_choice_table(params, workers, gib, precision, checkpointing, expected):
    shape = memory.shape_from_params(params)
    args = dict(precision=precision, batch=1, seq_len=2048, gradient_checkpointing=checkpointing)
    fits = {
        key: memory.estimate(shape, key, workers=workers, flash_attention=True, **args).total
        <= 0.9 * gib * GiB
        for key, _ in plan.CANDIDATES
    }
    if expected is None:
        assert not any(fits.values())
        with pytest.raises(plan.NothingFits, match="no strategy fits"):
            plan.choose(shape, workers, gib * GiB, flash_attention=True, **args)
        return
    choice = plan.choose(shape, workers, gib * GiB, flash_attention=True, **args)
    key = (
        choice.strategy["name"]
        if choice.strategy["name"] != "deepspeed"
        else f"zero{choice.strategy['stage']}"
    )
    assert key == expected
    # the choice is the first candidate that fits, and it does fit
    assert [k for k, ok in fits.items() if ok][0] == expected
    assert choice.needed <= choice.budget and expected in choice.reason


def test_elastic_runs_skip_zero_stages():
    shape = memory.shape_from_params(7e9)
    choice = plan.choose(
        shape, 8, 80 * GiB, precision="bf16", gradient_checkpointing=True, flash_attention=True, elastic=True
    )
    assert choice.strategy == {"name": "fsdp"}


def test_auto_never_picks_fsdp_for_fp16_and_workers_take_one_whole_gpu():
    from raylm.spec.loading import validate_dict
    from raylm.spec.reading import SpecError

    def job(precision, **resources):
        return validate_dict({
            "kind": "pretrain",
            "model": {"architecture": {"layers": 32, "heads": 32, "hidden": 4096, "context": 2048}},
            "data": {"generate": {"documents": 50}, "seq_len": 2048},
            "train": {"precision": precision, "gradient_checkpointing": True},
            "resources": {"num_workers": 8, "use_gpu": True, **resources},
            "strategy": {"name": "auto", "memory_per_worker_gb": 24},
            "output": "runs/x",
        })  # fmt: skip

    assert plan.resolve(job("bf16"))[0]["name"] == "fsdp"  # 7B on 24 GB cards: only fsdp fits
    with pytest.raises(plan.NothingFits, match="deepspeed, stage: 3, offload"):  # fsdp has no fp16 scaling
        plan.resolve(job("fp16"))
    for bad in (0.5, 2):
        with pytest.raises(SpecError, match="one whole GPU"):
            job("bf16", gpus_per_worker=bad)


def test_sixteen_bit_weights_never_train_under_ddp():
    from raylm.spec.loading import validate_dict
    from raylm.spec.reading import SpecError

    spec = {
        "kind": "pretrain",
        "model": {
            "architecture": {"layers": 2, "heads": 2, "hidden": 64, "context": 64},
            "dtype": "bfloat16",
        },
        "data": {"generate": {"documents": 50}, "seq_len": 32},
        "train": {"precision": "bf16"},
        "output": "runs/x",
    }
    with pytest.raises(SpecError, match="no float32 master copy"):
        validate_dict(spec)  # ddp is the default strategy
    auto = validate_dict({**spec, "strategy": {"name": "auto", "memory_per_worker_gb": 80}})
    assert plan.resolve(auto)[0]["name"] != "ddp"  # the smallest model: ddp would fit first
    validate_dict({**spec, "model": {**spec["model"], "dtype": "float32"}})  # autocast over float32: fine


def test_attention_scores_are_counted_where_the_kernel_keeps_them(tmp_path):
    """SDPA runs a flash kernel (no seq^2 scores kept) on a GPU, and on a CPU unless attention dropout is
    on in training (torch's CPU SDPA then takes its math path); eager attention keeps them everywhere. The
    dropout is read from the architecture block or from the model folder's config (GPT-2's attn_pdrop)."""
    from transformers import GPT2Config

    from raylm.spec.loading import validate_dict
    from tests.conftest import tiny_spec

    def job(dropout=0.0, gpu=False, attention=None, path=None):
        spec = tiny_spec(tmp_path / "out")
        spec["model"]["architecture"]["dropout"] = dropout
        if attention:
            spec["model"]["attention"] = attention
        if path:
            spec["model"] = {"path": str(path)}
        spec["resources"] = {"num_workers": 2, "use_gpu": gpu}
        return validate_dict(spec)

    assert plan.flash_attention(job())  # a CPU worker, SDPA, no dropout
    assert not plan.flash_attention(job(dropout=0.1))
    assert plan.flash_attention(job(dropout=0.1), training=False)  # an evaluation pass: no dropout
    assert plan.flash_attention(job(dropout=0.1, gpu=True))
    assert not plan.flash_attention(job(attention="eager", gpu=True))
    GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=300).save_pretrained(tmp_path / "gpt2")
    assert plan.attention_dropout(job(path=tmp_path / "gpt2")) == 0.1  # transformers' GPT-2 default
    assert not plan.flash_attention(job(path=tmp_path / "gpt2"))
