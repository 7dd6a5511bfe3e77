"""Preference tuning on real local Ray: LoRA DPO (+ the chosen answers' NLL) on the generated copy task,
starting from a briefly supervised model, under ddp with the live reference (the adapter switched
off) and under fsdp with the reference precomputed; full fine-tuning under fsdp and ZeRO-3 with a
sharded frozen reference copy."""

import json
import math

import pytest
import torch

from raylm.spec.loading import validate_dict
from raylm.submit import run_here
from raylm.train.metrics import read_metrics


@pytest.fixture(scope="module")
def supervised_start(sft_base, tmp_path_factory):
    """The supervised starting point: the session's base fine-tuned for 30 steps on the copy task's
    answers (in this process), so that it copies some words and misspells others."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm.data.sft import collate, encode
    from raylm.data.tasks import generate
    from raylm.spec.sft import SFTDataSpec

    tokenizer = AutoTokenizer.from_pretrained(sft_base)
    model = AutoModelForCausalLM.from_pretrained(sft_base)
    spec = SFTDataSpec(generate={"task": "copy"}, seq_len=24)
    rows = generate("copy", 400, seed=7)
    encoded = collate([encode(r["prompt"], r["completion"], tokenizer, spec) for r in rows], 24, 0)
    batch = {k: torch.from_numpy(v) for k, v in encoded.items()}
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        picked = torch.randint(0, len(rows), (16,))
        model(**{k: v[picked] for k, v in batch.items()}).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("supervised") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def dpo_spec(base, output, **changes) -> dict:
    spec = {
        "kind": "finetune",
        "model": {"path": str(base)},
        "method": {"name": "lora", "r": 8, "alpha": 16},
        "data": {"generate": {"task": "copy", "examples": 1000}, "format": "preference", "seq_len": 24},
        "preference": {"objective": "dpo", "beta": 0.2, "sft_weight": 1.0},
        "train": {
            "max_steps": 160,
            "batch_size": 8,
            "lr": 2e-3,
            "eval_every": 80,
            "checkpoint_every": 160,
            "log_every": 20,
        },
        "eval": {"exact_match_examples": 32, "max_new_tokens": 8},
        "resources": {"num_workers": 2},
        "output": str(output),
    }
    for key, value in changes.items():
        merge = isinstance(spec.get(key), dict) and isinstance(value, dict) and key != "method"
        spec[key] = {**spec[key], **value} if merge else value
    return spec


@pytest.fixture(scope="module")
def dpo_runs(ray_local, supervised_start, tmp_path_factory):
    """The same LoRA DPO run under ddp (live reference) and fsdp (reference precomputed)."""
    root = tmp_path_factory.mktemp("dpo")
    ddp = run_here(validate_dict(dpo_spec(supervised_start, root / "ddp")))
    fsdp = run_here(
        validate_dict(
            dpo_spec(
                supervised_start,
                root / "fsdp",
                strategy="fsdp",
                preference={"precompute_reference": True},
            )
        )
    )
    return root, ddp, fsdp


def test_dpo_ranks_the_chosen_answers_first_and_answers_better_than_its_start(dpo_runs):
    root, summary, _ = dpo_runs
    metrics = summary["metrics"]
    # before training the policy is its reference: every reward 0, a tie in every pair (accuracy 0.5)
    assert metrics["reward_accuracy"] > 0.9 and metrics["reward_margin"] > 0
    assert metrics["rewards_chosen"] > metrics["rewards_rejected"]
    assert summary["exact_match"]["exact_match"] > summary["exact_match_before"]["exact_match"]
    evaluations = [row for row in read_metrics(root / "ddp") if "reward_accuracy" in row]
    assert [row["step"] for row in evaluations] == [80, 160]
    assert "val_ppl" not in evaluations[-1]  # a preference loss is no perplexity


def test_dpo_under_fsdp_with_a_precomputed_reference_ends_where_ddp_with_the_live_one_does(dpo_runs):
    """Two differences at once (the strategy, the reference's source): each alone would have to be
    cancelled exactly by the other for them to agree by chance."""
    from safetensors.torch import load_file

    root, ddp, fsdp = dpo_runs
    (cache,) = (root / "fsdp" / "data-cache").iterdir()
    (reference,) = cache.glob("reference-*")
    assert {p.name for p in reference.iterdir()} == {"train.npy", "val.npy", "done"}
    a = load_file(root / "ddp" / "adapter" / "adapter_model.safetensors")
    b = load_file(root / "fsdp" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-4, rtol=0, msg=name)
    for key in ("val_loss", "reward_accuracy", "reward_margin"):
        assert fsdp["metrics"][key] == pytest.approx(ddp["metrics"][key], abs=1e-4)


@pytest.mark.parametrize("strategy", ["fsdp", {"name": "deepspeed", "stage": 3}], ids=["fsdp", "zero3"])
def test_full_finetuning_starts_at_its_sharded_reference(ray_local, supervised_start, tmp_path, strategy):
    """Full fine-tuning keeps a frozen copy of the starting model as its reference, sharded over the
    2 workers like the policy (FSDP2's shards, ZeRO-3's partitions): at the first step the two are
    equal, so every pair's DPO loss is -log sigmoid(0) = log 2, whatever the data."""
    spec = dpo_spec(
        supervised_start,
        tmp_path / "run",
        method="full",
        strategy=strategy,
        preference={"sft_weight": 0.0},
        train={"max_steps": 2, "log_every": 1, "eval_every": 2, "checkpoint_every": 2, "lr": 1e-3},
        eval={"exact_match_examples": 0},
    )
    summary = run_here(validate_dict(spec))
    rows = [row for row in read_metrics(tmp_path / "run") if "loss" in row]
    assert rows[0]["step"] == 1 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[1]["loss"] != pytest.approx(math.log(2), abs=1e-6)  # the policy moved
    assert summary["strategy"]["name"] == (strategy["name"] if isinstance(strategy, dict) else strategy)
    assert (
        json.loads((tmp_path / "run" / "summary.json").read_text())["parameters"]["trainable_percent"] == 100
    )


def test_a_bad_example_after_good_ones_is_named_not_a_traceback(ray_local, sft_base, tmp_path):
    """A tokenizing task yields the bad example's message as a row (Ray Data may merge it into one
    block with the task's earlier good rows: one schema); the cache writer raises it in the driver,
    and `raylm run` reports it as a spec problem before any training worker starts."""
    from click.testing import CliRunner

    from raylm.cli import main

    rows = [{"prompt": f"Say: w{i}\nA:", "chosen": " a", "rejected": " b"} for i in range(700)]
    rows[600]["rejected"] = "  "
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = dpo_spec(sft_base, tmp_path / "run", data={"generate": None, "path": str(data)})
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(json.dumps(spec))
    result = CliRunner().invoke(main, ["run", str(spec_file)])
    assert result.exit_code == 2, result.output
    assert "the example with prompt 'Say: w600\\nA:': its rejected answer is empty" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()

    # every pair's answers equal: nothing to learn, said before any worker starts
    data.write_text("".join(json.dumps({**r, "rejected": r["chosen"]}) + "\n" for r in rows[:50]))
    result = CliRunner().invoke(main, ["run", str(spec_file)])
    assert result.exit_code == 2 and "every pair's chosen answer equals its rejected one" in result.output
    assert "Traceback" not in result.output
