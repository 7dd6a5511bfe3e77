"""What each compression method costs and saves, through raylm's own job path (`raylm run` on
quantize and prune specs), on a model raylm pretrains on ../shared/data/tinyshakespeare.txt:

one row per method: weight bytes against the float32 folder, held-out perplexity before and after (the
pretraining run's own validation blocks), the share of the original's greedy tokens kept, and CPU tokens
per second of greedy generation against the original, the two timed the same way in the same task.
The pruning rows (magnitude vs Wanda vs 2:4 vs structured) are at 50% of the pruned layers' weights
(structured: half the head groups and half the MLP channels); the training rows at 75%: one-shot
magnitude, the same with a 100-step recovery training, and two lottery-ticket rounds (rewound to the
base run's initialization, each retrained with the base run's own schedule).

    python benchmarks/compress_methods.py                 # writes benchmarks/results/compress_methods.json
    python benchmarks/compress_methods.py --steps 200 --methods nf4 q8_0 wanda
    python benchmarks/compress_methods.py --base /tmp/raylm-compress-bench-x/base/model --methods structured \
        --out benchmarks/results/compress_structured.json   # more rows on an earlier run's base model
    python benchmarks/compress_methods.py --base <base>/model --methods gptq-4 gptq-3 magnitude-75 \
        magnitude-75+recover iterative-75 --out benchmarks/results/compress_training.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from scratch import scratch_dir
from tune_search import run  # noqa: E402 - `raylm run` in its own process: (summary, wall seconds)

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

# A 12M-parameter Llama (6 layers, hidden 384): input features of every linear layer a multiple of 64,
# so bitsandbytes' 4-bit CPU kernel quantizes all of them.
ARCH = {"family": "llama", "layers": 6, "heads": 6, "hidden": 384, "intermediate": 1024, "context": 128}
METHODS = {
    "int8": {"name": "int8"},
    "nf4": {"name": "nf4", "double_quant": True},
    "fp4": {"name": "fp4", "double_quant": True},
    "gguf-f16": {"name": "gguf", "type": "f16"},
    "gguf-q8_0": {"name": "gguf", "type": "q8_0"},
    "gguf-q5_0": {"name": "gguf", "type": "q5_0"},
    "gguf-q4_0": {"name": "gguf", "type": "q4_0"},
    "magnitude": {"name": "magnitude", "sparsity": 0.5},
    "wanda": {"name": "wanda", "sparsity": 0.5},
    "magnitude-2:4": {"name": "magnitude", "pattern": "2:4"},
    "wanda-2:4": {"name": "wanda", "pattern": "2:4"},
    "structured": {"name": "structured", "heads": 0.5, "channels": 0.5},
    "gptq-4": {"name": "gptq", "bits": 4, "group_size": 128},
    "gptq-3": {"name": "gptq", "bits": 3, "group_size": 128},
    "magnitude-75": {"name": "magnitude", "sparsity": 0.75},
    "magnitude-75+recover": {"name": "magnitude", "sparsity": 0.75},
    "iterative-75": {"name": "iterative", "sparsity": 0.75, "rounds": 2, "rewind": "init"},
}
PRUNE = {"magnitude", "wanda", "structured", "iterative"}
# Training with the pruned weights held at zero, on the base model's own data: 1 worker with 2 CPUs as
# the base was trained. The iterative rounds retrain with the base run's own schedule (its default).
RETRAIN_RESOURCES = {"num_workers": 1, "cpus_per_worker": 2}
RECOVER = {
    "train": {"max_steps": 100, "batch_size": 16, "lr": 5e-4, "warmup_steps": 10, "eval_every": 100},
    "resources": RETRAIN_RESOURCES,
}
SECTIONS = {
    "magnitude-75+recover": {"recover": RECOVER},
    "iterative-75": {"method": {**METHODS["iterative-75"], "retrain": {"resources": RETRAIN_RESOURCES}}},
}


def pretrain(scratch: Path, steps: int) -> tuple[Path, dict]:
    job = {
        "kind": "pretrain",
        "model": {"architecture": ARCH},
        "tokenizer": {"train": {"type": "bpe", "vocab_size": 2048}},
        "data": {"path": str(CORPUS), "seq_len": 128, "val_fraction": 0.05},
        "train": {
            "max_steps": steps,
            "batch_size": 16,
            "lr": 1.5e-3,
            "warmup_steps": steps // 10,
            "eval_every": steps,
            "checkpoint_every": steps,
            "log_every": 50,
        },
        "resources": {"num_workers": 1, "cpus_per_worker": 2},
        "output": str(scratch / "base"),
    }
    summary, seconds = run(job, scratch / "base-spec")
    return scratch / "base" / "model", {**summary["metrics"], "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=400, help="pretraining steps of the base model")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--base", help="an already pretrained model folder (skips pretraining)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compress_methods.json"))
    args = parser.parse_args()
    scratch = scratch_dir("raylm-compress-bench-")
    if args.base:
        model, base = Path(args.base), {"model": args.base}
    else:
        model, base = pretrain(scratch, args.steps)
    print(f"base model: {base}", flush=True)
    rows = []
    for label in args.methods:
        job = {
            "kind": "prune" if METHODS[label]["name"] in PRUNE else "quantize",
            "model": {"path": str(model)},
            "method": METHODS[label],
            "measure": {"perplexity_blocks": 128, "prompts": 16, "prompt_tokens": 32, "new_tokens": 64},
            "resources": {"cpus": 2},
            "output": str(scratch / label),
            **SECTIONS.get(label, {}),
        }
        summary, seconds = run(job, scratch / f"{label}-spec")
        after = "quantized" if job["kind"] == "quantize" else "pruned"
        ppl, speed, size = summary["perplexity"], summary["tokens_per_s"], summary["weights_bytes"]
        bits = summary.get("bits_per_parameter") or {}
        row = {
            "method": label,
            "kind": job["kind"],
            "size_vs_fp32": size["ratio"],
            "bits_per_parameter": bits.get("all"),
            "bits_per_quantized_weight": bits.get("quantized_weights"),
            "sparsity": (summary.get("sparsity") or {}).get("pruned_layers"),
            "parameters_vs_fp32": round(
                summary["parameters"]["pruned"] / summary["parameters"]["original"], 4
            )
            if "parameters" in summary
            else None,
            "perplexity_fp32": ppl["original"],
            "perplexity": ppl[after],
            "perplexity_delta": round(ppl[after] - ppl["original"], 4),
            "perplexity_before_recovery": ppl.get("before_recovery"),
            "rounds": summary.get("rounds"),
            "greedy_agreement": summary["greedy_agreement"],
            "tokens_per_s_fp32": speed["original"],
            "tokens_per_s": speed[after],
            "speed_vs_fp32": round(speed[after] / speed["original"], 3),
            "kept_full_precision": len(summary.get("kept_full_precision") or []),
            "measured_on": summary["measured_on"],
            "job_seconds": round(seconds, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "command": "python benchmarks/compress_methods.py " + " ".join(sys.argv[1:]),
        "base": {"architecture": ARCH, "steps": args.steps, "corpus": "tinyshakespeare.txt", **base},
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
