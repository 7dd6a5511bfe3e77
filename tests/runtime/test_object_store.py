"""Runs whose output is a bucket on an S3-compatible server (moto's standalone server on loopback,
reached through AWS_ENDPOINT_URL like any S3 endpoint): checkpoints, the tokenized data, the logs and
the final artifacts live in the bucket, a killed run resumes from the bucket's checkpoints, and
nothing of the run stays on the local disk."""

import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
import yaml
from safetensors.torch import load, load_file

from raylm.runtime import storage
from raylm.spec.loading import validate_dict
from raylm.submit import run_here
from tests.conftest import run_cli_then_kill, tiny_spec


def bucket_files(uri: str) -> dict[str, int]:
    """Every object under `uri`: its path relative to `uri`, and its size."""
    fs, root = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root) + 1 :]: i.size for i in infos if i.type == pafs.FileType.File}


def read_bytes(uri: str, name: str) -> bytes:
    fs, root = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(f"{root}/{name}") as source:
        return source.read()


def registered(uri: str, step: int) -> bool:
    snapshot = storage.read_text(f"{uri}/checkpoints", "checkpoint_manager_snapshot.json")
    return snapshot is not None and f"checkpoint_{step:08d}" in snapshot


def stages() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("raylm-stage-*")}


def none_left_beside(before: set[str]) -> bool:
    """No staging folder but `before`'s stays: the other test worker's runs make short-lived ones too."""
    deadline = time.monotonic() + 30
    while (left := stages() - before) and time.monotonic() < deadline:
        time.sleep(1)
    return not left


def test_a_bucket_run_killed_resumes_from_the_bucket_and_keeps_nothing_local(
    object_store, reference_run, tmp_path, monkeypatch, capsys
):
    """A pipeline in the bucket: pretraining, then an evaluation of its model. SIGKILL the driver (and
    its embedded Ray) once the step-10 checkpoint is registered in the bucket; run the pipeline again:
    the pretraining stage resumes from the bucket and ends with the uninterrupted local run's weights,
    every run file in the bucket, none on this machine outside raylm's cache; the evaluation then reads
    the model from the bucket. The run tracks to MLflow (a SQLite store named in the spec: its default
    store would be a file in the run folder) and W&B (offline, in raylm's cache): the resumed run
    reopens both runs from tracking.json in the bucket. A third run skips both stages, and `raylm
    lineage` finds the model's chain in the bucket."""
    from click.testing import CliRunner

    from raylm import cli
    from raylm.train.tracking import wandb_dir
    from tests.train.test_pretrain import check_tracking

    root = object_store("runs") + "/pipeline"
    output = f"{root}/pretrain"
    mlflow_db = tmp_path / "mlflow.db"
    tracked = {"mlflow": {"experiment": "kill", "tracking_uri": str(mlflow_db)}, "wandb": {"mode": "offline"}}
    # Evaluations every 5 steps (evaluating moves no weight) and the controller's default 2 s poll: Ray
    # Train registers checkpoints at its polls, and the killed attempt must not reach its end first.
    stage = tiny_spec(output, train={"eval_every": 5}, logging=tracked)
    stage.pop("output")  # the stage's own folder in the pipeline's output: <root>/pretrain
    spec = {
        "kind": "pipeline",
        "output": root,
        "stages": {
            "pretrain": stage,
            "eval": {
                "kind": "evaluate",
                "models": [{"from": "pretrain"}],
                "perplexity": {
                    "data": {"generate": {"documents": 40, "seed": 9}, "seq_len": 32},
                    "blocks": 8,
                },
            },
        },
    }
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    default_poll = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}
    run_cli_then_kill(spec_file, tmp_path / "killed.log", lambda: registered(output, 10), env=default_poll)
    assert "model/model.safetensors" not in bucket_files(output)
    assert json.loads(read_bytes(root, "lineage.json"))["stages"]["pretrain"]["status"] == "running"

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # a relative path written by mistake would land here
    before = stages()
    capsys.readouterr()
    pipeline = run_here(validate_dict(spec))
    assert "stage pretrain (pretrain): run (not complete: resumes)" in capsys.readouterr().out
    summary = json.loads(read_bytes(output, "summary.json"))
    assert summary["steps"] == 30 and summary["resumed_from"] in (10, 20)
    # the resumed attempt read from its position on: rank 0's rows of the remaining steps, no more
    assert summary["throughput"]["rows_read"] == (30 - summary["resumed_from"]) * 8
    files = bucket_files(output)
    assert {
        "spec.yaml",
        "strategy.json",
        "summary.json",
        "metrics.jsonl",
        "tracking.json",
        "model/model.safetensors",
    } <= set(files)
    assert any(name.startswith("checkpoints/checkpoint_00000030/") for name in files)
    assert any(name.startswith("data-cache/") for name in files)
    rows = [yaml.safe_load(line) for line in read_bytes(output, "metrics.jsonl").decode().splitlines()]
    steps = [row["step"] for row in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # the killed attempt's log, continued once
    resumed = load(read_bytes(output, "model/model.safetensors"))
    reference = load_file(reference_run[0] / "model" / "model.safetensors")
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    record = read_bytes(output, "tracking.json").decode()
    check_tracking(rows, summary, f"sqlite:///{mlflow_db}", record)
    # W&B's files: in raylm's cache on this node, not beside the run
    assert wandb_dir(output).startswith(os.environ["RAYLM_CACHE"])
    # the evaluation read the model the stage wrote to the bucket
    evaluated = json.loads(read_bytes(f"{root}/eval", "summary.json"))
    assert evaluated["models"][0]["model"] == "pretrain" and evaluated["models"][0]["perplexity"] > 1
    assert {s["status"] for s in pipeline["stages"].values()} == {"complete"}
    assert list(work.iterdir()) == [] and none_left_beside(before)

    again = run_here(validate_dict(spec))  # nothing left to do
    assert not any(s["ran"] for s in again["stages"].values())
    chain = CliRunner().invoke(cli.main, ["lineage", f"{output}/model"])
    assert chain.exit_code == 0 and "pretrain (pretrain" in chain.output and "eval (" not in chain.output
    assert list(work.iterdir()) == [] and none_left_beside(before)


@pytest.mark.quick
def test_mlflow_default_store_cannot_live_in_a_bucket(monkeypatch):
    from raylm.runtime.preflight import check_training_inputs

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = validate_dict(tiny_spec("s3://runs/x", logging={"mlflow": {}}))
    problems = check_training_inputs(job)
    assert [where for where, _ in problems] == ["logging.mlflow.tracking_uri"]
    assert "set tracking_uri" in problems[0][1]
    local = validate_dict(tiny_spec("runs/x", logging={"mlflow": {}}))
    assert check_training_inputs(local) == []


def upload(folder: Path, uri: str) -> None:
    fs, root = pafs.FileSystem.from_uri(uri)
    fs.create_dir(root, recursive=True)
    pafs.copy_files(str(folder), root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def test_an_input_in_the_bucket_is_fetched_once_per_node_and_again_when_it_changes(
    object_store, tmp_path, monkeypatch
):
    monkeypatch.setenv("RAYLM_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "sub").mkdir()
    (folder / "sub" / "weights.bin").write_bytes(b"\0" * 70_000)
    uri = object_store("inputs") + "/model"
    upload(folder, uri)
    first = Path(storage.localize(uri))
    assert (first / "config.json").read_text() == '{"a": 1}' and (
        first / "sub" / "weights.bin"
    ).stat().st_size == 70_000
    (first / "marker").write_text("same copy")  # a second call must not fetch again
    assert storage.localize(uri) == str(first) and (first / "marker").exists()
    assert storage.localize(uri + "/config.json") != str(first / "config.json")  # one file, its own copy
    assert Path(storage.localize(uri + "/config.json")).read_text() == '{"a": 1}'
    fs, root = pafs.FileSystem.from_uri(uri)
    # the object changes (its size and time: the identity pyarrow's listing gives): fetched again
    with fs.open_output_stream(f"{root}/config.json") as out:
        out.write(b'{"a": 22}')
    second = Path(storage.localize(uri))
    assert second != first and (second / "config.json").read_text() == '{"a": 22}'
    assert [p.name for p in (tmp_path / "cache" / "objects").iterdir() if p.name.startswith(".")] == []
    missing = storage.localize_inputs(
        validate_dict(
            {**tiny_spec(tmp_path / "run"), "model": {"path": uri + "-gone"}, "tokenizer": {"path": uri}}
        )
    )
    assert missing and missing[0][0] == "model.path" and "gone" in missing[0][1]


def test_a_finetune_reads_its_base_from_the_bucket_and_writes_its_adapter_there(
    object_store, ray_local, sft_base, tmp_path
):
    """The base model comes from the bucket (fetched into the node's cache, by the driver and by each
    worker), and so do the training rows (JSONL read by Ray Data's tasks from the bucket); the run's
    outputs go to the bucket; the adapter records the base's URI, and PEFT loads the adapter fetched
    back from the bucket over the base fetched from the bucket."""
    from click.testing import CliRunner
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from raylm.cli import main
    from raylm.data.tasks import generate
    from raylm.infer.loading import load_for_generation
    from tests.train.test_finetune import finetune_spec

    bucket = object_store("finetune")
    upload(sft_base, f"{bucket}/base")
    rows = "".join(json.dumps(row) + "\n" for row in generate("arithmetic", 800, 0))
    storage.write_text(f"{bucket}/data", "sft.jsonl", rows)
    output = f"{bucket}/lora"
    spec = finetune_spec(
        f"{bucket}/base",
        output,
        {"name": "lora", "r": 4},
        train={"max_steps": 10, "eval_every": 5, "checkpoint_every": 10},
        # one worker: the driver fills the node's cache before any starts, and the ranks' bucket writes
        # are the killed run's and the node-loss test's
        resources={"num_workers": 1},
    )
    spec["data"] = {"path": f"{bucket}/data/sft.jsonl", "seq_len": 24}
    summary = run_here(validate_dict(spec))
    assert summary["steps"] == 10
    files = bucket_files(output)
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "summary.json"} <= set(files)
    recorded = yaml.safe_load(read_bytes(output, "spec.yaml"))
    assert recorded["model"]["path"] == f"{bucket}/base"
    assert recorded["data"]["path"] == f"{bucket}/data/sft.jsonl"
    [manifest] = [name for name in files if name.startswith("data-cache/") and name.endswith("manifest.json")]
    splits = json.loads(read_bytes(output, manifest))["splits"]
    assert splits["train"]["rows"] + splits["val"]["rows"] > 700  # the bucket's 800 rows, tokenized
    method = yaml.safe_load(read_bytes(output, "adapter/raylm_method.json"))
    assert method["base"] == f"{bucket}/base"
    base = AutoModelForCausalLM.from_pretrained(storage.localize(f"{bucket}/base"))
    adapted = PeftModel.from_pretrained(base, storage.localize(f"{output}/adapter")).eval()
    served, _, _ = load_for_generation(f"{output}/adapter")  # what `raylm generate` / a server load
    ids = torch.tensor([[1, 5, 9, 4, 7]])
    with torch.no_grad():
        expected = adapted(ids).logits
        torch.testing.assert_close(served(ids).logits, expected, atol=1e-5, rtol=0)
        with adapted.disable_adapter():
            assert not torch.allclose(adapted(ids).logits, expected, atol=1e-3)  # the adapter trained
    # `raylm merge` given the run's URI: its adapter over the base it recorded, both fetched
    merged = CliRunner().invoke(main, ["merge", output, "--out", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    with torch.no_grad():
        folded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits
    torch.testing.assert_close(folded, expected, atol=1e-4, rtol=0)


@pytest.mark.quick
def test_a_search_base_exemplars_and_documents_may_live_in_the_bucket(object_store, tmp_path):
    """The other inputs a spec names by path: a search's `base:` spec file, a prompt strategy's
    exemplars file and ReAct's documents folder (each fetched on the node that reads it)."""
    from raylm.infer.strategies import prepare
    from raylm.spec.generation import StrategySpec
    from raylm.spec.reading import SpecError, read_yaml

    bucket = object_store("inputs-misc")
    fs, root = pafs.FileSystem.from_uri(bucket)
    base = {
        "kind": "finetune",
        "model": {"path": "runs/sft/model"},
        "method": "lora",
        "data": {"path": "sft.jsonl"},
    }
    with fs.open_output_stream(f"{root}/specs/lora.yaml") as out:
        out.write(yaml.safe_dump(base).encode())
    search = validate_dict(
        {
            "kind": "tune",
            "base": f"{bucket}/specs/lora.yaml",
            "search": {"train.lr": {"grid": [1e-3]}},
            "output": str(tmp_path / "s"),
        }
    )
    assert search.base.method.name == "lora" and search.base.data.path == "sft.jsonl"
    with pytest.raises(SpecError, match="no such spec file"):
        read_yaml(f"{bucket}/specs/missing.yaml")

    exemplars = Path(__file__).parents[2] / "jobs" / "exemplars" / "arithmetic-cot.jsonl"
    with fs.open_output_stream(f"{root}/exemplars/cot.jsonl") as out:
        out.write(exemplars.read_bytes())
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "paris.md").write_text("Paris is the capital of France.")
    upload(docs, f"{bucket}/docs")
    loaded, _ = prepare(StrategySpec(name="cot", exemplars=f"{bucket}/exemplars/cot.jsonl"))
    assert loaded and loaded[0] == json.loads(exemplars.read_text().splitlines()[0])
    _, tools = prepare(StrategySpec(name="react", documents=f"{bucket}/docs"))
    assert "Paris is the capital" in tools["search"].run("capital of France")
