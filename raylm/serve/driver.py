"""`kind: serve` on the driver: checks before anything starts, then the Serve application.

    raylm run jobs/serve.yaml                                   # local: prints the URL, Ctrl-C stops it
    raylm run jobs/serve.yaml --address http://HEAD:8265        # deploys on the cluster and returns
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "quickstart", "prompt": "To be", "max_tokens": 20}'
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import threading
from pathlib import Path

from raylm.runtime.secrets import ApiKeyError, read_api_key
from raylm.runtime.storage import RunFolderError
from raylm.spec.reading import Problems

DIGEST_ENV = (
    "RAYLM_API_KEY_SHA256"  # a submitted job's key, as its digest (the key never leaves this machine)
)


def key_hash(job) -> str | None:
    """The SHA-256 digest of the API key: from the key here, or the digest a submitting machine sent."""
    from raylm.serve.protocol import key_digest

    key = api_key(job)
    return key_digest(key) if key else (os.environ.get(DIGEST_ENV) or None)


def api_key(job) -> str | None:
    """The API key from http.api_key_file or the http.api_key_env variable (never from the spec)."""
    return read_api_key(job.http.api_key_file, job.http.api_key_env, "http.api_key_file")


class Serve:
    def preflight(self, job) -> Problems:
        from raylm.runtime.cluster import is_loopback

        problems: Problems = []
        try:
            key = api_key(job)
        except ApiKeyError as err:
            problems.append(("http.api_key_file", str(err)))
            key = "?"
        if key is None and not os.environ.get(DIGEST_ENV) and not is_loopback(job.http.host):
            problems.append(
                (
                    "http.host",
                    f"{job.http.host} is reachable from other machines, so an API key is required: set "
                    f"{job.http.api_key_env} (or http.api_key_file), or bind to 127.0.0.1",
                )
            )
        if job.engine == "vllm":
            if not is_loopback(job.http.host):
                problems.append(
                    (
                        "http.host",
                        "engine vllm serves without raylm's API-key check: bind to 127.0.0.1 "
                        "and put an authenticating gateway in front",
                    )
                )
            if importlib.util.find_spec("vllm") is None:
                problems.append(
                    ("engine", "vllm is not installed here: pip install vllm (a CUDA build, GPU nodes)")
                )
            return problems + vllm_problems(job)
        job, unreadable = fetched(job)
        if unreadable:
            return problems + unreadable
        problems += _model_problems(job)
        for name, folder in job.adapters.items():
            try:
                config = Path(adapter_folder(folder)) / "adapter_config.json"
            except RunFolderError as err:
                problems.append((f"adapters.{name}", str(err)))
                continue
            if not config.is_file():
                problems.append(
                    (
                        f"adapters.{name}",
                        f"{folder}: no adapter_config.json (a PEFT LoRA adapter folder, or a LoRA run's folder)",
                    )
                )
            elif json.loads(config.read_text()).get("peft_type") != "LORA":
                problems.append(
                    (f"adapters.{name}", f"{folder}: not a LoRA adapter (served one at a time as model.path)")
                )
        if job.chat_template and "{" not in job.chat_template and not Path(job.chat_template).is_file():
            problems.append(("chat_template", f"{job.chat_template}: neither a template nor a file"))
        from raylm.infer.strategies import StrategyError, prepare

        for i, strategy in enumerate(job.strategies):
            try:
                prepare(strategy)
            except StrategyError as err:
                problems.append((f"strategies.{i}", str(err)))
        return problems

    def run(self, job) -> dict:
        from ray import serve

        from raylm.runtime import cluster

        (summary,) = deploy(job)
        if not cluster.embedded():
            return summary  # deployed on the cluster; it stays up after this job ends
        print("[raylm] Ctrl-C stops the server", flush=True)
        stop = threading.Event()
        for number in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the shutdown short
            signal.signal(number, lambda *_: stop.set())
        while not stop.wait(1):
            pass
        print("[raylm] stopping the server", flush=True)
        serve.shutdown()
        return {**summary, "stopped": True}


def deploy(*jobs) -> list[dict]:
    """Start Serve's HTTP proxy (if it is not up) and deploy one application per spec, all at once (they
    share the proxy: the first spec's host and port, each under its own route prefix); returns once
    every one answers, with their summaries. The proxy's options (request_timeout_s too) are the first
    spec's, as when a proxy is already up."""
    from ray import serve

    proxies = {(job.http.host, job.http.port, job.http.proxy) for job in jobs}
    if len(proxies) != 1:  # one proxy: a spec's host (and with it the API-key rule) must hold for all
        raise ValueError(
            "applications deployed together share one HTTP proxy: give them the same http.host, http.port and http.proxy"
        )
    named = {
        "model_name": [job.model_name for job in jobs],
        "http.route_prefix": [j.http.route_prefix for j in jobs],
    }
    for field, values in named.items():
        if len(set(values)) != len(values):
            raise ValueError(f"applications deployed together need distinct {field}s: {values}")
    digests = [key_hash(job) for job in jobs]
    jobs = [absolute_paths(job) for job in jobs]  # replicas may start in another folder (or node)
    http = jobs[0].http
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines repeat what raylm prints
    serve.start(
        proxy_location="HeadOnly" if http.proxy == "head" else "EveryNode",
        http_options={"host": http.host, "port": http.port, "request_timeout_s": http.request_timeout_s},
    )
    serve.run_many(
        [
            serve.RunTarget(
                target=_vllm_app(job) if job.engine == "vllm" else _transformers_app(job, digest),
                name=job.model_name,
                route_prefix=job.http.route_prefix,
            )
            for job, digest in zip(jobs, digests, strict=True)
        ]
    )
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host
    summaries = []
    for job, digest in zip(jobs, digests, strict=True):
        url = f"http://{host}:{http.port}{job.http.route_prefix.rstrip('/')}/v1"
        key = "API key required" if digest else "no API key"
        print(f"[raylm] serving {job.model_name} at {url} (OpenAI API; {key})", flush=True)
        summaries.append(
            {"kind": "serve", "model": job.model_name, "url": url, "adapters": list(job.adapters)}
        )
    return summaries


def absolute_paths(job):
    """A copy of the spec with every local path that exists here made absolute."""

    def absolute(path: str | None) -> str | None:
        if path is None or not Path(path).expanduser().exists():
            return path
        return str(Path(path).expanduser().resolve())

    job = job.model_copy(deep=True)
    job.model.path, job.model.base = absolute(job.model.path), absolute(job.model.base)
    # an adapter named by its fine-tuning run folder is the run's adapter/ (as for model.path)
    job.adapters = {name: absolute(adapter_folder(folder)) for name, folder in job.adapters.items()}
    if job.chat_template and "{" not in job.chat_template:
        job.chat_template = absolute(job.chat_template)
    for strategy in job.strategies:
        strategy.exemplars, strategy.documents = absolute(strategy.exemplars), absolute(strategy.documents)
    return job


def fetched(job) -> tuple[object, Problems]:
    """A copy of the serve spec whose model, base and adapters named by storage URIs are this node's
    copies (for the checks; the replicas fetch from the URIs on their own nodes), and a (field,
    problem) pair for each that cannot be fetched."""
    from raylm.runtime.storage import fetch_artifact

    job, problems = job.model_copy(deep=True), []

    def fetch(field: str, where: str | None) -> str | None:
        try:
            return fetch_artifact(where)
        except (OSError, ValueError) as err:  # RunFolderError, or pyarrow: no bucket, object, credentials
            problems.append((field, f"cannot fetch {where}: {err}"))
            return where

    job.model.path, job.model.base = fetch("model.path", job.model.path), fetch("model.base", job.model.base)
    job.adapters = {name: fetch(f"adapters.{name}", folder) for name, folder in job.adapters.items()}
    return job, problems


def adapter_folder(path: str) -> str:
    """The adapter folder `path` names: itself, or the adapter a raylm fine-tuning run folder produced."""
    from raylm.runtime.storage import run_artifact

    folder = Path(path).expanduser()
    return str(run_artifact(folder)) if folder.exists() else path


def _model_problems(job) -> Problems:
    path = Path(job.model.path).expanduser()
    if not path.exists():
        return [("model.path", f"{job.model.path} does not exist")]
    if job.adapters:
        from raylm.runtime.storage import run_artifact

        try:
            target = run_artifact(path)
        except RunFolderError as err:
            return [("model.path", str(err))]
        if not (target / "config.json").exists() or (target / "adapter_config.json").exists():
            return [("adapters", f"adapters need model.path to be a full model folder; {target} is not one")]
    return []


def _transformers_app(job, key_hash: str | None):
    from raylm.serve.app import build_app

    return build_app(job, key_hash)


# defaults vLLM applies through override_generation_config (its names), the others refused at validate
VLLM_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_new_tokens"}  # fmt: skip


def vllm_config(job) -> dict:
    """The keyword arguments of ray.serve.llm.LLMConfig for a ServeJob with engine: vllm: the model
    resolved as the transformers engine resolves it (a raylm run folder means what it produced),
    whole GPUs per replica as tensor parallelism, the spec's dtype, chat template and defaults."""
    from raylm.runtime.storage import run_artifact

    scaling = job.scaling
    deployment = {"max_ongoing_requests": scaling.max_ongoing_requests}
    if scaling.max_queued_requests != -1:
        deployment["max_queued_requests"] = scaling.max_queued_requests
    if scaling.autoscaling:
        deployment["autoscaling_config"] = scaling.autoscaling.model_dump()
    else:
        deployment["autoscaling_config"] = {
            "min_replicas": scaling.replicas,
            "max_replicas": scaling.replicas,
        }
    engine = {"tensor_parallel_size": max(int(scaling.gpus_per_replica), 1)}
    if job.model.dtype != "auto":
        engine["dtype"] = job.model.dtype
    if job.chat_template:
        engine["chat_template"] = _template_text(job.chat_template)
    given = job.defaults.model_dump(exclude_unset=True)
    overrides = {VLLM_DEFAULTS[k]: v for k, v in given.items() if k in VLLM_DEFAULTS and v is not None}
    if overrides:
        engine["override_generation_config"] = overrides
    return {
        "model_loading_config": {
            "model_id": job.model_name,
            "model_source": str(run_artifact(Path(job.model.path))),
        },
        "engine_kwargs": engine,
        "deployment_config": deployment,
    }


def vllm_problems(job) -> list[tuple[str, str]]:
    """What engine: vllm cannot honour, refused at validate rather than ignored."""
    from raylm.runtime.storage import run_artifact

    problems = []
    target = run_artifact(Path(job.model.path))
    if (target / "adapter_config.json").exists() or (target / "raylm_method.json").exists():
        problems.append(
            ("model.path", f"{target} is an adapter: engine vllm serves full models (merge it first)")
        )
    if job.scaling.gpus_per_replica < 1 or job.scaling.gpus_per_replica != int(job.scaling.gpus_per_replica):
        problems.append(
            ("scaling.gpus_per_replica", "engine vllm takes whole GPUs per replica (tensor parallel)")
        )
    if "max_tokens_limit" in job.model_fields_set:
        problems.append(
            (
                "max_tokens_limit",
                "engine vllm has no per-request cap: leave it out (vLLM's limit is the context)",
            )
        )
    unsupported = sorted(set(job.defaults.model_dump(exclude_unset=True)) - set(VLLM_DEFAULTS))
    if unsupported:
        problems.append(
            (
                "defaults",
                f"engine vllm takes {', '.join(VLLM_DEFAULTS)} as defaults, not {', '.join(unsupported)}",
            )
        )
    if job.batching.max_cached_tokens is not None:
        problems.append(
            ("batching.max_cached_tokens", "engine vllm sizes its own cache (gpu_memory_utilization)")
        )
    if job.batching.compile:
        problems.append(
            (
                "batching.compile",
                "engine vllm compiles its own graphs: batching.compile is for engine: transformers",
            )
        )
    return problems


def _template_text(value: str) -> str:
    path = Path(value).expanduser()
    return path.read_text(encoding="utf-8") if "{" not in value and path.is_file() else value


def _vllm_app(job):
    """Ray Serve's LLM support (vLLM engines) with the same scaling settings; GPU clusters only."""
    from ray.serve.llm import LLMConfig, build_openai_app

    return build_openai_app({"llm_configs": [LLMConfig(**vllm_config(job))]})
