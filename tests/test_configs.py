"""Every file under jobs/ and cluster/ parses and validates (the litgpt `test_config_hub` habit)."""

from pathlib import Path

import pytest
import yaml

from raylm.kinds import preflight as check_job
from raylm.spec.loading import load_spec, validate_dict

pytestmark = pytest.mark.quick

ROOT = Path(__file__).resolve().parent.parent
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))
CLUSTER = sorted((ROOT / "cluster").glob("*.yaml"))


def test_there_are_examples():
    assert JOBS and CLUSTER


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_job_spec_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # example paths (a search's base file too) are relative to the checkout
    job = load_spec(path)
    if _workplace_data_missing(job):
        pytest.skip("this example reads ../shared/data/, which is not beside this checkout")
    if not _cluster_path(job) and not _after_another_example(job):
        assert check_job(job) == []
    assert path.read_text().lstrip().startswith("#"), "each example opens with a comment saying how to run it"


def _trained(job) -> list:
    """The specs of an example that name models and data: itself, a search's base, a pipeline's stages."""
    if job.kind == "pipeline":
        return [t for name in job.order for t in _trained(job.job(name))]
    return [job.base if job.kind == "tune" else job]


def _data_paths(job) -> list[str]:
    found = []
    for trained in _trained(job):
        data = getattr(trained, "data", None)  # a server reads no data
        found += data.paths if data is not None else []
    return found


def _model_paths(job) -> list[str]:
    """The models an example reads: its model (a distillation's teacher too), an evaluation's models."""
    found = []
    for trained in _trained(job):
        if trained.kind == "evaluate":
            found += [m.path or "" for m in trained.models]
        else:
            found += [
                trained.model.path or "",
                *([trained.teacher.path] if trained.kind == "distill" else []),
            ]
    return found


def _cluster_path(job) -> bool:
    """Examples for a cluster name paths on its shared storage (/shared/...) or in its bucket, absent here."""
    paths = [*_data_paths(job), *_model_paths(job), getattr(getattr(job, "output", None), "path", "")]
    return any(p.startswith(("/shared/", "s3://", "gs://")) for p in paths)


def _workplace_data_missing(job) -> bool:
    """Examples that train on the workplace's shared corpus (../shared/data/) beside the checkout."""
    return any(p.startswith("../shared/") and not (ROOT / p).exists() for p in _data_paths(job))


def _after_another_example(job) -> bool:
    """Fine-tuning, compression and evaluation examples (and searches, and pipelines whose first stage
    reads it) start from the quickstart's output (runs/...), made by running it first."""
    if job.kind == "pipeline":  # a model from outside the pipeline's own stages
        own = job.output.path.rstrip("/") + "/"
        return any(p.startswith("runs/") and not p.startswith(own) for p in _model_paths(job))
    return job.kind != "pretrain" and any(p.startswith("runs/") for p in _model_paths(job))


def _launcher(path: Path) -> bool:
    return any("provider" in doc for doc in yaml.safe_load_all(path.read_text()) if doc)


@pytest.mark.parametrize("path", [p for p in CLUSTER if _launcher(p)], ids=lambda p: p.name)
def test_cluster_launcher_config_passes_rays_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(config))
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all(
        "RAY_AUTH_MODE=token" in cmd for cmd in starts if cmd.strip().startswith(("ray start", "RAY_AUTH"))
    )
    # raylm is installed from the checkout that `ray up` syncs to every node
    assert config["file_mounts"] == {"~/raylm": "."}
    assert any("$HOME/raylm[" in cmd for cmd in config["setup_commands"])


def _containers(pod_template: dict) -> list:
    return pod_template["spec"]["containers"]


def _cluster_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "RayCluster":
        return [doc["spec"]]
    if doc["kind"] == "RayJob":
        return [doc["spec"]["rayClusterSpec"]]
    return []


@pytest.mark.parametrize("path", [p for p in CLUSTER if not _launcher(p)], ids=lambda p: p.name)
def test_kuberay_manifests(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert kinds & {"RayCluster", "RayJob"}
    config_maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    for doc in docs:
        assert doc["apiVersion"] in {"ray.io/v1", "v1"} and doc["metadata"]["name"]
        for cluster in _cluster_specs(doc):
            groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
            for group in groups:
                for container in _containers(group["template"]):
                    env = {e["name"]: e for e in container["env"]}
                    assert env["RAY_AUTH_MODE"]["value"] == "token"
                    assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
                    assert container["image"].split(":")[0].endswith("raylm")  # cluster/Dockerfile
        if doc["kind"] == "RayJob":
            entry = doc["spec"]["entrypoint"].split()
            assert entry[:2] == ["raylm", "run"]
            spec_path = Path(entry[2])
            head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
            mount = next(
                m
                for c in head["containers"]
                for m in c["volumeMounts"]
                if m["mountPath"] == str(spec_path.parent)
            )
            volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
            spec_text = config_maps[volume["configMap"]["name"]][spec_path.name]
            validate_dict(yaml.safe_load(spec_text), source=f"{path.name}:{spec_path}")


def test_no_config_installs_raylm_from_a_registry():
    """raylm is not published on a package registry: `pip install raylm` would install nothing, or
    somebody else's package. Every install of it names a path (the synced or copied checkout)."""
    import shlex

    for path in [*CLUSTER, ROOT / "cluster" / "Dockerfile"]:
        for line in path.read_text().replace("\\\n", " ").splitlines():
            if "pip install" not in line:
                continue
            command = line.split("pip install", 1)[1].split("&&")[0]
            for word in shlex.split(command):
                if "raylm" in word and not word.startswith("-"):
                    assert word.startswith(("/", "~", "$", ".")), f"{path.name}: {line.strip()}"


def test_dockerfile_builds_on_the_ray_image_the_manifests_name():
    """The KubeRay manifests' rayVersion is the Ray inside the image, which is Ray's own image of
    that version (the Dockerfile's base)."""
    import ray

    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    tag = next(
        line.split("=", 1)[1] for line in dockerfile.splitlines() if line.startswith("ARG RAY_IMAGE_TAG")
    )
    assert tag.startswith(ray.__version__ + "-")
    assert "FROM rayproject/ray:${RAY_IMAGE_TAG}" in dockerfile
    for path in [p for p in CLUSTER if not _launcher(p)]:
        for doc in yaml.safe_load_all(path.read_text()):
            for cluster in _cluster_specs(doc) if doc else []:
                assert cluster["rayVersion"] == ray.__version__
