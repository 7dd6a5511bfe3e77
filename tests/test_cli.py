"""The command line: bad input is a message with the field and the fix, exit 2, never a traceback."""

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import tiny_spec

pytestmark = pytest.mark.quick


def raylm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "raylm", *args], capture_output=True, text=True, cwd=cwd)


def test_start_up_imports_no_heavy_library():
    code = "import sys, raylm.cli; heavy = {'torch', 'ray', 'transformers', 'peft'} & set(sys.modules); print(sorted(heavy))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def test_validate_ok_and_reports_every_problem(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(tiny_spec(tmp_path / "out")))
    bad = tmp_path / "bad.yaml"
    spec = tiny_spec(tmp_path / "out", train={"lr": "fast", "batch_size": 0})
    spec["data"] = {"path": str(tmp_path / "missing.txt"), "seq_len": 32}
    bad.write_text(yaml.safe_dump(spec))

    ok = raylm("validate", str(good))
    assert ok.returncode == 0 and "ok (pretrain)" in ok.stdout
    out = raylm("validate", str(good), str(bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "train.lr" in out.stderr and "train.batch_size" in out.stderr
    # spec errors come first; file checks run once the spec itself is valid
    fixed = raylm("validate", str(bad), "--set", "train.lr=1e-3", "--set", "train.batch_size=4")
    assert fixed.returncode == 2 and "data.path" in fixed.stderr and "does not exist" in fixed.stderr
    assert (
        raylm(
            "validate", str(bad), "--no-files", "--set", "train.lr=1e-3", "--set", "train.batch_size=4"
        ).returncode
        == 0
    )


def test_run_rejects_bad_input_before_starting_ray(tmp_path):
    spec = tiny_spec(tmp_path / "out")
    spec["data"] = {"path": str(tmp_path / "empty.txt"), "seq_len": 32}
    (tmp_path / "empty.txt").write_text("")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = raylm("run", str(path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "data.path" in out.stderr and "empty" in out.stderr
    assert "Started a local Ray" not in out.stderr + out.stdout
    assert not (tmp_path / "out").exists()


def test_run_bad_override_and_missing_file(tmp_path):
    out = raylm("run", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2 and "no such spec file" in out.stderr and "Traceback" not in out.stderr
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(tmp_path / "out")))
    out = raylm("run", str(path), "--set", "train.lr")
    assert out.returncode == 2 and "KEY=VALUE" in out.stderr


def test_submit_to_remote_without_token_is_refused(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(tmp_path / "out")))
    env_free = subprocess.run(
        [sys.executable, "-m", "raylm", "run", str(path), "--address", "http://10.1.2.3:8265"],
        capture_output=True,
        text=True,
        env={k: v for k, v in __import__("os").environ.items() if not k.startswith("RAY_AUTH")},
    )
    assert env_free.returncode == 2 and "token authentication" in env_free.stderr


def test_schema_command():
    out = raylm("schema", "pretrain")
    schema = json.loads(out.stdout)
    assert schema["title"] == "PretrainJob" and "train" in schema["properties"]
    assert raylm("schema", "nonsense").returncode == 2


def test_merge_writes_a_plain_folder_equal_to_the_adapter(sft_base, tmp_path):
    """`raylm merge` folds a saved LoRA adapter into its base; refuses what cannot merge. (Run in this
    process: a command of its own would spend seconds importing torch, transformers and PEFT again.)"""
    import torch
    from click.testing import CliRunner
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from raylm import methods
    from raylm.cli import main
    from raylm.methods.adapter import AdapterMethod
    from raylm.methods.lora import LoraMethod

    lora = LoraMethod(name="lora", r=4)
    model = methods.apply(AutoModelForCausalLM.from_pretrained(sft_base), lora)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    methods.module("lora").save(model, tmp_path / "adapter")
    (tmp_path / "adapter" / "raylm_method.json").write_text(
        json.dumps({"method": lora.model_dump(), "base": str(sft_base)})
    )
    out = CliRunner().invoke(main, ["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")])
    assert out.exit_code == 0, out.output
    ids = torch.tensor([[5, 9, 12, 7, 3]])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_base), tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, adapted.eval()(input_ids=ids).logits, atol=1e-4, rtol=0
        )

    houlsby = methods.apply(AutoModelForCausalLM.from_pretrained(sft_base), AdapterMethod(name="adapter"))
    methods.module("adapter").save(houlsby, tmp_path / "houlsby")
    (tmp_path / "houlsby" / "raylm_method.json").write_text(
        json.dumps({"method": {"name": "adapter"}, "base": str(sft_base)})
    )
    refused = CliRunner().invoke(main, ["merge", str(tmp_path / "houlsby"), "--out", str(tmp_path / "x")])
    # exit 2 is raylm's message; an exception escaping the command would exit 1 with a traceback
    assert refused.exit_code == 2 and "cannot be merged" in refused.output, refused.output
