"""FSDP2 and DeepSpeed ZeRO-2/3 pretraining on real local Ray (2 CPU workers, gloo).

Each strategy does the same arithmetic as DDP up to float reduction order, so its exported model must
match the DDP reference run's; the export must equal the libraries' own consolidation of the final
checkpoint (DCP's dcp_to_torch_save, DeepSpeed's zero_to_fp32). `strategy: auto` and an elastic
worker range run through the FSDP case.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raylm.planning import memory
from raylm.planning.memory import GiB
from raylm.spec.loading import validate_dict
from raylm.submit import run_here
from raylm.train.metrics import read_metrics
from tests.conftest import free_port, tiny_spec


def exported(run_dir):
    return load_file(run_dir / "model" / "model.safetensors")


def assert_matches_ddp(run_dir, reference_dir):
    mine, ddp = exported(run_dir), exported(reference_dir)
    assert set(mine) == set(ddp)
    for name, tensor in ddp.items():
        torch.testing.assert_close(mine[name], tensor, atol=1e-4, rtol=1e-3, msg=name)
    evals = [row["val_loss"] for row in read_metrics(run_dir) if "val_loss" in row]
    assert len(evals) == 3 and evals[-1] < evals[0] - 0.3


def assert_reloads_and_generates(run_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    prompt = tokenizer("Once upon a", return_tensors="pt").input_ids
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == prompt.shape[1] + 8


# ---- fsdp, chosen by `strategy: auto`, on an elastic worker range ------------------------------------


def auto_budget_for_fsdp(spec: dict) -> float:
    """A memory_per_worker_gb in which the estimate fits FSDP but not ddp (an elastic run's only other
    candidate), on 2 workers, counted as `auto` counts this job (its attention kernel on CPU workers)."""
    from raylm.planning.plan import HEADROOM, flash_attention

    job = validate_dict(spec)
    shape = memory.shape_of_job(job)
    needs = {
        key: memory.estimate(
            shape,
            key,
            "fp32",
            2,
            job.train.batch_size,
            job.data.seq_len,
            flash_attention=flash_attention(job),
        ).total
        for key in ("ddp", "fsdp")
    }
    assert needs["fsdp"] < needs["ddp"]
    return (needs["fsdp"] + needs["ddp"]) / 2 / HEADROOM / GiB


@pytest.fixture(scope="module")
def fsdp_run(ray_local, tmp_path_factory):
    output = tmp_path_factory.mktemp("fsdp") / "run"
    # [2, 3] workers of 1.5 CPUs on the session's 4-CPU Ray: Ray Train starts with the 2 that fit.
    spec = tiny_spec(output, resources={"num_workers": [2, 3], "cpus_per_worker": 1.5})
    spec["strategy"] = {"name": "auto", "memory_per_worker_gb": auto_budget_for_fsdp(spec)}
    return output, spec, run_here(validate_dict(spec))


def test_auto_picks_fsdp_and_says_why(fsdp_run):
    _, _, summary = fsdp_run
    assert summary["strategy"]["name"] == "fsdp"
    why = summary["strategy"]["why"]
    # ddp did not fit; the ZeRO stages are not candidates for an elastic run
    assert why.startswith("auto: fsdp needs") and "ddp needs" in why and "zero" not in why


def test_elastic_range_starts_with_the_workers_that_fit(fsdp_run):
    _, _, summary = fsdp_run
    assert len(summary["worker_nodes"]) == 2


def test_fsdp_matches_ddp_and_reloads(fsdp_run, reference_run):
    run_dir, _, _ = fsdp_run
    assert_matches_ddp(run_dir, reference_run[0])
    assert_reloads_and_generates(run_dir)


def test_fsdp_export_equals_dcp_consolidation(fsdp_run, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run_dir, _, _ = fsdp_run
    last = run_dir / "checkpoints" / "checkpoint_00000030"
    assert sorted(p.name for p in (last / "sharded").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    dcp_to_torch_save(last / "sharded", tmp_path / "full.pt")
    consolidated = torch.load(tmp_path / "full.pt", weights_only=True)["model"]
    mine = exported(run_dir)
    assert set(consolidated) == set(mine)
    assert all(torch.equal(consolidated[k], mine[k]) for k in mine)


def test_elastic_run_resumes_on_fewer_workers(fsdp_run):
    """The same run continued with a range of [1, 3] where only one worker fits: DCP reshards the
    2-worker checkpoint, and the strategy `auto` chose is kept (the estimate now says nothing fits)."""
    run_dir, spec, _ = fsdp_run
    spec = {**spec, "resources": {"num_workers": [1, 3], "cpus_per_worker": 3}}
    spec["train"] = {**spec["train"], "max_steps": 40}
    summary = run_here(validate_dict(spec))
    assert summary["resumed_from"] == 30 and len(summary["worker_nodes"]) == 1
    assert (
        summary["strategy"]["name"] == "fsdp"
        and "kept from the run's first attempt" in summary["strategy"]["why"]
    )
    evals = {row["step"]: row["val_loss"] for row in read_metrics(run_dir) if "val_loss" in row}
    assert sorted(evals) == [10, 20, 30, 40] and evals[40] < evals[30]


# ---- fsdp from a model folder: only rank 0 holds a full copy while loading --------------------------

# Big enough that one copy (~160 MB in fp32) stands out from a worker's own memory; mostly blocks,
# so a shard is about half of it.
BIG = {"layers": 12, "heads": 8, "hidden": 512, "intermediate": 1408, "context": 64, "vocab_size": 2048}


@pytest.fixture(scope="module")
def big_base(sft_base, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm.planning.models import architecture_config
    from raylm.spec.sections import Architecture

    tokenizer = AutoTokenizer.from_pretrained(sft_base)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(architecture_config(Architecture(**BIG), 0, tokenizer))
    folder = tmp_path_factory.mktemp("big") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, sum(p.numel() for p in model.parameters()) * 4


def big_finetune(base, output, strategy) -> dict:
    return {
        "kind": "finetune",
        "model": {"path": str(base)},
        "method": "full",
        "data": {"generate": {"task": "arithmetic", "examples": 200}, "seq_len": 24},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-4, "eval_every": 2, "eval_batches": 1},
        "eval": {"exact_match_examples": 0},
        "resources": {"num_workers": 2},
        "strategy": strategy,
        "output": {"path": str(output)},
    }


def test_fsdp_loads_a_full_copy_on_rank_0_only(ray_local, big_base, tmp_path):
    """Measured: what building, loading and sharding added to each worker's peak host memory (the
    kernel's peak-RSS counter, reset before the model is built). Bound: a non-zero rank stays below
    70% of one full copy (its half of the shards plus one tensor in flight); fsdp's rank 0 holds at
    least one. (That a run filled from rank 0 trains like DDP: test_fsdp_matches_ddp_and_reloads, and
    exactly, one full fine-tuning step under fsdp: tests/train/test_finetune.py's accumulation test.)"""
    base, full_bytes = big_base
    fsdp = run_here(validate_dict(big_finetune(base, tmp_path / "fsdp", "fsdp")))
    rank0, rank1 = fsdp["host_memory"]["load"]
    assert rank1 < 0.7 * full_bytes, (rank1 / full_bytes, rank0 / full_bytes)
    assert rank0 > 0.9 * full_bytes
    assert fsdp["steps"] > 0 and (tmp_path / "fsdp" / "model" / "model.safetensors").exists()


# ---- DeepSpeed ZeRO ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3-offload"])
def deepspeed_run(request, ray_local, tmp_path_factory):
    """ZeRO-2, and ZeRO-3 with its parameters and optimizer offloaded: CPU offload on CPU workers moves
    nothing, but drives DeepSpeed's offloading code paths through training, checkpoints and the export."""
    output = tmp_path_factory.mktemp(f"zero{request.param}") / "run"
    strategy = {
        "name": "deepspeed",
        "stage": request.param,
        "config": {"zero_optimization": {"reduce_bucket_size": 50_000}},  # merged over raylm's config
    }
    if request.param == 3:
        strategy |= {"offload_params": True, "offload_optimizer": True}
    return output, run_here(validate_dict(tiny_spec(output, strategy=strategy)))


def test_deepspeed_matches_ddp_and_reloads(deepspeed_run, reference_run):
    run_dir, summary = deepspeed_run
    assert summary["strategy"]["name"] == "deepspeed"
    assert_matches_ddp(run_dir, reference_run[0])
    assert_reloads_and_generates(run_dir)


def test_deepspeed_export_equals_zero_to_fp32(deepspeed_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir, _ = deepspeed_run
    last = run_dir / "checkpoints" / "checkpoint_00000030"
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(last), tag="deepspeed")
    mine = exported(run_dir)
    assert set(consolidated) == set(mine)
    assert all(torch.equal(consolidated[k], mine[k]) for k in mine)


def test_deepspeed_bf16_exports_the_fp32_master_weights(ray_local, tmp_path):
    """Under bf16 DeepSpeed computes with bf16 copies of the weights and steps fp32 master weights:
    the export is the master weights, equal to `zero_to_fp32`'s consolidation of the last checkpoint,
    not the bf16 copies (which would equal their own rounding to bf16)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    output = tmp_path / "run"
    spec = tiny_spec(
        output, strategy={"name": "deepspeed", "stage": 2}, train={"precision": "bf16", "max_steps": 10}
    )
    run_here(validate_dict(spec))
    last = output / "checkpoints" / "checkpoint_00000010"
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(last), tag="deepspeed")
    mine = exported(output)
    assert set(consolidated) == set(mine)
    assert all(torch.equal(consolidated[k], mine[k]) for k in mine)
    weight = mine["model.layers.0.mlp.up_proj.weight"]
    assert weight.dtype == torch.float32 and not torch.equal(weight, weight.bfloat16().float())


def _partition_rank(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: build BIG (rank 0 whole, rank 1 on the meta device), partition it from
    rank 0 for ZeRO-3, and write what that did to this rank's host memory and what the gathered
    weights are."""
    import json
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    import deepspeed
    from transformers import AutoModelForCausalLM

    from raylm.planning.models import architecture_config, empty_weights
    from raylm.spec.sections import Architecture, TrainSpec
    from raylm.spec.strategies import DeepSpeedStrategy
    from raylm.train import hostmem
    from raylm.train.strategies.deepspeed import config, partition_from_rank0

    settings = config(
        DeepSpeedStrategy(name="deepspeed", stage=3), TrainSpec(max_steps=1), "fp32", BIG["hidden"]
    )
    arch = architecture_config(Architecture(**BIG), 0)
    import transformers.models.llama.modeling_llama  # noqa: F401 - its code is not the model's memory

    torch.manual_seed(0)
    start = hostmem.reset_peak()
    with empty_weights(rank != 0):
        model = AutoModelForCausalLM.from_config(arch)
    partition_from_rank0(model, settings, torch.device("cpu"))
    facts = {"grew": hostmem.peak() - start}
    sums = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            sums[name] = param.double().sum().item()
    facts["sums"] = sums
    Path(out, f"rank{rank}.json").write_text(json.dumps(facts))
    dist.destroy_process_group()


def test_zero3_partitions_rank_0s_weights_one_module_at_a_time(tmp_path, monkeypatch):
    """Rank 1 builds only the structure; partitioning allocates one module's parameters at a time,
    fills them from rank 0 and keeps a half: building and partitioning grow its peak host memory by
    well under one copy (bound: 75%; rank 0, which builds the whole model, by more than 90%), and the
    gathered weights are rank 0's (the same seeded model built whole here)."""
    import json

    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    from raylm.planning.models import architecture_config
    from raylm.spec.sections import Architecture

    # large tensors are mapped and unmapped, so the kernel's counters see live memory, not glibc's
    # reuse pool (inherited by the spawned ranks)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    port = free_port()
    mp.spawn(_partition_rank, args=(port, str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    torch.manual_seed(0)
    whole = AutoModelForCausalLM.from_config(architecture_config(Architecture(**BIG), 0))
    full_bytes = sum(p.numel() for p in whole.parameters()) * 4
    assert ranks[1]["grew"] < 0.75 * full_bytes, ranks[1]["grew"] / full_bytes
    assert ranks[0]["grew"] > 0.9 * full_bytes  # rank 0 built the whole model
    expected = {name: p.double().sum().item() for name, p in whole.named_parameters()}
    for facts in ranks:
        assert facts["sums"] == pytest.approx(expected, rel=1e-9)
