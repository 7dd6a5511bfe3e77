"""Searches on real local Ray: every trial is a real fine-tuning run (TorchTrainer inside a Tune
function trainable). Two searches: results, early stopping and a failed trial's retry in one;
resumption after the driver is killed (with trials rejected by the estimate) in the other."""

import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from raylm.spec.loading import validate_dict
from raylm.submit import run_here
from tests.conftest import ray_actor_pids, run_cli_then_kill, train_worker_pids


def search_spec(base_folder, output, search, **fields) -> dict:
    return {
        "kind": "tune",
        "base": {
            "model": {"path": str(base_folder)},
            "method": {"name": "lora", "r": 4},
            "data": {"generate": {"task": "arithmetic", "examples": 600}, "seq_len": 24},
            "train": {
                "max_steps": 20,
                "batch_size": 8,
                "lr": 1e-2,
                "eval_every": 5,
                "log_every": 5,
                "checkpoint_every": 10,
            },
            "eval": {"exact_match_examples": 8, "max_new_tokens": 6},
            "resources": {"num_workers": 1},
        },
        "search": search,
        "scheduler": {"name": "none"},
        "output": str(output),
        **fields,
    }


def table(output: Path) -> list[dict]:
    return pq.read_table(output / "trials.parquet").to_pylist()


def trial_folder(output: Path, trial_id: str) -> Path:
    return output / "trials" / trial_id


def released(ray) -> bool:
    """Every CPU is free again and no placement group is left reserved (ray-project/ray#54305)."""
    from ray.util import placement_group_table

    for _ in range(60):
        groups = [g for g in placement_group_table().values() if g["state"] != "REMOVED"]
        if not groups and ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"]:
            return True
        time.sleep(1)
    return False


def test_search_stops_a_bad_trial_retries_a_failed_one_and_writes_its_results(ray_local, sft_base, tmp_path):
    """Two LoRA trials, one at a time (a grid of learning rates), ASHA on the validation loss. A
    learning rate of 1e-7 learns nothing: ASHA stops it at its first rung, against the first trial's
    loss there, and its workers and placement group are released (ray-project/ray#54305). (A grid over
    methods, each with its own searched field: the search submitted to the 2-node cluster,
    tests/test_submit.py.) The first
    trial's training worker is SIGKILLed after its step-10 checkpoint: with failure.max_failures 1 the
    trial runs again, resumes its run from that checkpoint and completes. The table, best.yaml (the
    best trial's own spec), best/ (a PEFT adapter) and curves.png are written."""

    output = tmp_path / "search"
    search = {"train.lr": {"grid": [3.0e-2, 1.0e-7]}}
    spec = search_spec(
        sft_base,
        output,
        search,
        max_concurrent_trials=1,
        scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2},
        failure={"max_failures": 1},
    )
    killed: list[int] = []

    def kill_the_first_trials_worker_after_its_first_checkpoint():
        while True:  # one trial at a time: the first snapshot is the first trial's
            snapshots = list(output.glob("trials/*/checkpoints/checkpoint_manager_snapshot.json"))
            if snapshots and "checkpoint_00000010" in snapshots[0].read_text():
                break
            time.sleep(0.05)
        workers: list[int] = []
        deadline = time.monotonic() + 120
        while not workers and time.monotonic() < deadline:  # the state API may not answer at once
            workers = train_worker_pids()
            time.sleep(0.2)
        os.kill(workers[0], signal.SIGKILL)
        killed.append(snapshots[0].parent.parent.name)

    killer = threading.Thread(target=kill_the_first_trials_worker_after_its_first_checkpoint, daemon=True)
    killer.start()
    summary = run_here(validate_dict(spec))
    killer.join(timeout=5)
    assert killed, "no worker was killed"
    rows = table(output)
    assert len(rows) == 2 and summary["trials"] == {"completed": 1, "stopped": 1}
    bad = [r for r in rows if r["train.lr"] == 1.0e-7]
    stopped = [r for r in bad if r["status"] == "stopped"]
    assert stopped and all(r["steps"] < 20 for r in stopped)
    assert released(ray_local)  # the stopped trial's workers and placement group are given back
    assert rows[0]["status"] == "completed"  # the first trial had nothing to trail
    retried = next(r for r in rows if r["trial_id"] == killed[0])
    assert retried["status"] == "completed" and retried["attempts"] == 2
    run = json.loads((trial_folder(output, killed[0]) / "summary.json").read_text())
    assert run["resumed_from"] == 10 and run["steps"] == 20
    assert all(r["attempts"] == 1 for r in rows if r is not retried)

    best = summary["best"]
    good = [r for r in rows if r["status"] == "completed"]
    assert best["val_loss"] == min(r["last_val_loss"] for r in good)
    adapter_config = json.loads((output / "best" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert (output / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (output / "trials.csv").read_text().count("\n") == 3
    # best.yaml is a valid finetune spec: the best trial's own recorded spec, but for where it writes (a
    # run is a function of its spec: the resume tests show a spec trains to the same weights every time)
    best_spec = yaml.safe_load((output / "best.yaml").read_text())
    best_row = next(r for r in good if r["last_val_loss"] == best["val_loss"])
    assert best_spec["kind"] == "finetune" and best_spec["train"]["lr"] == best_row["train.lr"] != 1.0e-7
    recorded = yaml.safe_load((trial_folder(output, best_row["trial_id"]) / "spec.yaml").read_text())
    assert training_fields(best_spec) == training_fields(recorded)


def training_fields(spec: dict) -> dict:
    """What decides a fine-tuning run's training: its validated spec but for its name and where it
    writes and caches."""
    dumped = validate_dict(spec).model_dump(mode="json")
    dumped["data"].pop("cache")
    return {k: v for k, v in dumped.items() if k not in ("name", "output")}


def test_killed_search_in_a_bucket_resumes_without_rerunning_finished_trials(
    object_store, ray_local, sft_base, tmp_path, monkeypatch
):
    """A search whose output is a bucket (Tune's state, the trials' runs, the table, best/ and the
    summary all in it): SIGKILL the driver (and its embedded Ray) while the second trial trains; run
    it again, now as the first stage of a pipeline (`--only` it) whose second stage trains the best
    trial's settings longer (`pick: spec`). The finished trial keeps its id and its run (not trained
    again); the interrupted one continues from its checkpoint in the bucket; the two whose batch does not
    fit the memory estimate are rejected before they start, without counting as failures; the pipeline
    would now skip the search and run the second stage, whose job, built as the driver builds it when
    the stage starts (from the real best.yaml in the bucket), is best.yaml's spec with its own changes
    and output and passes its checks (a fine-tuning stage running: tests/pipeline/test_pipeline.py);
    nothing is left in the working folder."""
    from raylm.kinds import preflight
    from raylm.pipeline.driver import decide, runnable
    from raylm.report import lineage
    from raylm.runtime.storage import as_written
    from raylm.train.tracking import recordable
    from tests.runtime.test_object_store import bucket_files, read_bytes

    output = object_store("searches") + "/lora"
    search = {
        "train.batch_size": {"grid": [8, 4096]},
        "method": {"grid": [{"name": "lora", "r": 4}, {"name": "lora", "r": 8}]},
    }
    spec = search_spec(sft_base, output, search, max_concurrent_trials=1)
    spec["base"]["strategy"] = {"name": "auto", "memory_per_worker_gb": 0.1}
    spec_file = tmp_path / "tune.yaml"
    spec_file.write_text(yaml.safe_dump(spec))

    def second_trial_started():
        files = bucket_files(output)
        finished = [
            name.split("/")[1] for name in files if name.endswith("/summary.json") and "trials/" in name
        ]
        started = [name for name in files if name.startswith("trials/") and name.endswith("/trial.json")]
        return finished and len(started) >= 2 and finished[0]

    # 3 s after the second trial started it is training
    finished = run_cli_then_kill(spec_file, tmp_path / "killed.log", second_trial_started, linger_s=3)
    names = ("summary.json", "metrics.jsonl", "trial.json")
    before = {name: read_bytes(f"{output}/trials/{finished}", name) for name in names}
    assert "summary.json" not in bucket_files(output)  # the search itself is unfinished

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    root = output.rsplit("/", 1)[0] + "/pipeline"
    longer = {"max_steps": 4, "eval_every": 4, "checkpoint_every": 4}
    stages = {"search": spec, "final": {"from": "search", "pick": "spec", "train": longer}}
    pipeline = run_here(
        validate_dict({"kind": "pipeline", "output": root, "stages": stages, "only": "search"})
    )
    assert [s["ran"] for s in pipeline["stages"].values()] == [True, False]
    summary = json.loads(read_bytes(output, "summary.json"))
    rows = {
        r["trial_id"]: r for r in pq.read_table(io.BytesIO(read_bytes(output, "trials.parquet"))).to_pylist()
    }
    assert summary["trials"] == {"completed": 2, "rejected": 2}
    assert finished in rows and rows[finished]["status"] == "completed"
    for name, content in before.items():  # not run again: its files are as they were
        assert read_bytes(f"{output}/trials/{finished}", name) == content, name
    files = bucket_files(output)
    rejected = [r for r in rows.values() if r["status"] == "rejected"]
    assert {r["method.r"] for r in rejected} == {4, 8} and all("needs" in r["reason"] for r in rejected)
    assert not any(
        name.startswith(f"trials/{r['trial_id']}/checkpoints/") for r in rejected for name in files
    )
    resumed = next(r for r in rows.values() if r["status"] == "completed" and r["trial_id"] != finished)
    assert resumed["attempts"] == 2
    run = json.loads(read_bytes(f"{output}/trials/{resumed['trial_id']}", "summary.json"))
    assert run["resumed_from"] in (0, 10) and run["steps"] == 20
    assert {"summary.json", "trials.csv", "curves.png", "best.yaml", "best/adapter_config.json"} <= set(files)
    assert summary["best"]["artifact"] == f"{output}/best"
    # the second stage: run next (the search is complete), as the best trial's spec (best.yaml) trained
    # to its own length into its own folder; its job built as the driver builds it when the stage starts
    job = validate_dict({"kind": "pipeline", "output": root, "stages": stages})
    plan = decide(job, lineage.read(root))
    assert plan == {"search": "skip (unchanged and complete)", "final": "run (new)"}
    final_job = runnable(job, "final")
    assert preflight(final_job) == []
    best = yaml.safe_load(read_bytes(output, "best.yaml"))
    final = recordable(as_written(final_job))  # what the run records as its spec.yaml
    assert final["kind"] == "finetune"
    assert {k: final["method"][k] for k in best["method"]} == best["method"]  # (+ the defaults)
    assert final["method"]["r"] == summary["best"]["values"]["method.r"]
    assert {k: final["train"][k] for k in {**best["train"], **longer}} == {**best["train"], **longer}
    assert final["output"]["path"] == f"{root}/final"
    assert list(work.iterdir()) == []


def test_a_search_without_a_completed_trial_exits_1(ray_local, sft_base, tmp_path):
    """Every trial rejected by the memory estimate: the table says why, and `raylm run` exits 1 (a script
    must not go on with no result). With no scheduler to stop trials, the second trial runs in the first
    one's process (Tune's reuse_actors), not in a new one that imports torch and PEFT again."""
    import threading

    from click.testing import CliRunner

    from raylm.cli import main

    search = {"train.batch_size": {"grid": [4096, 8192]}, "method": {"grid": [{"name": "lora", "r": 4}]}}
    spec = search_spec(sft_base, tmp_path / "search", search, max_concurrent_trials=1)
    spec["base"]["strategy"] = {"name": "auto", "memory_per_worker_gb": 0.1}
    spec_file = tmp_path / "tune.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    # the processes of Tune's function trainables, watched while the search runs (each lives seconds:
    # Ray, torch and raylm's imports, then the estimate)
    trial_processes: set[int] = set()
    searching = threading.Event()

    def watch() -> None:
        while not searching.wait(0.25):
            trial_processes.update(ray_actor_pids("ImplicitFunc"))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = CliRunner().invoke(main, ["run", str(spec_file)])
    finally:
        searching.set()
        watcher.join()
    assert result.exit_code == 1, result.output
    assert "2 rejected" in result.output and "no trial completed" in result.output
    assert len(trial_processes) == 1, trial_processes
