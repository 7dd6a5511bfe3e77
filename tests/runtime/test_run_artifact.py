"""A raylm run folder given where a model is read leads to what the run produced, found inside the run,
or to a message saying why it cannot."""

import json
from pathlib import Path

import pytest

from raylm.runtime.storage import RunFolderError, run_artifact

pytestmark = pytest.mark.quick


def run_folder(root, summary, *folders):
    root.mkdir(parents=True)
    for name, marker in folders:
        (root / name).mkdir()
        (root / name / marker).write_text("{}")
    (root / "summary.json").write_text(summary if isinstance(summary, str) else json.dumps(summary))
    return root


def test_a_run_folder_leads_to_what_it_produced_inside_it(tmp_path, monkeypatch):
    # the summary names its model relative to where the run ran: another runs/x/model where the
    # command runs now must not be taken for it
    run = run_folder(tmp_path / "a" / "runs" / "x", {"model": "runs/x/model"}, ("model", "config.json"))
    elsewhere = tmp_path / "b"
    (elsewhere / "runs" / "x" / "model").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    assert run_artifact(run) == run / "model"
    assert run_artifact(run / "model") == run / "model"  # a model folder is itself

    lora = run_folder(
        tmp_path / "lora",
        {"artifact": str(tmp_path / "lora" / "adapter"), "merged": str(tmp_path / "lora" / "merged")},
        ("adapter", "adapter_config.json"),
        ("merged", "config.json"),
    )
    assert run_artifact(lora) == lora / "adapter"  # what serving and generation load
    assert run_artifact(lora, full_model=True) == lora / "merged"  # what training and compression read
    (lora / "merged" / "config.json").unlink()
    (lora / "merged").rmdir()
    with pytest.raises(RunFolderError, match="is an adapter, not a model that loads alone: give its merged"):
        run_artifact(lora, full_model=True)


def test_a_run_folder_that_leads_nowhere_is_named(tmp_path):
    # a quantization whose artifact is gone: its summary's `model` is its input, not what it produced
    gone = run_folder(
        tmp_path / "q", {"artifact": str(tmp_path / "q" / "m-q8_0.gguf"), "model": str(tmp_path)}
    )
    with pytest.raises(RunFolderError, match=r"m-q8_0.gguf\) is not there: give the artifact's folder"):
        run_artifact(gone)
    broken = run_folder(tmp_path / "broken", '{"kind": "pretrain", "model": ')
    with pytest.raises(
        RunFolderError, match="summary.json is not readable .*: is .*broken a finished raylm run"
    ):
        run_artifact(broken)
    listed = run_folder(tmp_path / "listed", "[1, 2]")
    with pytest.raises(RunFolderError, match="not a JSON object"):
        run_artifact(listed)


def test_a_run_folder_in_a_bucket_is_fetched_as_what_it_produced(object_store, tmp_path, monkeypatch):
    """The same choice for a run folder named by a storage URI: only what it produced is fetched."""
    from raylm.runtime.storage import fetch_artifact
    from tests.runtime.test_object_store import upload

    monkeypatch.setenv("RAYLM_CACHE", str(tmp_path / "cache"))
    bucket = object_store("run-folders")
    summary = {"artifact": "/elsewhere/lora/adapter", "merged": "/elsewhere/lora/merged"}
    lora = run_folder(
        tmp_path / "lora", summary, ("adapter", "adapter_config.json"), ("merged", "config.json")
    )
    upload(lora, f"{bucket}/lora")
    assert (Path(fetch_artifact(f"{bucket}/lora")) / "adapter_config.json").exists()
    assert (Path(fetch_artifact(f"{bucket}/lora", full_model=True)) / "config.json").exists()
    only = run_folder(tmp_path / "only", {"artifact": "adapter"}, ("adapter", "adapter_config.json"))
    upload(only, f"{bucket}/only")
    with pytest.raises(RunFolderError, match="is an adapter, not a model that loads alone"):
        fetch_artifact(f"{bucket}/only", full_model=True)
    broken = run_folder(tmp_path / "broken", "[1]")
    upload(broken, f"{bucket}/broken")
    with pytest.raises(RunFolderError, match="summary.json is not readable"):
        fetch_artifact(f"{bucket}/broken")


def test_a_file_where_a_model_folder_belongs_is_named(tmp_path):
    from raylm.runtime.preflight import check_model_folder

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    ((field, message),) = check_model_folder(str(tmp_path / "m.gguf"), "model.path", "config.json")
    assert field == "model.path" and "is a file, not a Hugging Face folder" in message


def test_a_search_folder_leads_to_its_best_trial(tmp_path):
    search = run_folder(
        tmp_path / "search",
        {"kind": "tune", "best": {"trial_id": "t1", "artifact": "runs/search/best"}},
        ("best", "adapter_config.json"),
    )
    assert run_artifact(search) == search / "best"  # served, evaluated, generated from as an adapter
    with pytest.raises(RunFolderError, match="is an adapter, not a model that loads alone"):
        run_artifact(search, full_model=True)
    empty = run_folder(tmp_path / "empty", {"kind": "tune", "best": None})
    with pytest.raises(RunFolderError, match="a search that finished without a completed trial"):
        run_artifact(empty)


def test_a_bucket_run_folder_falls_back_to_what_is_there(object_store, tmp_path, monkeypatch):
    """A run whose merged model was removed gives its artifact (as a local one does), and one whose
    named folders are all gone is named, not fetched as something else."""
    from raylm.runtime.storage import fetch_artifact
    from tests.runtime.test_object_store import upload

    monkeypatch.setenv("RAYLM_CACHE", str(tmp_path / "cache"))
    bucket = object_store("run-fallback")
    full = run_folder(tmp_path / "full", {"merged": "merged", "artifact": "model"}, ("model", "config.json"))
    upload(full, f"{bucket}/full")
    assert (Path(fetch_artifact(f"{bucket}/full", full_model=True)) / "config.json").exists()
    gone = run_folder(tmp_path / "gone", {"artifact": "adapter"})
    upload(gone, f"{bucket}/gone")
    with pytest.raises(RunFolderError, match=r"\(adapter\) is not there"):
        fetch_artifact(f"{bucket}/gone")


def test_a_serve_input_that_leads_nowhere_is_named_by_its_own_field(tmp_path):
    from raylm.kinds import preflight
    from raylm.spec.loading import validate_dict

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    broken = run_folder(tmp_path / "poet", "[1]")
    search = run_folder(tmp_path / "search", {"kind": "tune", "best": None})
    job = validate_dict(
        {"kind": "serve", "model": str(model), "adapters": {"poet": str(broken), "best": str(search)}}
    )
    problems = dict(preflight(job))
    assert "summary.json is not readable" in problems["adapters.poet"]
    assert "without a completed trial" in problems["adapters.best"]
    assert "model.path" not in problems
