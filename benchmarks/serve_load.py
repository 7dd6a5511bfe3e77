"""Load on a `kind: serve` deployment: requests/s, output tokens/s, time to first token, time per output
token and p50 / p99 latency at concurrency 1, 4 and 16, for the same model with batching on
(max_batch_size 16) and off (max_batch_size 1), its NF4 quantization beside it, two LoRA adapters and
the base mixed in one batch against one adapter alone, and the peer a CPU user would pick instead:
llama.cpp's OpenAI-compatible server (llama-cpp-python) on raylm's own GGUF export of the same model.

Loopback only, bounded in count (requests per level) and time (--budget-s per level). Every raylm
deployment gets the same replica settings (1 CPU, max_ongoing_requests 16) and llama.cpp one thread;
each request is streamed through the same client code (greedy, the same prompts and max_tokens). The
variants are measured one after another, in --rounds alternating rounds; ratios are pooled over them.

    raylm run jobs/quickstart.yaml                      # the model (runs/quickstart/model)
    pip install -e ".[bench]"                           # llama-cpp-python[server], built from source
    python benchmarks/serve_load.py                     # writes benchmarks/results/serve_load.json
    python benchmarks/serve_load.py --model runs/quickstart/model --levels 1 4 16 --max-tokens 48
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from scratch import scratch_dir

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Once upon a time",
    "The little dog",
    "One day, a girl",
    "Tom and Sue",
    "The sun was",
    "In the park",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def one_request(http: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy completion. Output tokens: the usage chunk's count where the server sends
    one (raylm; it merges a flush's tokens into one chunk), else the chunks with text (llama.cpp's
    server sends no usage in a stream, one chunk per token)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    first, usage, chunks = None, None, 0
    async with http.stream("POST", url, json=body) as answer:
        if answer.status_code != 200:
            return {"status": answer.status_code}
        async for line in answer.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - start
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    first = latency if first is None else first
    tokens = usage if usage is not None else chunks
    return {"status": 200, "latency": latency, "ttft": first, "tokens": tokens,
            "tpot": (latency - first) / max(tokens - 1, 1)}  # fmt: skip


async def level(
    url: str, models: list[str], concurrency: int, requests: int, max_tokens: int, budget_s: float
) -> dict:
    """`requests` completions, `concurrency` at a time; request i names models[i % len(models)]."""
    results: list[dict] = []
    started = time.perf_counter()
    counter = iter(range(requests))

    async def worker(http):
        for i in counter:
            if time.perf_counter() - started > budget_s:
                return
            model = models[i % len(models)]
            results.append(await one_request(http, url, model, PROMPTS[i % len(PROMPTS)], max_tokens))

    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(*[worker(http) for _ in range(concurrency)])
    wall = time.perf_counter() - started
    ok = [r for r in results if r["status"] == 200]
    latencies = sorted(r["latency"] for r in ok)

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(round(p * (len(latencies) - 1))))]

    return {
        "concurrency": concurrency,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(ok) / wall, 3),
        "output_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "ttft_ms_p50": round(1000 * statistics.median(r["ttft"] for r in ok), 1),
        "tpot_ms_p50": round(1000 * statistics.median(r["tpot"] for r in ok), 2),
        "latency_ms_p50": round(1000 * pct(0.5), 1),
        "latency_ms_p99": round(1000 * pct(0.99), 1),
    }


def lora_adapters(model: Path, work: Path) -> dict[str, Path]:
    """Two LoRA adapters (r 8 on every linear layer) in PEFT's folder format, with random weights:
    the server's speed does not depend on the values, and none is trained here."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = {}
    for seed, name in enumerate(["poet", "clerk"]):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(model)
        config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(base, config).save_pretrained(work / name)
        folders[name] = work / name
    return folders


def wait_until_up(url: str, process: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama.cpp's server exited with {process.returncode} (see its log)")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"llama.cpp's server did not answer {url} within {timeout_s:g} s")


def start_llama_cpp(gguf_file: Path, port: int, context: int, log: Path) -> subprocess.Popen:
    """llama-cpp-python's OpenAI-compatible server on one thread (a raylm replica has one CPU); it
    decodes one request at a time, and the others wait (by default a new request would interrupt the
    one streaming)."""
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_file), "--model_alias", "llama-cpp",
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(context), "--n_batch", str(context),
        "--n_threads", "1", "--n_threads_batch", "1", "--interrupt_requests", "False",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    wait_until_up(f"http://127.0.0.1:{port}/v1/models", process)
    return process


def pooled(rows: list[dict], variant: str, concurrency: int, key: str = "requests_per_s") -> float:
    """Over the rounds: requests (or output tokens) over summed wall time; TPOT: the median of the
    rounds' medians."""
    chosen = [r for r in rows if r["variant"] == variant and r["concurrency"] == concurrency]
    if key == "tpot_ms_p50":
        return statistics.median(r[key] for r in chosen)
    done = sum(r["requests"] - r["failed"] for r in chosen) if key == "requests_per_s" else sum(
        r["output_tokens_per_s"] * r["wall_s"] for r in chosen
    )  # fmt: skip
    return done / sum(r["wall_s"] for r in chosen)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / "runs" / "quickstart" / "model"))
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--requests-per-slot", type=int, default=4, help="requests per level = this x concurrency (>= 8)"
    )
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--budget-s", type=float, default=120.0, help="time limit per level")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds over every variant")
    parser.add_argument("--only", nargs="+", help="measure only these variants (names as in the table)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = parser.parse_args()

    from ray import serve

    from raylm.compress import bnb, gguf
    from raylm.runtime.cluster import start_local_ray
    from raylm.serve.driver import deploy
    from raylm.spec.compress import QuantizeJob
    from raylm.spec.loading import validate_dict

    model = Path(args.model)
    work = scratch_dir("raylm-bench-serve-")
    method = QuantizeJob.model_validate(
        {
            "kind": "quantize",
            "model": {"path": str(model)},
            "method": {"name": "nf4"},
            "output": str(work / "x"),
        }
    ).method
    nf4 = bnb.write(model, work / "nf4", method, "cpu", bnb.kept_in_full_precision(model, method, "cpu"))
    gguf.write(model, work / "model-f32.gguf", "f32")  # the same float32 weights, as llama.cpp reads them
    adapters = lora_adapters(model, work)

    start_local_ray(4)
    port, peer_port = free_port(), free_port()
    peer = None
    if not args.only or "llama.cpp (f32 GGUF)" in args.only:
        peer = start_llama_cpp(work / "model-f32.gguf", peer_port, 256, work / "llama-cpp.log")
    top, bottom = max(args.levels), min(args.levels)
    variants = {  # name: (model folder, max_batch_size, compile, adapters, levels, model names cycled)
        "fp32 batching on": (model, 16, False, {}, args.levels, None),
        "fp32 batching off": (model, 1, False, {}, args.levels, None),
        "fp32 compiled batching on": (model, 16, True, {}, args.levels, None),
        "fp32 compiled batching off": (model, 1, True, {}, args.levels, None),
        "nf4 batching on": (nf4, 16, False, {}, args.levels, None),
        "nf4 batching off": (nf4, 1, False, {}, args.levels, None),
        "lora mixed (poet, clerk, base)": (model, 16, False, adapters, [top], ["poet", "clerk", None]),
        "lora one adapter (poet)": (model, 16, False, adapters, [top], ["poet"]),
        "llama.cpp (f32 GGUF)": (None, None, None, None, sorted({bottom, top}), ["llama-cpp"]),
    }
    variants = {name: v for name, v in variants.items() if not args.only or name in args.only}
    rows = []
    try:
        for round_ in range(1, args.rounds + 1):
            for name, (folder, batch, compiled, lora, levels, names) in variants.items():
                app = "bench-" + "".join(c if c.isalnum() else "-" for c in name).strip("-")
                if folder is None:
                    url = f"http://127.0.0.1:{peer_port}/v1/completions"
                else:
                    job = validate_dict({
                        "kind": "serve", "name": app, "model": str(folder),
                        "adapters": {k: str(v) for k, v in lora.items()},
                        "http": {"port": port, "route_prefix": f"/{app}"},
                        "batching": {"max_batch_size": batch, "batch_wait_timeout_s": 0.01, "compile": compiled},
                        "scaling": {"cpus_per_replica": 1, "max_ongoing_requests": 16, "max_queued_requests": 256},
                    })  # fmt: skip
                    deploy(job)
                    url = f"http://127.0.0.1:{port}/{app}/v1/completions"
                models = [app if n is None else n for n in (names or [None])]
                # warm-up, not recorded: every model name once (adapters load on first use)
                asyncio.run(level(url, models, 2, max(4, len(models)), args.max_tokens, args.budget_s))
                for concurrency in levels:
                    count = max(8, args.requests_per_slot * concurrency)
                    measured = asyncio.run(
                        level(url, models, concurrency, count, args.max_tokens, args.budget_s)
                    )
                    row = {"round": round_, "variant": name, **measured}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                if folder is not None:
                    serve.delete(app)
    finally:
        if peer is not None:
            peer.terminate()
            peer.wait(timeout=30)

    def ratio(a: str, b: str, concurrency: int, key: str = "requests_per_s") -> float:
        return round(pooled(rows, a, concurrency, key) / pooled(rows, b, concurrency, key), 2)

    def per_round(a: str, b: str, concurrency: int, key: str = "requests_per_s") -> list[float]:
        return [
            round(pooled([r for r in rows if r["round"] == k], a, concurrency, key)
                  / pooled([r for r in rows if r["round"] == k], b, concurrency, key), 2)
            for k in range(1, args.rounds + 1)
        ]  # fmt: skip

    pairs = {  # name: (numerator, denominator, concurrency, measure)
        f"fp32 batching on/off at {top} (requests/s)": ("fp32 batching on", "fp32 batching off", top, "requests_per_s"),
        f"fp32 compiled batching on/off at {top} (requests/s)": ("fp32 compiled batching on", "fp32 compiled batching off", top, "requests_per_s"),
        f"nf4 batching on/off at {top} (requests/s)": ("nf4 batching on", "nf4 batching off", top, "requests_per_s"),
        f"nf4/fp32 batching on at {top} (requests/s)": ("nf4 batching on", "fp32 batching on", top, "requests_per_s"),
        f"nf4/fp32 batching on at {bottom} (requests/s)": ("nf4 batching on", "fp32 batching on", bottom, "requests_per_s"),
        f"compiled/uncompiled batching on at {top} (requests/s)": ("fp32 compiled batching on", "fp32 batching on", top, "requests_per_s"),
        f"lora mixed/one adapter at {top} (requests/s)": ("lora mixed (poet, clerk, base)", "lora one adapter (poet)", top, "requests_per_s"),
        f"raylm/llama.cpp at {top} (output tokens/s)": ("fp32 batching on", "llama.cpp (f32 GGUF)", top, "output_tokens_per_s"),
        f"raylm compiled/llama.cpp at {top} (output tokens/s)": ("fp32 compiled batching on", "llama.cpp (f32 GGUF)", top, "output_tokens_per_s"),
        f"raylm/llama.cpp at {bottom} (TPOT)": ("fp32 batching on", "llama.cpp (f32 GGUF)", bottom, "tpot_ms_p50"),
        f"raylm compiled/llama.cpp at {bottom} (TPOT)": ("fp32 compiled batching on", "llama.cpp (f32 GGUF)", bottom, "tpot_ms_p50"),
    }  # fmt: skip
    measured = {(r["variant"], r["concurrency"]) for r in rows}
    pairs = {k: v for k, v in pairs.items() if {(v[0], v[2]), (v[1], v[2])} <= measured}
    ratios = {name: ratio(a, b, c, key) for name, (a, b, c, key) in pairs.items()}
    rounds = {name: per_round(a, b, c, key) for name, (a, b, c, key) in pairs.items()}
    result = {
        "command": "python benchmarks/serve_load.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k not in ("out", "model") and v is not None
        ),
        "model": str(model),
        "rows": rows,
        "ratios": ratios,
        "ratios_per_round": rounds,
        "targets": {
            f"fp32 batching on/off at {top} (requests/s)": ">= 3x, pooled over the rounds",
            f"fp32 compiled batching on/off at {top} (requests/s)": ">= 3x, pooled over the rounds",
            f"raylm compiled/llama.cpp at {bottom} (TPOT)": "<= 1.5x",
        },
    }  # fmt: skip
    print(json.dumps({"ratios": ratios, "per round": rounds}, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2))
    serve.shutdown()


if __name__ == "__main__":
    main()
