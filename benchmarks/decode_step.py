"""The serving loop's decoding step alone, uncompiled against `batching.compile` (torch.compile), side by
side in one process: milliseconds per decoding step for 1 row and for 16 rows decoding together, through
raylm's own continuous-batching loop (raylm.serve.continuous.DecodeLoop, no Serve, no HTTP), greedy, on
one CPU thread (a replica's share).

    raylm run jobs/quickstart.yaml                      # the model (runs/quickstart/model)
    python benchmarks/decode_step.py                    # writes benchmarks/results/decode_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from serve_load import PROMPTS, ROOT  # the server benchmark's prompts (this script's folder)


def wave(loop, tokenizer, rows: int, tokens: int) -> float:
    """`rows` requests submitted together, each decoding `tokens` tokens: ms per step (wall / tokens)."""
    from raylm.serve.engine import Request
    from raylm.spec.generation import GenerationSpec

    done, ended = [0], threading.Event()

    def emit(index, delta, reason, count):
        if reason is not None:
            done[0] += 1
            if done[0] == rows:
                ended.set()

    requests = [
        Request(
            tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"], GenerationSpec(max_new_tokens=tokens), emit
        )
        for i in range(rows)
    ]
    start = time.perf_counter()
    loop.submit(requests)
    ended.wait()
    return 1000 * (time.perf_counter() - start) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / "runs" / "quickstart" / "model"))
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=7, help="waves per measurement (median)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_step.json"))
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm.serve.compiled import warm_up
    from raylm.serve.continuous import DecodeLoop
    from raylm.serve.engine import Engine
    from raylm.spec.generation import GenerationSpec

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    loops = {}
    for name, compiled in (("uncompiled", False), ("compiled", True)):
        loops[name] = DecodeLoop(Engine(model, tokenizer), max_rows=16, compiled=compiled)
        if compiled:
            assert warm_up(loops[name], tokenizer("Hello")["input_ids"], GenerationSpec(max_new_tokens=4))
    rows = []
    for count in (1, 16):
        for loop in loops.values():
            wave(loop, tokenizer, count, args.tokens)  # warm-up, not recorded
        times = {name: [] for name in loops}
        for _ in range(args.repeats):  # alternating, so that drift on a shared machine hits both
            for name, loop in loops.items():
                times[name].append(wave(loop, tokenizer, count, args.tokens))
        for name in loops:
            rows.append({"variant": name, "rows": count, "ms_per_step_median": round(statistics.median(times[name]), 3),
                         "ms_per_step_all": [round(t, 3) for t in times[name]]})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)

    def step(name, count):
        return next(r["ms_per_step_median"] for r in rows if r["variant"] == name and r["rows"] == count)

    ratios = {
        f"uncompiled/compiled step, {n} row(s)": round(step("uncompiled", n) / step("compiled", n), 2)
        for n in (1, 16)
    }
    result = {
        "command": f"python benchmarks/decode_step.py --tokens {args.tokens} --repeats {args.repeats}",
        "model": args.model,
        "torch": torch.__version__,
        "rows": rows,
        "ratios": ratios,
    }
    print(json.dumps(ratios, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
