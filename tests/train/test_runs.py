"""A run's identity on a storage URI: the spec record and strategy.json live in the output URI, so a
changed spec is refused and a resumed `auto` run keeps its strategy, as for a local folder."""

import json

import pytest

from raylm.spec.loading import validate_dict
from raylm.spec.reading import SpecError
from raylm.train.runs import check_same_run, resolve_strategy
from tests.conftest import tiny_spec


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_a_changed_spec_is_refused_and_auto_keeps_its_strategy(ray_local, tmp_path, scheme):
    output = f"{scheme}{tmp_path / 'run'}"
    job = validate_dict(tiny_spec(output, strategy="auto", train={"schedule": "constant"}))
    check_same_run(job, output)
    strategy, why = resolve_strategy(job)
    assert (tmp_path / "run" / "spec.yaml").exists()
    assert json.loads((tmp_path / "run" / "strategy.json").read_text())["strategy"] == strategy

    longer = validate_dict(
        tiny_spec(output, strategy="auto", train={"max_steps": 60, "schedule": "constant"})
    )
    check_same_run(longer, output)  # more steps at a constant rate: the same run, resumed
    # what `auto` chose at first stays, even if it would now choose otherwise
    record = {"strategy": {"name": "fsdp", "reshard_after_forward": True}, "why": "auto: first attempt"}
    (tmp_path / "run" / "strategy.json").write_text(json.dumps(record))
    kept, why = resolve_strategy(longer)
    assert kept["name"] == "fsdp" and why.startswith("kept from the run's first attempt")

    # before its first checkpoint (it stopped on a problem in its data, say) a run kept nothing: a
    # changed spec starts it over and is recorded instead
    other = validate_dict(tiny_spec(output, strategy="auto", train={"lr": 1e-2, "schedule": "constant"}))
    check_same_run(other, output)
    assert "lr: 0.01" in (tmp_path / "run" / "spec.yaml").read_text()
    (tmp_path / "run" / "checkpoints" / "checkpoint_00000010").mkdir(parents=True)
    with pytest.raises(SpecError) as refused:
        check_same_run(longer, output)
    assert "different spec (changed: train.lr)" in str(refused.value)  # max_steps: resumable

    # under a decaying schedule the length is part of the schedule: changing it on resume is refused
    cosine = f"{scheme}{tmp_path / 'cosine'}"
    check_same_run(validate_dict(tiny_spec(cosine, train={"schedule": "cosine"})), cosine)
    (tmp_path / "cosine" / "summary.json").write_text("{}")  # a finished run
    with pytest.raises(SpecError, match="train.max_steps: changed on resume: the cosine"):
        check_same_run(
            validate_dict(tiny_spec(cosine, train={"schedule": "cosine", "max_steps": 99})), cosine
        )


def test_the_cache_of_a_relative_output_is_named_absolutely(ray_local, tmp_path, monkeypatch):
    """Workers run in folders of their own: a relative output (the quickstart's runs/quickstart) must
    reach them as an absolute path."""
    from pathlib import Path

    from raylm.data.pipeline import documents, packed_blocks
    from raylm.data.tokenizer import train_tokenizer
    from raylm.train.reader import CachedSplit
    from raylm.train.runs import tokenized

    monkeypatch.chdir(tmp_path)
    job = validate_dict(tiny_spec("runs/relative"))
    docs = documents(job.data)
    tokenizer = train_tokenizer([r["text"] for r in docs.take(50)], "char", 0)
    where, manifest = tokenized(job, tokenizer, lambda: packed_blocks(docs, tokenizer, job.data))
    assert Path(where).is_absolute() and Path(where).is_relative_to(tmp_path / "runs" / "relative")
    monkeypatch.chdir("/")
    assert CachedSplit(where, "train", manifest["splits"]["train"]).read(0, 2)["input_ids"].shape == (2, 32)


@pytest.mark.quick
def test_records_keep_no_tracking_credentials(tmp_path):
    """spec.yaml (and tracking.json, the MLflow parameters) keep a tracking URI without the user and
    password it carries; the run itself uses the full URI."""
    from raylm.train.tracking import recordable, redacted

    secret = "postgresql://mlflow:s3cr3t@db.internal:5432/mlflow"
    output = tmp_path / "run"
    job = validate_dict(tiny_spec(output, logging={"mlflow": {"tracking_uri": secret}}))
    check_same_run(job, str(output))
    record = (output / "spec.yaml").read_text()
    assert "s3cr3t" not in record and "db.internal:5432/mlflow" in record
    check_same_run(job, str(output))  # the same spec again: the same run
    assert job.logging.mlflow.tracking_uri == secret
    assert (
        redacted("https://user:token@host/x") == "https://host/x"
        and redacted("http://host:5000") == "http://host:5000"
    )
    search = {"base": {"logging": {"mlflow": {"tracking_uri": secret}}}}
    assert "s3cr3t" not in json.dumps(recordable(search))
