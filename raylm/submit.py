"""Where a job runs: an embedded local Ray (default), or a Ray cluster through the Ray Jobs API.

    raylm run jobs/quickstart.yaml                                  # embedded local Ray
    raylm run jobs/quickstart.yaml --address http://127.0.0.1:8265  # submit to a cluster
    raylm jobs list --address http://127.0.0.1:8265

The Jobs API runs arbitrary code for whoever reaches it, so raylm refuses a non-loopback address
unless Ray token authentication is configured (RAY_AUTH_MODE=token and a token).
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import math
import os
import shlex
import socket
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import yaml

AGENT_RETRIES = 30


class SubmitError(Exception):
    """A problem with where or how a job is submitted; the message says how to fix it."""


# ---- embedded / in-cluster execution --------------------------------------------------------------


def ensure_ray(job, verbose: bool = False) -> None:
    """Connect to the cluster this process runs in (a Ray job), or start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, logging_level=logging.INFO if verbose else logging.WARNING)
    else:
        needed = (
            job.cpus_needed
            if hasattr(job, "cpus_needed")
            else job.resources.max_workers * job.resources.cpus_per_worker
        )
        # Ray's CPUs are logical: leave room beside the training workers for Ray Data's tasks.
        start_local_ray(max(os.cpu_count() or 1, math.ceil(needed) + 2), verbose)
    if not verbose:
        from raylm.train.console import quiet_ray_console

        quiet_ray_console()


_EMBEDDED = False


def embedded() -> bool:
    """Whether this process started the Ray it runs on (so the job ends when this process does)."""
    return _EMBEDDED


def start_local_ray(num_cpus: int, verbose: bool = False) -> None:
    """An embedded single-machine Ray that exists to run raylm's job.

    Ray runs its workers at nice 15 by default; here they share the cores with Ray's own daemons
    and the driver, and lost ~10% of their CPU time to them (benchmarks/pretrain_overhead.py), so
    the embedded Ray runs its workers at normal priority.
    """
    import ray
    from ray.util import get_node_ip_address

    # Ray's own processes (Ray Train's placement-group cleaner, state queries) find "the" cluster
    # through RAY_ADDRESS, else by looking for running Ray instances: with a second Ray on the same
    # machine they fail ("Found multiple active Ray instances"), and a Tune trial stopped early would
    # keep its workers' CPUs. So the embedded Ray's GCS gets a port chosen here, and every process of
    # the job is told that address.
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            _system_config={"worker_niceness": 0},
            logging_level=logging.INFO if verbose else logging.WARNING,
            runtime_env={
                "env_vars": {
                    "RAY_ADDRESS": f"{get_node_ip_address()}:{port}",
                    # Ray Train's watcher of preempted nodes polls every 5 s: on the one machine this
                    # Ray lives on there is no other node to move to, only CPU taken from training
                    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                }
            },
        )
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)
    global _EMBEDDED
    _EMBEDDED = True


def run_here(job, verbose: bool = False) -> dict:
    """Run `job` in this process's Ray (embedded or the cluster's) and return its summary."""
    from raylm.kinds import driver
    from raylm.spec import SpecError

    kind = driver(job)
    problems = kind.preflight(job)
    if problems:
        raise SpecError(problems, source="preflight")
    # Load torch on the main thread before Ray Data's executor threads can import it concurrently:
    # a concurrent first import was seen to abort the process ("oneMKL FATAL ERROR: Cannot load
    # libtorch_cpu.so") in a job driver.
    import torch  # noqa: F401

    ensure_ray(job, verbose)
    return kind.run(job)


# ---- Jobs API ------------------------------------------------------------------------------------


def is_loopback(address: str) -> bool:
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(
                ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None)
            )
        except (socket.gaierror, ValueError):
            return False


def token_configured() -> bool:
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return False
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return Path(token_file).is_file() and Path(token_file).read_text().strip() != ""


def check_address(address: str) -> str:
    """The Jobs API (dashboard) URL for `address`; refuses non-loopback hosts without token auth."""
    if address.startswith("ray://"):
        raise SubmitError(
            f"{address}: raylm submits through the Ray Jobs API; give the dashboard address, e.g. http://HOST:8265"
        )
    url = address if "://" in address else f"http://{address}"
    if not is_loopback(url) and not token_configured():
        raise SubmitError(
            f"refusing to submit to {address}: the Ray Jobs API runs arbitrary code for anyone who can reach it, "
            "and Ray token authentication is not configured here. Start the cluster with RAY_AUTH_MODE=token, "
            "then set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token, "
            "e.g. from `ray get-auth-token`) in this shell."
        )
    return url


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    url = check_address(address)
    try:
        return JobSubmissionClient(url)
    except Exception as err:  # connection errors come in several types from requests/aiohttp
        raise SubmitError(f"cannot reach the Ray Jobs API at {url}: {err}") from None


def job_environment(job) -> dict:
    """The Ray job's runtime_env: a working folder holding the spec, this raylm, and the environment
    variables the job needs from the submitting shell."""
    import raylm

    workdir = Path(tempfile.mkdtemp(prefix="raylm-submit-"))
    spec = job.model_dump(mode="json", exclude_none=True)
    (workdir / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    env_vars = {"PYTHONUNBUFFERED": "1"}
    if os.environ.get("HF_TOKEN"):  # gated hub models and datasets; never in the spec record or a log
        env_vars["HF_TOKEN"] = os.environ["HF_TOKEN"]
    if job.kind == "serve":  # the server's API key travels as its digest only
        from raylm.serve.driver import DIGEST_ENV, key_hash

        digest = key_hash(job)
        if digest:
            env_vars[DIGEST_ENV] = digest
    return {
        "working_dir": str(workdir),
        # Ship this raylm so the cluster runs the code that validated the spec.
        "py_modules": [str(Path(raylm.__file__).parent)],
        "env_vars": env_vars,
    }


def submit(address: str, job, verbose: bool = False) -> str:
    """Submit the validated job as a Ray job running `raylm run` on its spec (the cluster's raylm
    finds the kind in the same registry); returns the submission id."""
    rc = client(address)
    runtime_env = job_environment(job)
    entrypoint = f"python -m raylm run {shlex.quote('spec.yaml')}" + (" --verbose" if verbose else "")
    submission_id = f"raylm-{job.run_name}-{uuid.uuid4().hex[:8]}"
    for attempt in itertools.count():
        try:
            return rc.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                submission_id=submission_id,
                metadata={"raylm_run": job.run_name, "raylm_kind": job.kind},
            )
        except RuntimeError as err:  # the SDK's HTTP errors
            # A head that just started answers 500 "No available agent" until its job agent is up.
            if "No available agent" in str(err) and attempt < AGENT_RETRIES:
                time.sleep(2)
                continue
            raise SubmitError(f"the Jobs API at {address} refused the job: {err}") from None


def follow(address: str, submission_id: str, echo) -> str:
    """Stream a job's logs until it ends; returns its final status name."""
    import asyncio

    rc = client(address)

    async def tail() -> None:
        async for lines in rc.tail_job_logs(submission_id):
            echo(lines, nl=False)

    asyncio.run(tail())
    return str(rc.get_job_status(submission_id).value)
