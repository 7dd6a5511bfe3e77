"""Where a job runs: the embedded local Ray that `raylm run` starts, or the cluster this process runs
in; and the guard on the addresses raylm submits to or serves on.

The Jobs API runs arbitrary code for whoever reaches it, so raylm refuses a non-loopback address
unless Ray token authentication is configured (RAY_AUTH_MODE=token and a token).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse


class SubmitError(Exception):
    """A problem with where or how a job runs (the address, its token, the local Ray not starting); the
    message says how to fix it."""


def ensure_ray(job, verbose: bool = False) -> None:
    """Connect to the cluster this process runs in (a Ray job), or start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(
            log_to_driver=True,
            logging_level=logging.INFO if verbose else logging.WARNING,
            runtime_env=address_for_the_job(os.environ["RAY_ADDRESS"]),
        )
    else:
        needed = (
            job.cpus_needed
            if hasattr(job, "cpus_needed")
            else job.resources.max_workers * job.resources.cpus_per_worker
        )
        # Ray's CPUs are logical: leave room beside the training workers for Ray Data's tasks.
        start_local_ray(max(os.cpu_count() or 1, math.ceil(needed) + 2), verbose)
    if not verbose:
        from raylm.runtime.ray_output import quiet_ray_console

        quiet_ray_console()


def address_for_the_job(address: str) -> dict | None:
    """Inside a Ray job (the Jobs API's), the job's processes are told the cluster address its driver was
    given, as the embedded Ray's are: Ray Train's placement-group cleaner looks the cluster up by itself,
    and on a machine with a second Ray it fails ("Found multiple active Ray instances"; seen in the
    Jobs-API tests, beside the test sessions' Rays), leaving a stopped search trial's workers reserved.
    Not outside a job (RAY_ADDRESS set by hand may be loopback or `local`), not for a non-address
    (`auto`, a URL), nor where the job's own runtime environment sets RAY_ADDRESS (Ray refuses a key set
    twice). The Jobs API gives its drivers the GCS address, canonical."""
    settings = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # a Ray job's own settings
    if not settings or address == "auto" or "://" in address:
        return None
    if "RAY_ADDRESS" in ((json.loads(settings).get("runtime_env") or {}).get("env_vars") or {}):
        return None
    return {"env_vars": {"RAY_ADDRESS": address}}


_EMBEDDED = False
# Ray's raylet waits ~20 s for its dashboard agent to report its ports, then aborts, and ray.init gives
# up ("The current node timed out during startup"); the agent is a Python process importing much of
# Ray, and beside another busy Ray on the same 2 cores it missed that window. A new start succeeds.
# (RAY_agent_register_timeout_ms=90000 did not lengthen that wait in Ray 2.60: tried.)
STARTS = 3


def embedded() -> bool:
    """Whether this process started the Ray it runs on (so the job ends when this process does)."""
    return _EMBEDDED


def start_local_ray(num_cpus: int, verbose: bool = False) -> None:
    """An embedded single-machine Ray that exists to run raylm's job.

    Ray runs its workers at nice 15 by default; here they share the cores with Ray's own daemons
    and the driver, and lost ~10% of their CPU time to them (benchmarks/pretrain_overhead.py), so
    the embedded Ray runs its workers at normal priority.
    """
    for attempt in range(1, STARTS + 1):
        try:
            _init_local_ray(num_cpus, verbose)
            break
        except Exception as err:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(err):
                raise
            logs = _stop_half_started_node(err)
            if not _agent_was_late(logs):
                raise SubmitError(
                    f"the local Ray did not come up: {err} Its raylet's log: {logs}/raylet.out"
                ) from None
            if attempt == STARTS:
                raise SubmitError(
                    f"the local Ray did not come up in {STARTS} tries: {err} Each time its dashboard agent took "
                    "longer to start than the raylet waits for, on a busy machine (the raylet's log, "
                    f"{logs}/raylet.out, ends with 'Timed out waiting for file'). Run again when the "
                    "machine is less loaded, or start Ray yourself (`ray start --head`) and run with "
                    "RAY_ADDRESS=auto."
                ) from None
            print(
                f"[raylm] the local Ray did not come up in time (try {attempt} of {STARTS}; a busy machine); "
                "starting it again",
                file=sys.stderr,
            )
    global _EMBEDDED
    _EMBEDDED = True


def _stop_half_started_node(err: Exception) -> str:
    """Stop what a failed `ray.init` left running, and return its log folder. The exception comes from
    inside the `Node` constructor, so `ray.init` never kept the node and `ray.shutdown()` cannot stop
    it: its GCS, dashboard and monitors would run on beside the next try (and until this process
    exits), on a machine already too busy."""
    from ray._private.node import Node

    frame = err.__traceback__
    while frame is not None:
        node = frame.tb_frame.f_locals.get("self")
        if isinstance(node, Node):
            with contextlib.suppress(Exception):  # Ray's own error is the one to report
                node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
            return node.get_logs_dir_path()
        frame = frame.tb_next
    return "/tmp/ray/session_latest/logs"


def _agent_was_late(logs: str) -> bool:
    """Whether the raylet aborted waiting for its agents' port files (the busy-machine case a new start
    gets past), not for another reason (a taken port, a full /dev/shm) that a new start would repeat."""
    try:
        return "Timed out waiting for file" in (Path(logs) / "raylet.out").read_text(errors="replace")
    except OSError:
        return False


def _init_local_ray(num_cpus: int, verbose: bool) -> None:
    import ray
    from ray.util import get_node_ip_address

    from raylm.runtime import startup_gc

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
                },
                "worker_process_setup_hook": startup_gc.HOOK,  # fewer collections while processes import
            },
        )
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)


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
