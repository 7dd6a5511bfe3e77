"""Running a validated job: here (the embedded local Ray, or the cluster this process runs in), or on
a Ray cluster through the Ray Jobs API.

    raylm run jobs/quickstart.yaml                                  # embedded local Ray
    raylm run jobs/quickstart.yaml --address http://127.0.0.1:8265  # submit to a cluster
    raylm jobs list --address http://127.0.0.1:8265
"""

from __future__ import annotations

import contextlib
import itertools
import shlex
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import yaml

from raylm.runtime.cluster import SubmitError, check_address, ensure_ray

AGENT_RETRIES = 30


def run_here(job, verbose: bool = False) -> dict:
    """Run `job` in this process's Ray (embedded or the cluster's) and return its summary."""
    from raylm.kinds import driver, preflight
    from raylm.spec.reading import SpecError

    kind = driver(job)
    problems = preflight(job)
    if problems:
        raise SpecError(problems, source="preflight")
    # Load torch on the main thread before Ray Data's executor threads can import it concurrently:
    # a concurrent first import was seen to abort the process ("oneMKL FATAL ERROR: Cannot load
    # libtorch_cpu.so") in a job driver.
    import torch  # noqa: F401

    ensure_ray(job, verbose)
    return kind.run(job)


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    url = check_address(address)
    try:
        return JobSubmissionClient(url)
    except Exception as err:  # connection errors come in several types from requests/aiohttp
        raise SubmitError(f"cannot reach the Ray Jobs API at {url}: {err}") from None


@contextlib.contextmanager
def job_environment(job) -> Iterator[dict]:
    """The Ray job's runtime_env: a working folder holding the spec, this raylm, and the environment
    variables the job needs from the submitting shell. The folder is removed at exit (the Jobs API
    client uploads it while submitting)."""
    with tempfile.TemporaryDirectory(prefix="raylm-submit-") as folder:
        yield _runtime_env(job, Path(folder))


def _runtime_env(job, workdir: Path) -> dict:
    import raylm
    from raylm.runtime import startup_gc

    spec = job.model_dump(mode="json", exclude_none=True)
    (workdir / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    # Secrets (HF_TOKEN, cloud credentials) never travel here: the Jobs API shows a job's runtime
    # environment to anyone who can list jobs. The cluster's nodes hold their own (KubeRay: from a
    # Kubernetes secret, see cluster/), read by huggingface_hub's usual lookup.
    env_vars = {"PYTHONUNBUFFERED": "1"}
    servers = [job] if job.kind == "serve" else []
    if job.kind == "pipeline":
        servers = [job.job(n) for n in job.order if job.job(n).kind == "serve"]
    for server in servers:  # the server's API key travels as its digest only
        from raylm.serve.driver import DIGEST_ENV, key_hash

        digest = key_hash(server)
        if digest:
            env_vars[DIGEST_ENV] = digest
    return {
        "working_dir": str(workdir),
        # Ship this raylm so the cluster runs the code that validated the spec.
        "py_modules": [str(Path(raylm.__file__).parent)],
        "env_vars": env_vars,
        "worker_process_setup_hook": startup_gc.HOOK,  # fewer collections while processes import
    }


def submit(address: str, job, verbose: bool = False) -> str:
    """Submit the validated job as a Ray job running `raylm run` on its spec (the cluster's raylm
    finds the kind in the same registry); returns the submission id."""
    rc = client(address)
    entrypoint = f"python -m raylm run {shlex.quote('spec.yaml')}" + (" --verbose" if verbose else "")
    submission_id = f"raylm-{job.run_name}-{uuid.uuid4().hex[:8]}"
    with job_environment(job) as runtime_env:
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
