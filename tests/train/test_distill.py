"""`kind: distill` on real local Ray: a small student distilled from the session's fine-tuning base
model (a good teacher on the generated stories it was trained on) against the same student trained
alone for the same steps (`distill.alpha: 0`), and the distillation loss against a hand computation."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

from raylm import cli
from raylm.spec.loading import validate_dict
from raylm.submit import run_here

STUDENT = {"family": "llama", "layers": 1, "heads": 2, "hidden": 32, "context": 32}


def distill_spec(teacher, output, alpha: float) -> dict:
    return {
        "kind": "distill",
        "teacher": {"path": str(teacher)},
        "model": {"architecture": STUDENT},
        "data": {"generate": {"documents": 300}, "seq_len": 32, "val_fraction": 0.1},
        "distill": {"temperature": 1.0, "alpha": alpha},
        # one worker (nothing here is about distribution) with the 2 x 16 sequences of a step
        "train": {"max_steps": 120, "batch_size": 32, "lr": 3e-3, "eval_every": 120, "checkpoint_every": 120},
        "resources": {"num_workers": 1},
        "output": str(output),
    }


def test_distilled_student_beats_the_student_alone(ray_local, sft_base, tmp_path):
    distilled = run_here(validate_dict(distill_spec(sft_base, tmp_path / "distilled", 0.5)))
    alone = run_here(validate_dict(distill_spec(sft_base, tmp_path / "alone", 0.0)))
    assert distilled["steps"] == alone["steps"] == 120
    assert distilled["teacher"] == str(sft_base) and distilled["distill"]["alpha"] == 0.5
    # the same held-out blocks, the student's own loss in both
    assert distilled["metrics"]["val_ppl"] < alone["metrics"]["val_ppl"], (
        distilled["metrics"],
        alone["metrics"],
    )
    saved = json.loads((tmp_path / "distilled" / "model" / "config.json").read_text())
    assert (
        saved["hidden_size"] == 32
        and saved["vocab_size"] == json.loads((sft_base / "config.json").read_text())["vocab_size"]
    )


@pytest.mark.quick
def test_distillation_loss_is_the_formula():
    from raylm.train.distill import distillation_loss

    torch.manual_seed(0)
    student_logits, teacher_logits = torch.randn(2, 5, 7), torch.randn(2, 5, 7)

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": self.logits})()

    ids = torch.randint(0, 7, (2, 5))
    loss = distillation_loss(Fixed(teacher_logits), 2.0, 0.3)(Fixed(student_logits), {"input_ids": ids})
    expected, count = 0.0, 0
    for b in range(2):
        for t in range(4):  # the last position predicts nothing
            p = F.softmax(teacher_logits[b, t] / 2.0, -1)
            kl = sum(
                p[v] * (torch.log(p[v]) - F.log_softmax(student_logits[b, t] / 2.0, -1)[v]) for v in range(7)
            )
            ce = -F.log_softmax(student_logits[b, t], -1)[ids[b, t + 1]]
            expected += 0.3 * 4.0 * kl + 0.7 * ce
            count += 1
    torch.testing.assert_close(loss, expected / count)


def test_a_student_with_another_tokenizer_is_refused(tmp_path, sft_base):
    from transformers import AutoModelForCausalLM

    from raylm.data.tokenizer import train_tokenizer
    from raylm.planning.models import architecture_config
    from raylm.spec.sections import Architecture

    other = train_tokenizer(["a completely different alphabet: xyz 123"], "char", 0)
    folder = tmp_path / "student"
    arch = Architecture(layers=1, heads=2, hidden=32, context=32)
    AutoModelForCausalLM.from_config(architecture_config(arch, 200, other)).save_pretrained(folder)
    other.save_pretrained(folder)
    spec = {**distill_spec(sft_base, tmp_path / "out", 0.5), "model": {"path": str(folder)}}
    file = tmp_path / "spec.yaml"
    file.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(cli.main, ["validate", str(file)])
    assert result.exit_code == 2 and "differs from the teacher's" in result.output, result.output
    spec = {**distill_spec(sft_base, tmp_path / "out", 0.5), "tokenizer": {"train": {"type": "char"}}}
    file.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(cli.main, ["validate", str(file)])
    assert result.exit_code == 2 and "teacher's tokens" in result.output, result.output


def test_a_relative_teacher_path_reaches_the_workers_absolute(ray_local, sft_base, tmp_path, monkeypatch):
    """Ray Train's workers run in folders of their own: the driver makes local paths absolute."""
    from raylm.train.runs import prepare_run

    monkeypatch.chdir(sft_base.parent)
    job = validate_dict(distill_spec(sft_base.name, tmp_path / "out", 0.5))
    prepare_run(job)
    assert job.teacher.path == job.tokenizer.path == str(sft_base.resolve())
