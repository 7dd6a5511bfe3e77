"""A fit's CPU with the job's processes collecting garbage rarely while they start, against Python's
default thresholds (raylm.runtime.startup_gc).

    python benchmarks/startup_gc.py                      # 2 rounds of 3 LoRA fits on each side
    python benchmarks/startup_gc.py --rounds 3 --fits 2

Both sides are the same `raylm` fine-tuning job, run in-process by a fresh Python that starts raylm's
embedded Ray: LoRA (r 4) on the quickstart's architecture (Llama, 2 layers, hidden 128, built and
briefly pretrained here), 30 steps of a generated arithmetic task, 2 Ray Train workers, evaluation and
checkpoints at steps 15 and 30, the tokenized data shared (a cache both sides read). **raylm**: the
job's setup hook as raylm sets it (`during_startup`: the youngest generation collected after 100,000
allocations while a process starts; the training loop restores Python's thresholds after its imports).
**default**: the same embedded Ray with `gc.enable` as the setup hook (a hook that changes nothing),
so Python's thresholds stay (700, 10, 10) everywhere. In each process one fit first, not measured
(Ray Data's and the tokenizer's first imports), then `--fits` fits, each measured as the machine's
busy CPU seconds over the fit (/proc/stat: every process, Ray's included) and its wall time. Rounds
alternate the sides. Also measured: the imports of a training worker alone (torch, ray.train.torch,
transformers' Llama, PEFT) in a fresh Python that has imported ray (as a Ray worker has before its
setup hook runs), with each side's thresholds (raylm: `during_startup`),
their CPU time and the part of it spent collecting garbage (`gc.callbacks`), by the process's own
clock (far steadier here than the machine's).
Written to benchmarks/results/startup_gc.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from scratch import scratch_dir

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "startup_gc.json"
IMPORTS = "import torch, ray.train.torch, transformers.models.llama.modeling_llama, peft"


def busy_cpu_s() -> float:
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def base_model(work: Path) -> Path:
    spec = ROOT / "jobs" / "quickstart.yaml"
    out = work / "base"
    sets = ["--set", "train.max_steps=20", "--set", f"output={out}"]
    subprocess.run([sys.executable, "-m", "raylm", "run", str(spec), *sets], check=True, capture_output=True)
    return out / "model"


def child(side: str, base: str, work: str, fits: int) -> None:
    """One process: the embedded Ray with `side`'s hook, a warm-up fit, then `fits` measured fits."""
    sys.path.insert(0, str(ROOT))
    from raylm.runtime import startup_gc

    if side == "default":
        startup_gc.HOOK = "gc.enable"  # a setup hook that leaves Python's thresholds as they are
    from raylm.runtime.cluster import start_local_ray
    from raylm.spec.loading import validate_dict
    from raylm.submit import run_here

    start_local_ray(num_cpus=4)
    rows = []
    for i in range(fits + 1):
        spec = {
            "kind": "finetune",
            "model": {"path": base},
            "method": {"name": "lora", "r": 4},
            "data": {
                "generate": {"task": "arithmetic", "examples": 800},
                "seq_len": 24,
                "cache": f"{work}/cache",
            },
            "train": {
                "max_steps": 30,
                "batch_size": 8,
                "eval_every": 15,
                "checkpoint_every": 15,
                "log_every": 5,
            },
            "eval": {"exact_match_examples": 16, "max_new_tokens": 6},
            "resources": {"num_workers": 2},
            "output": {"path": f"{work}/{side}-{os.getpid()}-{i}"},
        }
        cpu, started = busy_cpu_s(), time.perf_counter()
        run_here(validate_dict(spec))
        if i:
            rows.append({"cpu_s": busy_cpu_s() - cpu, "wall_s": time.perf_counter() - started})
    print("ROWS " + json.dumps(rows), flush=True)


IMPORT_CODE = """
import gc, json, sys, time
import ray  # a Ray worker has imported ray before its setup hook runs
if sys.argv[1] == "raylm":
    from raylm.runtime.startup_gc import during_startup
    during_startup()
collecting, started = [0.0], [0.0]
def timed(phase, info):
    if phase == "start":
        started[0] = time.process_time()
    else:
        collecting[0] += time.process_time() - started[0]
gc.callbacks.append(timed)
begin = time.process_time()
IMPORTS
print(json.dumps({"cpu_s": time.process_time() - begin, "gc_s": collecting[0]}))
""".replace("IMPORTS", IMPORTS)


def import_cpu_s(side: str) -> dict:
    """A training worker's imports in a fresh Python: their CPU time and the part of it spent collecting
    garbage (gc.callbacks), both from the process's own clock."""
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_CODE, side], check=True, capture_output=True, text=True, cwd=ROOT
    )
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fits", type=int, default=3)
    parser.add_argument("--imports", type=int, default=6, help="import measurements per side")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, base, work, fits = args.child
        return child(side, base, work, int(fits))

    work = scratch_dir("raylm-bench-gc-")
    base = base_model(work)
    fits: dict[str, list[dict]] = {"raylm": [], "default": []}
    for r in range(args.rounds):
        for side in ("raylm", "default") if r % 2 == 0 else ("default", "raylm"):
            done = subprocess.run(
                [sys.executable, __file__, "--child", side, str(base), str(work), str(args.fits)],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            line = [ln for ln in done.stdout.splitlines() if ln.startswith("ROWS ")]
            if done.returncode or not line:
                sys.exit(f"{side} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            measured = json.loads(line[0][5:])
            fits[side] += [{**row, "round": r} for row in measured]
            OUT.write_text(json.dumps({"fits": fits}, indent=1) + "\n")  # so far
            cpu = statistics.mean(row["cpu_s"] for row in measured)
            print(
                f"round {r} {side:8s} fits: {cpu:5.1f} CPU-s, {statistics.mean(row['wall_s'] for row in measured):5.1f} s"
            )
    imports: dict[str, list[dict]] = {"raylm": [], "default": []}
    for _ in range(args.imports):
        for side in imports:
            imports[side].append(import_cpu_s(side))
    summary = {}
    for side in fits:
        summary[side] = {
            "fit_cpu_s": statistics.mean(row["cpu_s"] for row in fits[side]),
            "fit_wall_s": statistics.mean(row["wall_s"] for row in fits[side]),
            "import_cpu_s": statistics.median(row["cpu_s"] for row in imports[side]),
            "import_gc_s": statistics.median(row["gc_s"] for row in imports[side]),
        }
    ratios = {
        key: summary["raylm"][key] / summary["default"][key]
        for key in ("fit_cpu_s", "fit_wall_s", "import_cpu_s", "import_gc_s")
    }
    for key, ratio in ratios.items():
        print(
            f"{key}: raylm {summary['raylm'][key]:.2f}, default {summary['default'][key]:.2f}, ratio {ratio:.2f}"
        )
    result = {
        "command": "python benchmarks/startup_gc.py " + " ".join(sys.argv[1:]),
        "fits": fits,
        "imports": imports,
        "summary": summary,
        "ratios": ratios,
    }
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {OUT}")


if __name__ == "__main__":
    main()
