"""Load on a `kind: serve` deployment: requests/s, output tokens/s, time to first token, time per output
token and p50 / p99 latency at concurrency 1, 4 and 16, for the same model with batching on
(max_batch_size 16) and off (max_batch_size 1), and for its NF4 quantization beside it.

Loopback only, bounded in count (requests per level) and time (--budget-s per level). Every deployment
gets the same replica settings (1 CPU, max_ongoing_requests 16); they are measured one after another,
each request streamed through the same client code (greedy, the same prompts and max_tokens).

    raylm run jobs/quickstart.yaml                      # the model (runs/quickstart/model)
    python benchmarks/serve_load.py                     # writes benchmarks/results/serve_load.json
    python benchmarks/serve_load.py --model runs/quickstart/model --levels 1 4 16 --max-tokens 48
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx

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
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream("POST", url, json=body) as answer:
        if answer.status_code != 200:
            return {"status": answer.status_code}
        async for line in answer.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text") and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    first = latency if first is None else first
    return {"status": 200, "latency": latency, "ttft": first, "tokens": tokens,
            "tpot": (latency - first) / max(tokens - 1, 1)}  # fmt: skip


async def level(
    url: str, model: str, concurrency: int, requests: int, max_tokens: int, budget_s: float
) -> dict:
    results: list[dict] = []
    started = time.perf_counter()
    counter = iter(range(requests))

    async def worker(http):
        for i in counter:
            if time.perf_counter() - started > budget_s:
                return
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
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = parser.parse_args()

    from ray import serve

    from raylm.compress import bnb
    from raylm.runtime.cluster import start_local_ray
    from raylm.serve.driver import deploy
    from raylm.spec.compress import QuantizeJob
    from raylm.spec.loading import validate_dict

    model = Path(args.model)
    work = Path(tempfile.mkdtemp(prefix="raylm-bench-serve-"))
    method = QuantizeJob.model_validate(
        {
            "kind": "quantize",
            "model": {"path": str(model)},
            "method": {"name": "nf4"},
            "output": str(work / "x"),
        }
    ).method
    nf4 = bnb.write(model, work / "nf4", method, "cpu", bnb.kept_in_full_precision(model, method, "cpu"))

    start_local_ray(4)
    port = free_port()
    variants = {  # name: (model folder, max_batch_size)
        "fp32 batching on": (model, 16),
        "fp32 batching off": (model, 1),
        "nf4 batching on": (nf4, 16),
        "nf4 batching off": (nf4, 1),
    }
    rows = []
    for name, (folder, batch) in variants.items():
        app = name.replace(" ", "-")
        job = validate_dict({
            "kind": "serve", "name": app, "model": str(folder),
            "http": {"port": port, "route_prefix": f"/{app}"},
            "batching": {"max_batch_size": batch, "batch_wait_timeout_s": 0.01},
            "scaling": {"cpus_per_replica": 1, "max_ongoing_requests": 16, "max_queued_requests": 256},
        })  # fmt: skip
        deploy(job)
        url = f"http://127.0.0.1:{port}/{app}/v1/completions"
        asyncio.run(level(url, app, 2, 4, args.max_tokens, args.budget_s))  # warm-up, not recorded
        for concurrency in args.levels:
            count = max(8, args.requests_per_slot * concurrency)
            row = {
                "variant": name,
                **asyncio.run(level(url, app, concurrency, count, args.max_tokens, args.budget_s)),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        serve.delete(app)

    def rate(variant: str, concurrency: int) -> float:
        return next(
            r["requests_per_s"] for r in rows if r["variant"] == variant and r["concurrency"] == concurrency
        )

    top = max(args.levels)
    ratios = {
        f"fp32 batching on/off at {top}": round(
            rate("fp32 batching on", top) / rate("fp32 batching off", top), 2
        ),
        f"nf4 batching on/off at {top}": round(
            rate("nf4 batching on", top) / rate("nf4 batching off", top), 2
        ),
        f"nf4/fp32 batching on at {top}": round(
            rate("nf4 batching on", top) / rate("fp32 batching on", top), 2
        ),
        "nf4/fp32 batching on at 1": round(rate("nf4 batching on", 1) / rate("fp32 batching on", 1), 2),
    }
    result = {
        "command": "python benchmarks/serve_load.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k not in ("out", "model")
        ),
        "model": str(model),
        "rows": rows,
        "ratios": ratios,
        "target": "batching on >= 3x the requests/s of batching off at concurrency 16",
    }  # fmt: skip
    print(json.dumps(ratios, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2))
    serve.shutdown()


if __name__ == "__main__":
    main()
