"""Shared fixtures: one local Ray for the whole session (each start costs seconds), tiny specs."""

import json
import os
import shutil
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
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest-xdist's workers share the cores: torch in each would start a thread per core, and on 2 cores
    # four busy threads took the quick tier from 93 s (one session) to 134 s; 64 s with a thread per worker.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, CORES // int(workers))))
SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
CHROMIUM_INSTALL: dict = {}


# The test files' groups, slowest first: their summed times in a two-worker run (af40405's, about twice
# one session's, as each worker had a core). pytest-xdist runs a group on one worker, whole, so that its
# module fixtures are built once; handing the slowest out first keeps one worker from starting a long
# group when the other is nearly done. The files not named here are short; they follow in their order.
SLOWEST_FIRST = [
    "tests/test_submit.py",  # ~600 s
    "tests/train/test_finetune.py",  # ~450 s
    "tests/train/test_strategies.py",  # ~400 s
    "tests/tune/test_tune.py",  # ~300 s
    "tests/train/test_preference_runs.py",  # ~280 s
    "tests/runtime/test_object_store.py",  # ~250 s
    "tests/serve/test_server.py",  # ~200 s
    "tests/runtime/test_local_ray.py",  # ~40 s, most of it waiting: beside the other worker's fits
    "tests/train/test_pretrain.py",
    "tests/compress/test_retrain.py",
    "tests/train/test_distill.py",
    "tests/compress/test_prune.py",
    "tests/pipeline/test_pipeline.py",
    "tests/compress/test_quantize.py",
    "tests/planning/test_memory.py",
    "tests/evaluate/test_evaluate.py",
    "tests/serve/test_continuous.py",
]


@pytest.hookimpl(optionalhook=True)  # no hook to implement where xdist is absent
def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one worker per core, at most 2. Each worker is a session with its
    own Ray, and half of what the suite waits on is Ray starting, stopping and polling: a second worker
    fills those gaps on 2 cores (docs/contributing.md)."""
    return min(CORES, 2)


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which turns the xdist_group marks into @group ids
def pytest_collection_modifyitems(session, config, items):
    start_chromium_install(items)
    group_for_workers(config, items)


# Files that must not run beside each other: the bucket tests check that runs leave no staging folder in
# the temp folder, and the killed bucket search leaves its own there for good.
SAME_WORKER = {"tests/runtime/test_object_store.py": "tests/tune/test_tune.py"}


def group_for_workers(config, items) -> None:
    """Each test file is one xdist_group (`--dist loadgroup`), and the files run slowest first."""
    if not getattr(config.option, "loadgroup", False):  # what xdist tells its workers of `--dist loadgroup`
        return
    rank = {path: i for i, path in enumerate(SLOWEST_FIRST)}
    for item in items:
        path = item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(SAME_WORKER.get(path, path)))
    # a stable sort: the other files keep their order
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


def start_chromium_install(items) -> None:
    """Where a selected test opens a page in Chromium and Debian's chromium is missing, start installing
    it (as root, with apt-get) in the background now: the download overlaps the tests before it. Each
    xdist worker starts one; a lock lets the first install and the other find it installed."""
    import tempfile

    from tests.browser import chromium

    wanted = any("chromium" in getattr(item, "fixturenames", ()) for item in items)
    if not wanted or chromium() or os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    log = Path(tempfile.mkdtemp(prefix="raylm-apt-")) / "chromium-install.log"
    install = "apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium"
    script = f"flock /tmp/raylm-chromium-install.lock bash -c 'command -v chromium || ({install})'"  # the machine's
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

    def build(folder: Path) -> None:
        summary = run_here(validate_dict(tiny_spec(folder / "run")))
        (folder / "returned.json").write_text(json.dumps(summary))

    folder = built_once(tmp_path_factory, "reference", build)
    return folder / "run", json.loads((folder / "returned.json").read_text())


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
    once failed so: "Address already in use", and the node never joined). Each pytest-xdist worker draws
    from its own share of the range, so that two cannot probe the same port before either binds it."""
    import random
    import socket

    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    ephemeral = int(ranges.read_text().split()[0]) if ranges.exists() else 32768
    low, high = 20000, ephemeral  # Ray's worker ports are 10002-19999 by default
    if worker := os.environ.get("PYTEST_XDIST_WORKER"):
        share = (high - low) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
        low += int(worker.removeprefix("gw")) * share
        high = low + share
    for _ in range(1000):
        port = random.randrange(low, high)
        if port in GIVEN_PORTS:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        GIVEN_PORTS.add(port)
        return port
    raise RuntimeError(f"no free port between {low} and {high}")


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

    def build(folder: Path) -> None:
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
        model.save_pretrained(folder / "model")
        tokenizer.save_pretrained(folder / "model")

    return built_once(tmp_path_factory, "base", build) / "model"


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder that `build(folder)` fills, made once per run. Under pytest-xdist every worker is a
    session of its own: the first worker to ask builds it in the run's shared temporary folder while the
    others wait on a lock, then they all read it (the pattern of xdist's docs)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # this run's, beside every worker's own
    folder = shared / name
    with FileLock(str(shared / f"{name}.lock")):
        if not (shared / f"{name}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed left
            folder.mkdir()
            build(folder)
            (shared / f"{name}.done").touch()
    return folder
