"""The command line: bad input is a message with the field and the fix, exit 2, never a traceback."""

import json
import subprocess
import sys

import yaml

from tests.conftest import tiny_spec


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
