"""Shared fixtures: one local Ray for the whole session (each start costs seconds), tiny specs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
# Ray Train's controller polls its workers every 2 s by default; every fit waits for a poll to notice it
# ended, so a faster poll saves about a second a fit. (The driver-kill test runs its killed attempt at
# the default: at 0.5 s a 30-step run registered all its checkpoints before the kill landed.)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
CHROMIUM_INSTALL: dict = {}


def pytest_collection_modifyitems(session, config, items):
    """Where a selected test opens a page in Chromium and Debian's chromium is missing, start installing
    it (as root, with apt-get) in the background now: the download overlaps the tests before it."""
    import shutil
    import tempfile

    from tests.browser import chromium

    wanted = any("chromium" in getattr(item, "fixturenames", ()) for item in items)
    if not wanted or chromium() or os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    log = Path(tempfile.mkdtemp(prefix="raylm-apt-")) / "chromium-install.log"
    script = "apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium"
    CHROMIUM_INSTALL["log"] = log
    CHROMIUM_INSTALL["process"] = subprocess.Popen(
        ["bash", "-c", script],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )


@pytest.fixture(scope="session")
def chromium():
    """The path of headless Chromium: Debian's package, installed by the session where missing."""
    from tests.browser import chromium as found

    install = CHROMIUM_INSTALL.get("process")
    if install is not None:
        assert install.wait(timeout=900) == 0, CHROMIUM_INSTALL["log"].read_text()[-3000:]
    if found() is None:
        pytest.skip(
            "Debian's chromium is missing and this session cannot install it (not root): apt-get install chromium"
        )
    return found()


@pytest.fixture(scope="session")
def object_store(tmp_path_factory):
    """An S3-compatible server (moto's standalone server) on loopback for the whole session, reached the
    standard way: AWS_ENDPOINT_URL and the AWS_* credentials in the environment, set before the session's
    Ray starts so that its workers inherit them (as a cluster's nodes would have them). Yields a
    function that creates a bucket and returns its s3:// URI."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="raylm-test",
        AWS_SECRET_ACCESS_KEY="raylm-test-secret",
        AWS_DEFAULT_REGION="us-east-1",
    )
    # raylm's node cache (fetched inputs, a bucket run's W&B files) for this session's processes
    os.environ.setdefault("RAYLM_CACHE", str(tmp_path_factory.mktemp("raylm-cache")))

    def bucket(name: str) -> str:
        import boto3

        boto3.client("s3").create_bucket(Bucket=name)
        return f"s3://{name}"

    yield bucket
    server.stop()


@pytest.fixture(scope="session")
def ray_local(object_store):
    import ray

    from raylm.runtime.cluster import start_local_ray

    # Logical CPUs: two training workers plus room for Ray Data's tasks on a 2-core machine.
    start_local_ray(num_cpus=4)
    from raylm.data.pipeline import configure_ray_data

    configure_ray_data()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def reference_run(ray_local, tmp_path_factory):
    """The 2-worker DDP pretraining run (tiny_spec) that the pretraining and strategy tests compare
    against, and the trained model the compression tests start from (one fit per session)."""
    from raylm.spec.loading import validate_dict
    from raylm.submit import run_here

    output = tmp_path_factory.mktemp("reference") / "run"
    summary = run_here(validate_dict(tiny_spec(output)))
    return output, summary


def train_worker_pids() -> list[int]:
    """The PIDs of the alive Ray Train workers of a Ray this test process started (ray_local, or a
    `raylm run` it spawned), sorted: processes Ray titles ray::RayTrainWorker below this one, read from
    /proc. Not Ray's state API: on a loaded 2-core machine it answered seconds late, after the step a
    test meant to interrupt (or raised, stopping the watching thread)."""
    return ray_actor_pids("RayTrainWorker")


def ray_actor_pids(actor_class: str) -> list[int]:
    """The PIDs of the alive processes of `actor_class`'s actors in a Ray this test process started,
    sorted (their process title is ray::<class>, ray::<class>.<method> while one runs). Not Ray's state
    API: its list of dead actors leaves some out."""
    import psutil

    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            title = (proc.info["cmdline"] or [""])[0]
            if title.startswith(f"ray::{actor_class}") and proc.info["status"] != psutil.STATUS_ZOMBIE:
                if any(parent.pid == me for parent in proc.parents()):
                    found.append(proc.pid)
        except psutil.Error:  # gone meanwhile
            continue
    return sorted(found)


def run_cli_then_kill(spec_file: Path, log_file: Path, ready, linger_s: float = 0.0, env: dict | None = None):
    """`raylm run spec_file` in its own process group; once `ready()` returns something truthy (and
    `linger_s` later) SIGKILL the group, driver and embedded Ray together, and return that value."""
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "raylm", "run", str(spec_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        try:
            while not (seen := ready()):
                assert proc.poll() is None, log_file.read_text()[-3000:]
                time.sleep(0.2)
            time.sleep(linger_s)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return seen


GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range, never the same one twice in a session.
    A port from bind(0) lies in that range, where any outgoing connection of the Ray processes starting
    meanwhile may take it before the process it was meant for binds it (a second node's metrics agent
    once failed so: "Address already in use", and the node never joined)."""
    import random
    import socket

    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    ephemeral = int(ranges.read_text().split()[0]) if ranges.exists() else 32768
    for _ in range(1000):
        port = random.randrange(20000, ephemeral)  # Ray's worker ports are 10002-19999 by default
        if port in GIVEN_PORTS:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        GIVEN_PORTS.add(port)
        return port
    raise RuntimeError(f"no free port between 20000 and {ephemeral}")


def tiny_spec(output, **sections) -> dict:
    """A pretrain spec small enough for a CPU test: 2 layers, hidden 64, char tokenizer."""
    spec = {
        "kind": "pretrain",
        "model": {"architecture": {"family": "llama", "layers": 2, "heads": 2, "hidden": 64, "context": 32}},
        "tokenizer": {"train": {"type": "char"}},
        "data": {"generate": {"documents": 400}, "seq_len": 32},
        "train": {
            "max_steps": 30,
            "batch_size": 8,
            "lr": 3e-3,
            "eval_every": 10,
            "checkpoint_every": 10,
            "log_every": 5,
            # constant: the strategy tests extend these runs on resume (a decaying schedule refuses that)
            "schedule": "constant",
        },
        "resources": {"num_workers": 2},
        "output": str(output),
    }
    for key, value in sections.items():
        spec[key] = {**spec[key], **value} if isinstance(spec.get(key), dict) else value
    return spec


# The base model of the fine-tuning tests: grouped-query attention, so that counts distinguish k/v.
SFT_BASE = {"layers": 2, "heads": 4, "kv_heads": 2, "hidden": 64, "intermediate": 96, "context": 64}


@pytest.fixture(scope="session")
def sft_base(tmp_path_factory):
    """A tiny Llama, briefly pretrained on generated stories, and a char tokenizer that also covers
    the generated tasks, saved as a Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM

    from raylm.data.corpus import stories
    from raylm.data.tasks import generate
    from raylm.data.tokenizer import train_tokenizer
    from raylm.planning.models import architecture_config
    from raylm.spec.sections import Architecture

    texts = list(stories(300, seed=0))
    examples = generate("arithmetic", 200, seed=0)
    tokenizer = train_tokenizer(texts + [e["prompt"] + e["completion"] for e in examples], "char", 0)
    arch = Architecture(**SFT_BASE)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(architecture_config(arch, len(tokenizer), tokenizer))
    # A little pretraining on stories, so that a frozen base has features an adapter can use.
    stream = torch.tensor(tokenizer("".join(texts), add_special_tokens=False)["input_ids"])
    blocks = stream[: len(stream) // 32 * 32].view(-1, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        ids = blocks[step * 16 % (len(blocks) - 16) :][:16]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("base") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
