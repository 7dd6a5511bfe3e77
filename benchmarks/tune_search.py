"""What a search buys and costs, through raylm's own job path (`raylm run` on tune specs), side by side:

1. for lora, ia3, prompt and prefix on the generated recall task: the best exact match a search of a
   fixed budget finds (Optuna over the learning rate and the method's own fields, ASHA on exact match)
   against the single run at the method table's fixed learning rate and settings
   (benchmarks/finetune_methods.py), both trained for the same steps in this run;
2. the compute ASHA saved: trial-steps run / trial-steps if every trial had run to the end;
3. Tune's overhead: N identical trials at concurrency C (one search) against N/C times the same
   fine-tuning job run alone, both timed as the whole `raylm run` command (target <= 1.2x).

    python benchmarks/tune_search.py                      # writes benchmarks/results/tune_search.json
    python benchmarks/tune_search.py --steps 120 --trials 3 --methods lora ia3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from finetune_methods import LR, METHODS, pretrain_base, spec  # noqa: E402
from scratch import scratch_dir

# Each method's own fields, searched beside the learning rate (a decade either side of the table's).
FIELDS = {
    "lora": {"r": {"choice": [4, 8, 16]}, "alpha": {"choice": [16, 32]}},
    "ia3": {},
    "prompt": {"num_virtual_tokens": {"choice": [8, 16, 32]}},
    "prefix": {"num_virtual_tokens": {"choice": [8, 16, 32]}},
}


def run(job: dict, folder: Path) -> tuple[dict, float]:
    """`raylm run` on the spec in its own process: (summary.json, wall seconds of the command)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(job))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "raylm", "run", str(path)], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{path} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    from raylm.runtime.storage import read_text

    output = job["output"] if isinstance(job["output"], str) else job["output"]["path"]
    return json.loads(read_text(output, "summary.json")), seconds  # a folder or a storage URI


def method_search(base: Path, scratch: Path, name: str, steps: int, trials: int) -> dict:
    import pyarrow.parquet as pq

    fixed_job = spec(base, scratch / name / "fixed", METHODS[name], LR[name], "recall", steps)
    fixed, _ = run(fixed_job, scratch / name)
    base_job = spec(base, scratch / name / "unused", METHODS[name], LR[name], "recall", steps)
    base_job["train"]["eval_every"] = max(1, steps // 4)
    option = {**METHODS[name], **FIELDS[name]}
    tune = {
        "kind": "tune",
        "base": base_job,
        "search": {
            "train.lr": {"loguniform": [LR[name] / 10, LR[name] * 10]},
            "method": {"choice": [option]},
        },
        "metric": "exact_match",
        "num_samples": trials,
        "algorithm": "optuna",
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "output": str(scratch / name / "search"),
    }
    summary, seconds = run(tune, scratch / name / "tune")
    table = pq.read_table(scratch / name / "search" / "trials.parquet").to_pylist()
    best_any = max((r["best_exact_match"] for r in table if r["best_exact_match"] is not None), default=None)
    return {
        "method": name,
        "fixed_lr": LR[name],
        "fixed_exact_match": fixed["exact_match"]["exact_match"],
        "search_best_exact_match": (summary["best"] or {}).get("exact_match"),
        "search_best_any_evaluation": best_any,
        "best_values": (summary["best"] or {}).get("values"),
        "trials": summary["trials"],
        "trial_steps_run": summary["trial_steps"]["run"],
        "trial_steps_to_the_end": summary["trial_steps"]["all_to_the_end"],
        "search_seconds": seconds,
    }


def overhead(base: Path, scratch: Path, steps: int, n: int, concurrent: int) -> dict:
    job = spec(base, scratch / "alone" / "run", METHODS["lora"], LR["lora"], "recall", steps)
    job["resources"] = {"num_workers": 1, "cpus_per_worker": 1}
    job["eval"] = {"exact_match_examples": 0}
    job["train"]["eval_every"] = steps
    # the data cache is written before either side is timed, so both read the same tokenized rows
    job["data"]["cache"] = str(scratch / "data-cache")
    run({**job, "output": str(scratch / "warm" / "run")}, scratch / "warm")
    _, alone = run(job, scratch / "alone")
    tune = {
        "kind": "tune",
        "base": job,
        "search": {"train.lr": {"grid": [LR["lora"]] * n}},
        "max_concurrent_trials": concurrent,
        "scheduler": {"name": "none"},
        "output": str(scratch / "identical"),
    }
    summary, together = run(tune, scratch / "identical-run")
    return {
        "trials": n,
        "concurrent": concurrent,
        "one_trial_alone_s": alone,
        "search_s": together,
        "ratio": together / (n / concurrent * alone),
        "completed": summary["trials"].get("completed", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--base-steps", type=int, default=600)
    parser.add_argument("--trials", type=int, default=4, help="budget of each method's search")
    parser.add_argument("--methods", nargs="+", default=list(FIELDS), choices=list(FIELDS))
    parser.add_argument("--overhead-trials", type=int, default=4)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tune_search.json"))
    args = parser.parse_args()

    scratch = scratch_dir("raylm-bench-tune-")
    base = scratch / "base"
    pretrain_base(base, args.base_steps)
    searches = []
    for name in args.methods:
        searches.append(method_search(base, scratch, name, args.steps, args.trials))
        print(json.dumps(searches[-1], default=str), flush=True)
    cost = overhead(base, scratch, args.steps, args.overhead_trials, args.concurrent)
    print(json.dumps(cost), flush=True)
    run_steps = sum(s["trial_steps_run"] for s in searches)
    full_steps = sum(s["trial_steps_to_the_end"] or 0 for s in searches)
    result = {
        "command": f"python benchmarks/tune_search.py --steps {args.steps} --base-steps {args.base_steps} "
        f"--trials {args.trials} --methods {' '.join(args.methods)} --overhead-trials {args.overhead_trials} "
        f"--concurrent {args.concurrent}",
        "searches": searches,
        "asha": {
            "trial_steps_run": run_steps,
            "trial_steps_to_the_end": full_steps,
            "share": run_steps / full_steps,
        },
        "overhead": cost,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
