"""How long a resume takes at 10% and at 90% of a run: it should not grow with the position.

    python benchmarks/resume_time.py                 # 1000-step run, resumed at steps 100 and 900
    python benchmarks/resume_time.py --steps 500

The quickstart's model (Llama, 2 layers, hidden 128) on Tiny Shakespeare (../shared/data, char
tokenizer, block 128, batch 16, 1 worker), checkpointing every 10% of the run. Then two copies of the
run folder, one holding only the checkpoint at 10% and one only the checkpoint at 90%, are each
resumed for one more step (max_steps = that step + 1) in a fresh `raylm run` process, with the same
tokenized cache. Timed: the whole `raylm run` process (Ray start, cache lookup, workers, restore, one
step, checkpoint, export), and `rows_read`, the training rows the reader handed over (one step's).
Written to benchmarks/results/resume_time.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from scratch import scratch_dir

ROOT = Path(__file__).resolve().parents[1]


def spec(corpus: str, steps: int, output: str) -> dict:
    return {
        "kind": "pretrain",
        "model": {
            "architecture": {"family": "llama", "layers": 2, "heads": 4, "hidden": 128, "context": 128}
        },
        "tokenizer": {"train": {"type": "char"}},
        "data": {"path": corpus, "seq_len": 128, "val_fraction": 0.02},
        "train": {
            "max_steps": steps,
            "batch_size": 16,
            "lr": 3e-3,
            "eval_every": steps // 10,
            "eval_batches": 2,
            "checkpoint_every": steps // 10,
            "keep_checkpoints": 10,
            "log_every": steps // 10,
        },
        "resources": {"num_workers": 1, "cpus_per_worker": 2},
        "output": output,
    }


def raylm_run(spec_file: Path, max_steps: int) -> tuple[float, dict]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "raylm", "run", str(spec_file), "--set", f"train.max_steps={max_steps}"],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])
    run = yaml.safe_load(spec_file.read_text())["output"]
    return seconds, json.loads((Path(run) / "summary.json").read_text())


def keep_only(snapshot: Path, name: str) -> None:
    """Ray Train's record of the run's checkpoints, cut to the one kept (it resumes from the latest)."""
    state = json.loads(snapshot.read_text())
    kept = [i for i, r in enumerate(state["checkpoint_results"]) if r["checkpoint_dir_name"] == name]
    (index,) = kept
    state["checkpoint_results"] = [state["checkpoint_results"][index]]
    state["checkpoint_report_indices"] = [state["checkpoint_report_indices"][index]]
    state["latest_checkpoint_result"] = state["checkpoint_results"][0]
    snapshot.write_text(json.dumps(state))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "resume_time.json"))
    args = parser.parse_args()
    scratch = scratch_dir("raylm-resume-")
    full = scratch / "full"
    spec_file = scratch / "full.yaml"
    spec_file.write_text(yaml.safe_dump(spec(args.corpus, args.steps, str(full))))
    first_seconds, _ = raylm_run(spec_file, args.steps)

    result = {"steps": args.steps, "first_run_seconds": first_seconds, "resumes": []}
    for fraction in (0.1, 0.9):
        at = int(args.steps * fraction)
        copy = scratch / f"at{at}"
        shutil.copytree(full, copy, ignore=shutil.ignore_patterns("model"))
        for checkpoint in (copy / "checkpoints").glob("checkpoint_*"):
            if checkpoint.is_dir() and checkpoint.name != f"checkpoint_{at:08d}":
                shutil.rmtree(checkpoint)
        keep_only(copy / "checkpoints" / "checkpoint_manager_snapshot.json", f"checkpoint_{at:08d}")
        (copy / "spec.yaml").unlink()  # it names the original folder as the output
        resumed_file = scratch / f"at{at}.yaml"
        resumed_file.write_text(yaml.safe_dump(spec(args.corpus, args.steps, str(copy))))
        seconds, summary = raylm_run(resumed_file, at + 1)
        assert summary["resumed_from"] == at, summary["resumed_from"]
        result["resumes"].append(
            {"at_step": at, "seconds": seconds, "rows_read": summary["throughput"]["rows_read"]}
        )
        print(json.dumps(result["resumes"][-1]), flush=True)
    early, late = result["resumes"]
    result["late_over_early"] = late["seconds"] / early["seconds"]
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
