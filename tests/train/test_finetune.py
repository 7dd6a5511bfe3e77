"""Fine-tuning jobs on real local Ray with 2 workers: LoRA (ddp, merged), QLoRA (ddp) and full (fsdp).

Artifacts are checked with the reference loaders: PEFT's `PeftModel.from_pretrained` on the base, and
transformers for merged and full folders.
"""

import json

import pytest
import torch

from raylm.spec import validate_dict
from raylm.submit import run_here
from tests.conftest import SFT_BASE
from tests.train.conftest import read_metrics


def finetune_spec(base, run_dir, method, **sections) -> dict:
    spec = {
        "kind": "finetune",
        "model": {"path": str(base)},
        "method": method,
        "data": {"generate": {"task": "arithmetic", "examples": 800}, "seq_len": 24},
        "train": {
            "max_steps": 30,
            "batch_size": 8,
            "lr": 1e-2,
            "eval_every": 15,
            "checkpoint_every": 15,
            "log_every": 5,
        },
        "eval": {"exact_match_examples": 16, "max_new_tokens": 6},
        "resources": {"num_workers": 2},
        "output": {"path": str(run_dir)},
    }
    for key, value in sections.items():
        spec[key] = {**spec[key], **value} if isinstance(spec.get(key), dict) else value
    return spec


def val_losses(run_dir) -> list[float]:
    return [row["val_loss"] for row in read_metrics(run_dir) if "val_loss" in row]


def probe_ids(base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    return tokenizer(["Q: 12+30=\nA: 42", "Q: 7+8=\nA: 15"], return_tensors="pt", padding=True).input_ids


def lora_count(r: int) -> int:
    h, ffn, kv = SFT_BASE["hidden"], SFT_BASE["intermediate"], SFT_BASE["hidden"] // 2
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, ffn), (h, ffn), (ffn, h)]
    return SFT_BASE["layers"] * sum(r * (i + o) for i, o in shapes)


@pytest.fixture(scope="module")
def lora_run(ray_local, sft_base, tmp_path_factory):
    output = tmp_path_factory.mktemp("lora") / "run"
    # batches grouped by length and cut to their longest example (dynamic padding)
    spec = finetune_spec(
        sft_base, output, {"name": "lora", "r": 4}, output={"merge": True}, data={"group_by_length": True}
    )
    return output, run_here(validate_dict(spec))


def test_lora_trains_and_reports(lora_run):
    run_dir, summary = lora_run
    losses = val_losses(run_dir)
    assert len(losses) == 2 and losses[-1] < losses[0]
    assert summary["parameters"]["trainable"] == lora_count(4)
    assert summary["artifact_bytes"] > 0 and summary["peak_memory"]["process_max_rss_bytes"] > 0
    assert summary["exact_match_before"]["examples"] == 16 and summary["exact_match"]["examples"] == 16
    assert json.loads((run_dir / "summary.json").read_text())["method"]["name"] == "lora"


def test_lora_adapter_loads_with_peft_and_equals_the_merged_model(lora_run, sft_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, _ = lora_run
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(sft_base), run_dir / "adapter"
    ).eval()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(sft_base).eval()
    ids = probe_ids(sft_base)
    with torch.no_grad():
        a, m, b = adapted(input_ids=ids).logits, merged(input_ids=ids).logits, base(input_ids=ids).logits
    torch.testing.assert_close(m, a, atol=1e-4, rtol=0)
    assert not torch.allclose(a, b, atol=1e-3)  # training moved the adapter away from the identity


def test_ia3_with_tfew_objectives_on_multiple_choice(ray_local, sft_base, tmp_path):
    """IA3 with T-Few's three loss terms on a generated multiple-choice task, 2 workers: the validation
    reports choice accuracy at every evaluation (reduced over both workers' examples), the loss of the
    right choices falls, and the artifact is a PEFT IA3 adapter."""
    output = tmp_path / "run"
    spec = finetune_spec(
        sft_base,
        output,
        "ia3",
        data={"format": "choices", "num_choices": 4, "generate": {"task": "arithmetic", "examples": 800}},
        train={"objective": {"lm": 1, "unlikelihood": 1, "length_norm": 1}, "lr": 3e-2},
    )
    summary = run_here(validate_dict(spec))
    evals = [row for row in read_metrics(output) if "val_loss" in row]
    assert len(evals) == 2 and all(0 <= row["val_accuracy"] <= 1 for row in evals)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert summary["metrics"]["val_accuracy"] == evals[-1]["val_accuracy"]
    config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"


def test_qlora_on_ddp(ray_local, sft_base, tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel

    from raylm import methods

    spec = finetune_spec(sft_base, tmp_path / "run", {"name": "qlora", "r": 4, "compute_dtype": "fp32"})
    job = validate_dict(spec)
    summary = run_here(job)
    losses = val_losses(tmp_path / "run")
    assert losses[-1] < losses[0]
    assert summary["parameters"]["trainable"] == lora_count(4)
    base = methods.module("qlora").load_base(str(sft_base), job.method, "cpu")
    model = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_full_finetune_on_fsdp(ray_local, sft_base, tmp_path):
    from transformers import AutoModelForCausalLM

    spec = finetune_spec(sft_base, tmp_path / "run", "full", strategy="fsdp", train={"lr": 3e-3})
    summary = run_here(validate_dict(spec))
    losses = val_losses(tmp_path / "run")
    assert losses[-1] < losses[0]
    assert summary["parameters"]["trainable"] == summary["parameters"]["total"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    base = AutoModelForCausalLM.from_pretrained(sft_base)
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert len(changed) == len(base.state_dict())  # every weight trained


def test_lora_on_deepspeed_zero2_resumes_and_exports_a_peft_adapter(ray_local, sft_base, tmp_path):
    """LoRA under ZeRO-2: checkpoints hold only the LoRA weights (the frozen base is reloaded), a
    re-run with more steps resumes from them, and the export is a PEFT adapter folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    strategy = {"name": "deepspeed", "stage": 2}
    spec = finetune_spec(sft_base, tmp_path / "run", {"name": "lora", "r": 4}, strategy=strategy)
    spec["train"] = {**spec["train"], "max_steps": 15}
    run_here(validate_dict(spec))
    states = list((tmp_path / "run" / "checkpoints").rglob("*model_states.pt"))
    assert states and all(s.stat().st_size < 200_000 for s in states)  # LoRA weights, not the base
    spec["train"] = {**spec["train"], "max_steps": 30}
    summary = run_here(validate_dict(spec))
    assert summary["resumed_from"] == 15 and summary["parameters"]["trainable"] == lora_count(4)
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(sft_base), tmp_path / "run" / "adapter"
    )
    assert sum(p.numel() for n, p in adapted.named_parameters() if "lora_" in n) == lora_count(4)
