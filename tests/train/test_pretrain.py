"""2-worker DDP pretraining on real local Ray: loss falls, the folder reloads and generates, and a
run whose worker is killed mid-way resumes to exactly the weights of an uninterrupted run."""

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raylm.spec.loading import validate_dict
from raylm.submit import run_here
from raylm.train.metrics import read_metrics
from tests.conftest import tiny_spec, train_worker_pids


def registered(run_dir: Path, step: int) -> bool:
    """Ray Train has registered the checkpoint of `step` (written its manager snapshot)."""
    snapshot = run_dir / "checkpoints" / "checkpoint_manager_snapshot.json"
    return snapshot.exists() and f"checkpoint_{step:08d}" in snapshot.read_text()


def test_validation_loss_falls(reference_run):
    run_dir, summary = reference_run
    evals = [row["val_loss"] for row in read_metrics(run_dir) if "val_loss" in row]
    assert len(evals) == 3  # steps 10, 20, 30
    assert evals[-1] < evals[0] - 0.3
    assert summary["metrics"]["val_loss"] == pytest.approx(evals[-1])
    assert summary["steps"] == 30 and (run_dir / "summary.json").exists()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_final_folder_reloads_with_transformers_and_generates(reference_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = reference_run
    folder = run_dir / "model"
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    prompt = tokenizer("Once upon a", return_tensors="pt").input_ids
    out = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == prompt.shape[1] + 10
    text = tokenizer.decode(out[0, prompt.shape[1] :])
    assert len(text) == 10  # a char tokenizer: one character per token


def test_checkpoints_are_complete_and_pruned(reference_run):
    run_dir, _ = reference_run
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint_0*"))
    assert kept == ["checkpoint_00000020", "checkpoint_00000030"]  # keep_checkpoints: 2
    files = {p.name for p in (run_dir / "checkpoints" / kept[-1]).iterdir()}
    assert {
        "model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "loop_state.json",
        "MANIFEST.rank0.json",
        "MANIFEST.rank1.json",
        "rng_rank0.pt",
        "rng_rank1.pt",
    } <= files


def test_rerun_with_a_different_spec_is_refused(reference_run):
    from raylm.spec.reading import SpecError

    run_dir, _ = reference_run
    changed = tiny_spec(run_dir, train={"lr": 1e-2})
    with pytest.raises(SpecError) as info:
        run_here(validate_dict(changed))
    assert "train.lr" in str(info.value)


def test_a_worker_told_to_stop_checkpoints_and_a_killed_one_restarts_from_its_checkpoint(
    reference_run, tmp_path
):
    """Two interruptions of one run (failure.max_failures 2), and it still ends with the uninterrupted
    run's weights:
    - SIGTERM to a training worker (a spot reclaim's or a pod eviction's notice) mid-way between
      checkpoints: every rank finishes its step, a checkpoint is saved at that step and Ray Train restarts
      the workers from it, so no finished step is lost;
    - SIGKILL to a worker of the restarted group after its step-15 checkpoint: restarted from the last
      registered checkpoint.
    The run tracks to MLflow (its default local store, <output>/mlflow.db) and W&B (offline,
    <output>/wandb): the restarted workers log to the same tracking runs. (A driver killed and run
    again reopens them from tracking.json: tests/runtime/test_object_store.py.)"""
    import json
    import threading

    import ray.train

    reference_dir, _ = reference_run
    output = tmp_path / "run"
    seen: dict = {"checkpoints": set()}

    def checkpoints() -> set[int]:
        snapshot = output / "checkpoints" / "checkpoint_manager_snapshot.json"
        text = snapshot.read_text() if snapshot.exists() else ""
        return {int(m) for m in re.findall(r"checkpoint_(\d{8})", text)}

    def last_logged() -> int:
        rows = (
            (output / "metrics.jsonl").read_text().splitlines() if (output / "metrics.jsonl").exists() else []
        )
        return json.loads(rows[-1])["step"] if rows else 0

    def interrupt():
        first: list[int] = []
        while len(first) < 2:  # find the workers first, so the signals follow the steps closely
            first = train_worker_pids()
            time.sleep(0.5)
        while last_logged() < 6:
            time.sleep(0.02)
        seen["sigterm_after"] = last_logged()
        os.kill(first[-1], signal.SIGTERM)  # either rank will do
        second: list[int] = []
        while len(second) < 2 or set(second) & set(first):  # the restarted group
            seen["checkpoints"] |= checkpoints()  # what the first attempt left
            second = train_worker_pids()
            time.sleep(0.1)
        # the controller may register the first attempt's last checkpoint after the new group is up
        while 15 not in (registered := checkpoints()):
            seen["checkpoints"] |= registered
            time.sleep(0.05)
        seen["checkpoints"] |= registered
        os.kill(second[-1], signal.SIGKILL)
        seen["killed"] = True

    interrupter = threading.Thread(target=interrupt, daemon=True)
    interrupter.start()
    # log every step (to know where the SIGTERM landed); checkpoints every 5 steps keep the run going for
    # several controller polls after the step-15 one; evaluations stay at every 10 steps, so step 25 is a
    # checkpoint without an evaluation
    tracked = {"mlflow": {"experiment": "kill"}, "wandb": {"mode": "offline"}}
    spec = tiny_spec(
        output,
        failure={"max_failures": 2},
        train={"checkpoint_every": 5, "log_every": 1, "keep_checkpoints": 3},
        logging=tracked,
    )
    summary = run_here(validate_dict(spec))
    interrupter.join(timeout=5)
    assert seen.get("killed"), seen
    # the SIGTERM landed during a step after `sigterm_after`: the first attempt saved a checkpoint at the
    # end of that step or the next (every rank learns of it at the start of a step) before it stopped
    told = seen["sigterm_after"]
    forced = [s for s in seen["checkpoints"] if told < s <= told + 3]
    assert forced, seen
    assert summary["steps"] == 30 and summary["resumed_from"] in (15, 20, 25)  # the last attempt's start
    resumed = load_file(output / "model" / "model.safetensors")
    reference = load_file(reference_dir / "model" / "model.safetensors")
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    # what Ray Train (and Tune's schedulers) got with each kept checkpoint: an evaluation's values only
    # at the step it was measured, never carried to a later checkpoint's step
    reported = {m["step"]: m for _, m in ray.train.Result.from_path(output / "checkpoints").best_checkpoints}
    assert sorted(reported)[-2:] == [25, 30]
    assert "val_loss" not in reported[25] and "loss" in reported[25]
    assert reported[30]["val_loss"] == summary["metrics"]["val_loss"]
    check_tracking(
        read_metrics(output),
        summary,
        f"sqlite:///{output.resolve() / 'mlflow.db'}",
        (output / "tracking.json").read_text(),
    )


def check_tracking(logged_rows: list[dict], summary: dict, mlflow_uri: str, record: str) -> None:
    """Read the tracking runs back with the libraries' own readers: one MLflow run holding the spec as
    parameters, every logged step's metrics, summary.json and the artifact path; one W&B run id
    whose offline files hold the metric rows, the spec as config and the final summary."""
    import json
    import tempfile

    from mlflow import MlflowClient

    from tests.train.wandb_files import run_contents

    logged = {row["step"]: row for row in logged_rows}
    client = MlflowClient(tracking_uri=mlflow_uri)  # MLflow's own reader
    experiment = client.get_experiment_by_name("kill")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "the resumed run opened a second MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.003" and run.data.params["kind"] == "pretrain"
    assert run.data.tags["raylm.artifact"] == summary["model"]
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert set(history) == {s for s, row in logged.items() if "loss" in row}
    assert history[30] == pytest.approx(logged[30]["loss"])
    with tempfile.TemporaryDirectory() as scratch:
        local = client.download_artifacts(run.info.run_id, "summary.json", scratch)
        assert json.loads(Path(local).read_text())["steps"] == 30

    from raylm.train.tracking import wandb_dir

    ids = json.loads(record)
    files = Path(wandb_dir(ids["wandb"]["output"])) / "wandb"
    wandb = run_contents(files, ids["wandb"]["id"])
    steps = {row["_step"]: row for row in wandb["history"]}
    # the resumed attempt's rows (a SIGKILLed attempt loses what its W&B process had not yet written)
    after = {s for s, row in logged.items() if "loss" in row and s > summary["resumed_from"]}
    assert after <= set(steps) and steps[30]["loss"] == pytest.approx(logged[30]["loss"])
    assert wandb["config"]["train.lr"] == "0.003"
    assert wandb["summary"]["artifact"] == summary["model"] and wandb["summary"]["steps"] == 30
    attempts = list(files.glob(f"offline-run-*-{ids['wandb']['id']}"))
    assert len(attempts) >= 2  # the killed attempt and the resumed one share the run id
