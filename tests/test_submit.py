"""Submission: the loopback / token-auth guard, and the Ray Jobs API path against a real two-node
cluster (`ray start --head` on loopback plus a second `ray start --address` node)."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import yaml

from raylm.runtime.cluster import SubmitError, check_address, is_loopback
from tests.conftest import free_port, tiny_spec


@pytest.mark.quick
def test_loopback_detection():
    assert (
        is_loopback("http://127.0.0.1:8265")
        and is_loopback("localhost:8265")
        and is_loopback("http://[::1]:8265")
    )
    assert not is_loopback("http://10.1.2.3:8265") and not is_loopback("http://203.0.113.7:8265")


@pytest.mark.quick
def test_non_loopback_refused_without_token(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(SubmitError) as info:
        check_address("http://10.1.2.3:8265")
    assert "RAY_AUTH_MODE=token" in str(info.value)


@pytest.mark.quick
def test_non_loopback_allowed_with_token(monkeypatch, tmp_path):
    token = tmp_path / "token"
    token.write_text(uuid.uuid4().hex)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    assert check_address("10.1.2.3:8265") == "http://10.1.2.3:8265"
    token.write_text("")
    with pytest.raises(SubmitError):
        check_address("10.1.2.3:8265")


@pytest.mark.quick
def test_ray_client_address_is_refused():
    with pytest.raises(SubmitError) as info:
        check_address("ray://127.0.0.1:10001")
    assert "8265" in str(info.value)


AGENT_PORT_FLAGS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)


SECOND_NODE: dict = {}  # the second node's `ray start --block` process (the node-loss test kills it)


@pytest.fixture(scope="module")
def two_node_cluster(object_store):
    """A token-authenticated head on loopback and a second node joined to it, each 2 CPUs, each with
    temp and cache folders of its own (as separate machines would have), both reaching the session's
    S3-compatible server (object_store: AWS_ENDPOINT_URL and credentials in their environment)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex)
    env["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.5"  # Ray Train's drain watcher (default 5 s)
    # A lost node is declared dead after ~2 s instead of Ray's ~15 s (health checks every 1 s, 2 misses)
    # and a worker group that cannot be placed gives up after 15 s instead of 60: when the node-loss
    # test kills a node, Ray Train retries at once with the 2 workers the dead node still seemed to
    # offer, waits for them, then settles on 1 (on a real cluster the same happens, slower).
    env.update(
        RAY_health_check_period_ms="1000",
        RAY_health_check_timeout_ms="1000",
        RAY_health_check_failure_threshold="2",
        RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="15",
    )
    gcs, dashboard = free_port(), free_port()
    # Each node gets its own temp dir: nodes sharing one would garbage-collect each other's job files.
    # A short path: the sockets Ray makes in it must fit AF_UNIX's 107 bytes, which a pytest-xdist worker's
    # basetemp (/tmp/pytest-of-root/pytest-N/popen-gw0/ray0/session_<date>_<pid>/sockets/...) overran.
    temp = [Path(tempfile.mkdtemp(prefix="rl-node-", dir="/tmp")) for _ in range(2)]

    def start_node(*args: str, temp) -> subprocess.Popen:
        """`ray start --block` in its own session: SIGTERM stops the node's processes with it. The
        node's processes get its own TMPDIR (raylm's staging folders) and RAYLM_CACHE (fetched inputs)."""
        (temp / "tmp").mkdir(exist_ok=True)
        node_env = {**env, "TMPDIR": str(temp / "tmp"), "RAYLM_CACHE": str(temp / "cache")}
        # Every agent port is free-picked: the session's own local Ray may hold the default ones,
        # and a head whose job agent cannot bind answers "No available agent" forever.
        agent_ports = [f"--{flag}={free_port()}" for flag in AGENT_PORT_FLAGS]
        flags = [
            *agent_ports,
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp}",
            "--num-cpus=2",
            "--object-store-memory=300000000",
            "--block",
        ]
        return subprocess.Popen(
            ["ray", "start", *args, *flags, "--disable-usage-stats"],
            env=node_env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    procs = [
        start_node(
            "--head",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            f"--ray-client-server-port={free_port()}",  # not 10001: another head may be on this machine
            temp=temp[0],
        )
    ]
    try:
        wait_for(lambda: _ready(f"http://127.0.0.1:{dashboard}", env, nodes=1), "head node")
        procs.append(start_node(f"--address=127.0.0.1:{gcs}", temp=temp[1]))
        SECOND_NODE.update(process=procs[1], gcs=f"127.0.0.1:{gcs}", caches=[t / "cache" for t in temp])
        wait_for(lambda: _ready(f"http://127.0.0.1:{dashboard}", env, nodes=2), "second node")
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        for proc in reversed(procs):  # `ray start --block` stops its node's processes on SIGTERM
            if proc.poll() is None:  # (the node-loss test kills the second node itself)
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5  # both nodes stop at once
        for proc in procs:
            try:  # a graceful stop with a server deployed takes ~30 s; the test needs nothing of it
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for folder in temp:
            shutil.rmtree(folder, ignore_errors=True)


def _ready(url: str, env: dict, nodes: int) -> bool:
    code = (
        "import json,sys,urllib.request as u\n"
        "from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled as h\n"
        f"r=u.Request('{url}/nodes?view=summary', headers=h({{}}))\n"
        "d=json.load(u.urlopen(r, timeout=5))\n"
        "alive=[n for n in d['data']['summary'] if n['raylet']['state']=='ALIVE']\n"
        f"sys.exit(0 if len(alive)>={nodes} else 1)\n"
    )
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0


def worker_node_id(url: str, env: dict) -> str:
    """The id of the alive node that is not the head."""
    code = (
        "import json,urllib.request as u\n"
        "from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled as h\n"
        f"r=u.Request('{url}/nodes?view=summary', headers=h({{}}))\n"
        "d=json.load(u.urlopen(r, timeout=5))\n"
        "print([n['raylet']['nodeId'] for n in d['data']['summary'] if n['raylet']['state']=='ALIVE' "
        "and not n['raylet'].get('isHeadNode')][0])\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def wait_for(check, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1)
    raise TimeoutError(f"{what} did not come up in {timeout}s")


def raylm(*args, env, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raylm", *args], env=env, cwd=cwd, capture_output=True, text=True
    )


@pytest.mark.cluster
def test_a_search_submitted_to_the_cluster_runs_its_trials_there(
    two_node_cluster, object_store, sft_base, tmp_path
):
    """kind: tune through the Jobs API on two nodes that share no disk, its base model, its data and its
    output in the bucket: the spec (its base inline) is validated on the cluster, two trials run at once on the
    two 2-CPU nodes (half a CPU for each trial's process, one worker of one CPU), each node fetches the
    base into its own cache, and the job follows to the end with the table, all of it in the bucket. The
    search is a grid over methods, each with its own searched field (LoRA's rank, prompt tuning's length):
    each trial's row holds its method's field and not the other's."""
    from raylm.data.tasks import generate
    from raylm.runtime import storage
    from tests.runtime.test_object_store import bucket_files, read_bytes, upload

    address, env = two_node_cluster
    bucket = object_store("cluster-search")
    upload(sft_base, f"{bucket}/base")
    rows = "".join(json.dumps(row) + "\n" for row in generate("arithmetic", 200, 0))
    storage.write_text(f"{bucket}/data", "sft.jsonl", rows)
    output = f"{bucket}/search"
    spec = {
        "kind": "tune",
        "base": {
            "model": {"path": f"{bucket}/base"},
            "method": "lora",
            "data": {"path": f"{bucket}/data/sft.jsonl", "seq_len": 24},
            "train": {
                "max_steps": 10,
                "batch_size": 8,
                "eval_every": 5,
                "log_every": 5,
                "checkpoint_every": 10,
            },
            "eval": {"exact_match_examples": 0},
        },
        "search": {
            "method": {
                "grid": [
                    {"name": "lora", "r": {"choice": [4, 8]}},
                    {"name": "prompt", "num_virtual_tokens": {"choice": [4, 8]}},
                ]
            }
        },
        "scheduler": {"name": "none"},
        "output": output,
    }
    spec_file = tmp_path / "tune.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    done = raylm("run", str(spec_file), "--address", address, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "2 trial(s) at once" in done.stdout and "done: search search (2 completed)" in done.stdout
    # the job's processes know their cluster beside the test sessions' Rays (Ray Train's cleaner)
    assert "Found multiple active Ray instances" not in done.stdout + done.stderr
    files = bucket_files(output)
    trials = sorted(
        name.split("/")[1] for name in files if name.startswith("trials/") and name.endswith("/summary.json")
    )
    summaries = [json.loads(read_bytes(f"{output}/trials/{t}", "summary.json")) for t in trials]
    assert len(summaries) == 2 and all(s["steps"] == 10 for s in summaries)
    # two trials at once need 3 CPUs (2 x (0.5 + 1)): the nodes' 2 + 2 are both in use
    assert {"summary.json", "trials.parquet", "best/adapter_config.json"} <= set(files)
    rows = pq.read_table(io.BytesIO(read_bytes(output, "trials.parquet"))).to_pylist()
    assert sorted(r["method"] for r in rows) == ["lora", "prompt"]
    for row in rows:
        if row["method"] == "lora":
            assert row["method.r"] in (4, 8) and row["method.num_virtual_tokens"] is None
        else:
            assert row["method.num_virtual_tokens"] in (4, 8) and row["method.r"] is None
    # each node fetched the base from the bucket into its own cache
    assert all(any((cache / "objects").iterdir()) for cache in SECOND_NODE["caches"])


@pytest.mark.cluster
def test_a_quantize_job_submitted_to_the_cluster_reads_and_writes_the_bucket(
    two_node_cluster, object_store, sft_base, tmp_path
):
    """kind: quantize through the Jobs API: the task fetches the model from the bucket on its node and
    uploads the GGUF file, spec.yaml and summary.json (last) to the bucket."""
    from tests.runtime.test_object_store import bucket_files, read_bytes, upload

    address, env = two_node_cluster
    bucket = object_store("cluster-quantize")
    upload(sft_base, f"{bucket}/base")
    spec = {
        "kind": "quantize",
        "model": {"path": f"{bucket}/base"},
        "method": {"name": "gguf", "type": "q8_0"},
        "data": {"generate": {"documents": 200}, "seq_len": 32},  # held-out text (a fetched model has no run)
        "measure": {"perplexity_blocks": 8, "prompts": 2},
        "output": f"{bucket}/q8_0",
    }
    spec_file = tmp_path / "quantize.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    done = raylm("run", str(spec_file), "--address", address, env=env)
    assert done.returncode == 0 and "SUCCEEDED" in done.stdout, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads(read_bytes(f"{bucket}/q8_0", "summary.json"))
    assert summary["model"] == f"{bucket}/base" and summary["artifact"].startswith(f"{bucket}/q8_0/")
    artifact = summary["artifact"].rsplit("/", 1)[1]
    assert set(bucket_files(f"{bucket}/q8_0")) == {"spec.yaml", "summary.json", artifact}
    assert read_bytes(f"{bucket}/q8_0", artifact)[:4] == b"GGUF"


@pytest.mark.cluster
def test_workers_the_cluster_cannot_hold_stop_the_job_with_what_to_change(two_node_cluster, tmp_path):
    """3 workers of 2 CPUs on two 2-CPU nodes would wait forever, and a local output path on this 2-node
    cluster would be written where no one reads it (each node has a disk of its own unless the spec says
    they share one): the job stops before any work and names both problems, with what to change."""
    address, env = two_node_cluster
    spec_file = tmp_path / "spec.yaml"
    spec = tiny_spec(tmp_path / "run", resources={"num_workers": 3, "cpus_per_worker": 2})
    spec_file.write_text(yaml.safe_dump(spec))
    done = raylm("run", str(spec_file), "--address", address, env=env)
    assert done.returncode == 1 and "FAILED" in done.stdout
    assert "hold 2 of the 3 training workers of 2 CPU each" in done.stdout
    assert "lower resources.num_workers" in done.stdout
    assert "is a local path, and this cluster has 2 nodes" in done.stdout
    assert "use a storage URI" in done.stdout and "resources.shared_filesystem: true" in done.stdout
    assert "Traceback" not in done.stdout and not (tmp_path / "run" / "data-cache").exists()


@pytest.mark.cluster
def test_wrong_token_is_a_clear_error(two_node_cluster, tmp_path):
    address, env = two_node_cluster
    bad = dict(env, RAY_AUTH_TOKEN="not-the-token")
    listed = raylm("jobs", "list", "--address", address, env=bad)
    assert listed.returncode == 2 and "Traceback" not in listed.stderr
    assert "token" in listed.stderr.lower()


@pytest.mark.quick
def test_hf_token_never_travels_with_the_job(monkeypatch, tmp_path):
    """The Jobs API shows a job's runtime environment to anyone who can list jobs: HF_TOKEN stays in
    the submitting shell (the cluster's nodes hold their own)."""
    from pathlib import Path

    from raylm.spec.loading import validate_dict
    from raylm.submit import job_environment

    secret = "hf_" + uuid.uuid4().hex
    monkeypatch.setenv("HF_TOKEN", secret)
    with job_environment(validate_dict(tiny_spec(tmp_path / "run"))) as env:
        assert secret not in str(env["env_vars"]) and "HF_TOKEN" not in env["env_vars"]
        written = [p.read_text() for p in Path(env["working_dir"]).rglob("*") if p.is_file()]
        assert written and not any(secret in text for text in written)  # not in the spec the job reads
    assert not Path(env["working_dir"]).exists()  # a submission leaves no folder behind


@pytest.mark.cluster
def test_a_server_deployed_through_the_jobs_api_stays_up_and_needs_the_key(
    two_node_cluster, object_store, reference_run, tmp_path
):
    """A pipeline whose serve stage deploys through the Jobs API (--address): the job deploys and
    returns, its lineage in the bucket; the server answers on the head with the key from the submitting
    shell, which reaches the cluster only as its digest (also from a pipeline's serve stage)."""
    from tests.runtime.test_object_store import read_bytes

    address, env = two_node_cluster
    port = free_port()
    spec_file = tmp_path / "serve.yaml"
    root = object_store("served-pipeline") + "/p"
    server = {
        "kind": "serve",
        "name": "tiny",
        "model": str(reference_run[0] / "model"),
        "http": {"port": port},
        "scaling": {"cpus_per_replica": 0.5},
    }
    spec = {"kind": "pipeline", "output": root, "stages": {"serve": server}}
    spec_file.write_text(yaml.safe_dump(spec))
    key = uuid.uuid4().hex
    done = raylm("run", str(spec_file), "--address", address, env={**env, "RAYLM_API_KEY": key})
    assert done.returncode == 0 and "1 stage(s) ran" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert "serving tiny at" in done.stdout and "Ctrl-C" not in done.stdout  # deployed, and returned
    assert json.loads(read_bytes(root, "lineage.json"))["stages"]["serve"]["status"] == "complete"
    try:
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"model": "tiny", "prompt": "the cat", "max_tokens": 5}
        assert httpx.post(url, json=body, timeout=30).status_code == 401
        answer = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 5
        job_id = done.stdout.split("submitted ", 1)[1].split()[0]
        code = (
            "import json\nfrom ray.job_submission import JobSubmissionClient as C\n"
            f"print(json.dumps(C({address!r}).get_job_info({job_id!r}).runtime_env))"
        )
        runtime_env = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert "RAYLM_API_KEY_SHA256" in runtime_env.stdout, runtime_env.stderr[-2000:]
        # the job's processes start collecting garbage rarely (raylm.runtime.startup_gc)
        assert '"worker_process_setup_hook": "raylm.runtime.startup_gc.during_startup"' in runtime_env.stdout
        assert key not in runtime_env.stdout and key not in done.stdout
    finally:
        subprocess.run(["serve", "shutdown", "-y", "-a", address], env=env, capture_output=True)


# Last in the module: it takes the second node away.
@pytest.mark.cluster
def test_a_node_reclaimed_with_notice_costs_no_step_and_the_run_finishes_on_the_other(
    two_node_cluster, object_store, tmp_path
):
    """A 2-worker run through the Jobs API, one worker per node (each takes a node's 2 CPUs), its
    output in the bucket, elastic (num_workers: [1, 2]). After its step-50 checkpoint the second node
    is reclaimed the way a spot fleet does it: first a drain notice with a deadline (`ray drain-node
    --reason DRAIN_NODE_REASON_PREEMPTION`, what KubeRay and Ray's autoscaler send), on which every rank
    saves a checkpoint at once (off the 50-step grid) and trains on; then the node is lost (its raylet
    and workers SIGKILLed). Ray Train restarts the run on the one worker that still fits, from that
    checkpoint in the bucket, and it finishes. Then the job commands (list, status, logs, stop, an
    unknown id)."""
    from raylm.runtime import storage
    from tests.runtime.test_object_store import bucket_files, read_bytes

    address, env = two_node_cluster
    output = object_store("node-loss") + "/run"
    spec = tiny_spec(
        output,
        resources={"num_workers": [1, 2], "cpus_per_worker": 2, "placement": "strict_spread"},
        train={
            "max_steps": 400,
            "eval_every": 100,
            "checkpoint_every": 50,
            "log_every": 50,
            "keep_checkpoints": 10,
        },
        failure={"max_failures": 1},
    )
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    job = subprocess.Popen(
        [sys.executable, "-m", "raylm", "run", str(spec_file), "--address", address],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def checkpoints() -> set[int]:
        snapshot = storage.read_text(f"{output}/checkpoints", "checkpoint_manager_snapshot.json") or ""
        return {int(m) for m in re.findall(r"checkpoint_(\d{8})", snapshot)}

    try:
        wait_for(lambda: 50 in checkpoints() or job.poll() is not None, "the step-50 checkpoint", timeout=300)
        assert job.poll() is None, job.stdout.read()[-4000:]
        drain = subprocess.run(
            [
                "ray",
                "drain-node",
                f"--address={SECOND_NODE['gcs']}",
                f"--node-id={worker_node_id(address, env)}",
                "--reason=DRAIN_NODE_REASON_PREEMPTION",
                "--reason-message=spot reclaim (test)",
                "--deadline-remaining-seconds=20",  # Ray Train restarts at the deadline at the latest
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        assert drain.returncode == 0, drain.stdout + drain.stderr
        wait_for(
            lambda: any(s % 50 for s in checkpoints()) or job.poll() is not None, "the drain checkpoint", 120
        )
        (notice,) = [s for s in checkpoints() if s % 50]
        second = SECOND_NODE["process"]
        os.killpg(second.pid, signal.SIGKILL)  # the node's raylet, its agents and its workers
        second.wait()
        out, _ = job.communicate(timeout=400)
    finally:
        if job.poll() is None:
            job.kill()
    (tmp_path / "job.log").write_text(out)
    assert job.returncode == 0 and "SUCCEEDED" in out, out[-4000:]
    assert "Found multiple active Ray instances" not in out  # Ray Train's cleaner found its cluster
    assert "2 worker(s) on 2 node(s)" in out and "1 worker(s) on 1 node(s)" in out  # before and after
    summary = json.loads(read_bytes(output, "summary.json"))
    assert summary["steps"] == 400 and summary["resumed_from"] >= notice  # restarted from the bucket
    assert len(summary["worker_nodes"]) == 1  # the last attempt: the node that was left
    files = bucket_files(output)
    assert {"model/model.safetensors", "model/tokenizer.json", "spec.yaml", "strategy.json"} <= set(files)
    # both nodes wrote their parts of the 2-worker checkpoints; the restarted worker its own alone
    assert f"checkpoints/checkpoint_{notice:08d}/MANIFEST.rank1.json" in files
    assert "checkpoints/checkpoint_00000400/MANIFEST.rank1.json" not in files
    steps = [json.loads(line)["step"] for line in read_bytes(output, "metrics.jsonl").decode().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 400  # replayed steps logged once

    job_id = out.split("submitted ", 1)[1].split()[0]
    listed = raylm("jobs", "list", "--address", address, env=env)
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    status = raylm("jobs", "status", job_id, "--address", address, env=env)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    logs = raylm("jobs", "logs", job_id, "--address", address, env=env)
    assert "[raylm] done" in logs.stdout
    stop = raylm("jobs", "stop", job_id, "--address", address, env=env)
    assert stop.returncode == 0 and "not running" in stop.stdout
    unknown = raylm("jobs", "status", "no-such-job", "--address", address, env=env)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr


@pytest.mark.quick
def test_a_job_driver_passes_its_cluster_address_to_the_jobs_processes(monkeypatch):
    """Inside a Ray job the driver's RAY_ADDRESS (the GCS address the Jobs API gives it) goes to the job's
    processes; not outside a job, not a non-address, not where the job's own environment sets it."""
    from raylm.runtime.cluster import address_for_the_job

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert address_for_the_job("127.0.0.1:6379") is None  # set by hand: may be loopback on a cluster
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}, "metadata": {}}))
    assert address_for_the_job("10.0.0.5:6379") == {"env_vars": {"RAY_ADDRESS": "10.0.0.5:6379"}}
    assert address_for_the_job("auto") is None and address_for_the_job("ray://10.0.0.5:10001") is None
    job = {"runtime_env": {"env_vars": {"RAY_ADDRESS": "10.0.0.5:6379"}}, "metadata": {}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert address_for_the_job("10.0.0.5:6379") is None  # Ray would refuse the key twice
