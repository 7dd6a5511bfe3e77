"""Supervised fine-tuning throughput with dynamic padding against padding every row to seq_len, on
examples of mixed length, through raylm's job path.

    python benchmarks/sft_padding.py              # writes benchmarks/results/sft_padding.json

Examples: a story's opening (1 to 12 sentences of raylm's generated stories) as the prompt, the next
sentence as the response: 20 to 250 tokens under a char tokenizer, seq_len 256. The same LoRA job runs
three times (1 worker, 2 CPUs, same steps): data.padding max_length, longest, and longest with
group_by_length. Throughput is summary.json's: real (non-padding) tokens over the training time.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import yaml
from scratch import scratch_dir

VARIANTS = {
    "max_length": {"padding": "max_length"},
    "longest": {"padding": "longest"},
    "longest + group_by_length": {"padding": "longest", "group_by_length": True},
}


def make_data(folder: Path, examples: int) -> Path:
    from raylm.data.corpus import stories

    rng = random.Random(0)
    rows = []
    for story in stories(examples, seed=1):
        sentences = [s.strip() + "." for s in story.split(".") if s.strip()]
        if len(sentences) < 2:
            continue
        cut = rng.randint(1, min(12, len(sentences) - 1))
        rows.append({"prompt": " ".join(sentences[:cut]), "completion": " " + sentences[cut]})
    path = folder / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def base_model(folder: Path, data: Path) -> Path:
    """A small Llama with a char tokenizer covering the data (set-up, not measured)."""
    import torch
    from transformers import AutoModelForCausalLM

    from raylm.data.tokenizer import train_tokenizer
    from raylm.planning.models import architecture_config
    from raylm.spec.sections import Architecture

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    tokenizer = train_tokenizer([r["prompt"] + r["completion"] for r in rows], "char", 0)
    torch.manual_seed(0)
    arch = Architecture(layers=4, heads=4, hidden=128, context=256)
    model = AutoModelForCausalLM.from_config(architecture_config(arch, len(tokenizer), tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sft_padding.json"))
    args = parser.parse_args()

    scratch = scratch_dir("raylm-bench-pad-")
    data = make_data(scratch, 3000)
    base = base_model(scratch / "base", data)
    rows = []
    for name, options in VARIANTS.items():
        output = scratch / name.replace(" ", "")
        spec = {
            "kind": "finetune",
            "model": {"path": str(base)},
            "method": {"name": "lora", "r": 8},
            "data": {"path": str(data), "seq_len": 256, **options},
            "train": {
                "max_steps": args.steps,
                "batch_size": 8,
                "lr": 3e-3,
                "eval_every": 10**6,
                "log_every": 25,
            },
            "eval": {"exact_match_examples": 0},
            "resources": {"num_workers": 1, "cpus_per_worker": 2},
            "output": str(output),
        }
        path = scratch / f"{output.name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        subprocess.run([sys.executable, "-m", "raylm", "run", str(path)], check=True, capture_output=True)
        summary = json.loads((output / "summary.json").read_text())
        rows.append({"variant": name, **summary["throughput"], "val_loss": summary["metrics"]["val_loss"]})
        print(json.dumps(rows[-1]), flush=True)
    reference = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup_vs_max_length"] = row["tokens_per_s"] / reference
    result = {
        "command": f"python benchmarks/sft_padding.py --steps {args.steps}",
        "examples": "story openings (1-12 sentences) -> next sentence, char tokenizer, seq_len 256",
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
