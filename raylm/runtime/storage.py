"""Run outputs on a local/shared path or a storage URI (s3://, gs://, file://) through pyarrow.fs.

Local folders are replaced atomically: a new model folder is written beside the old one and swapped
in with renames, so a failure while exporting never leaves a half-written `model/`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path

from raylm.methods.unimported import save_pretrained


def is_uri(path: str) -> bool:
    return "://" in path


def stage_dir(output: str) -> Path:
    """Where rank 0 writes run files: the run folder itself, or a local folder mirrored to a URI."""
    if is_uri(output):
        return Path(tempfile.mkdtemp(prefix="raylm-stage-"))
    return Path(output)


def replace_dir(source: Path, target: Path) -> None:
    """Move `source` to `target`, swapping out an existing `target` with renames (same filesystem)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    incoming = target.with_name(f".{target.name}.incoming-{uuid.uuid4().hex[:8]}")
    shutil.move(str(source), str(incoming))
    retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        target.rename(retired)
    incoming.rename(target)
    shutil.rmtree(retired, ignore_errors=True)


def publish_files(stage: Path, uri: str, names: list[str]) -> None:
    """Copy files or folders `names` of `stage` to the same names under `uri`."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    for name in names:
        source = stage / name
        if not source.exists():
            continue
        if source.is_dir():
            fs.create_dir(f"{root}/{name}", recursive=True)
            pafs.copy_files(
                str(source),
                f"{root}/{name}",
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=fs,
            )
        else:
            write_bytes(uri, name, source.read_bytes())


def write_text(output: str, name: str, text: str) -> None:
    """Write file `name` into the run at `output` (a folder or a URI)."""
    write_bytes(output, name, text.encode())


def write_bytes(output: str, name: str, data: bytes) -> None:
    """Write `data` as file `name` into the run at `output` (a folder or a URI)."""
    if not is_uri(output):
        Path(output).mkdir(parents=True, exist_ok=True)
        Path(output, name).write_bytes(data)
        return
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(output)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{name}") as out:
        out.write(data)


def read_text(output: str, name: str) -> str | None:
    """File `name` of the run at `output` (a folder or a URI), or None when it is not there."""
    if not is_uri(output):
        path = Path(output, name)
        return path.read_text() if path.is_file() else None
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(output)
    if fs.get_file_info(f"{root}/{name}").type != pafs.FileType.File:
        return None
    with fs.open_input_stream(f"{root}/{name}") as source:
        return source.read().decode()


def exists(output: str, name: str) -> bool:
    """Whether the run at `output` (a folder or a URI) has a file or folder `name`."""
    if not is_uri(output):
        return Path(output, name).exists()
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(output)
    return fs.get_file_info(f"{root}/{name}").type != pafs.FileType.NotFound


def remove(output: str, name: str) -> None:
    """Delete file `name` of the run at `output` (a folder or a URI), if it is there."""
    if not is_uri(output):
        Path(output, name).unlink(missing_ok=True)
        return
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(output)
    if fs.get_file_info(f"{root}/{name}").type == pafs.FileType.File:
        fs.delete_file(f"{root}/{name}")


def _entries(output: str) -> list[tuple[str, bool]]:
    """(name, is a folder) of what lies directly under `output` (a folder or a URI); [] when missing."""
    if not is_uri(output):
        folder = Path(output)
        return [(p.name, p.is_dir()) for p in folder.iterdir()] if folder.is_dir() else []
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(output)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return [(i.base_name, i.type == pafs.FileType.Directory) for i in infos]


def listing(output: str) -> list[str]:
    """The names of the files and folders directly under `output` (a folder or a URI); [] when missing."""
    return sorted(name for name, _ in _entries(output))


def subfolders(output: str) -> list[str]:
    """The names of the folders directly under `output` (a folder or a URI); [] when it is missing."""
    return sorted(name for name, folder in _entries(output) if folder)


def copy_dir(source: str, target: str) -> None:
    """Copy the folder `source` to `target` (each a local path or a URI), replacing what `target` held:
    for a local target atomically (renames); in object storage the caller publishes a marker after it."""
    import pyarrow.fs as pafs

    if not is_uri(target):
        scratch = Path(tempfile.mkdtemp(prefix=".incoming-", dir=Path(target).parent))
        if is_uri(source):
            source_fs, source_root = pafs.FileSystem.from_uri(source)
            pafs.copy_files(source_root, str(scratch / "copy"), source_filesystem=source_fs)
        else:
            shutil.copytree(source, scratch / "copy")
        replace_dir(scratch / "copy", Path(target))
        shutil.rmtree(scratch, ignore_errors=True)
        return
    target_fs, target_root = pafs.FileSystem.from_uri(target)
    source_fs, source_root = (
        pafs.FileSystem.from_uri(source) if is_uri(source) else (pafs.LocalFileSystem(), source)
    )
    target_fs.delete_dir_contents(target_root, missing_dir_ok=True)
    target_fs.create_dir(target_root, recursive=True)
    pafs.copy_files(source_root, target_root, source_filesystem=source_fs, destination_filesystem=target_fs)


def move_dir(source: str, target: str) -> None:
    """Move the folder `source` to `target` (a new name beside it): a rename for a local folder; in
    object storage a copy and then the deletion of `source`."""
    if not is_uri(source):
        Path(source).rename(target)
        return
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(source)
    _, target_root = pafs.FileSystem.from_uri(target)
    fs.create_dir(target_root, recursive=True)
    pafs.copy_files(root, target_root, source_filesystem=fs, destination_filesystem=fs)
    fs.delete_dir(root)


def fetch_file(output: str, name: str, into: Path) -> None:
    """Copy file `name` of the run at URI `output` into folder `into`, if it exists there."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(output)
    if fs.get_file_info(f"{root}/{name}").type == pafs.FileType.File:
        with fs.open_input_stream(f"{root}/{name}") as source:
            (into / name).write_bytes(source.read())


def export_dir(stage: Path, name: str, write, publish_to: str | None) -> None:
    """Write a final artifact folder `name/` of the run with `write(folder)`, swapped in atomically
    (a failure leaves the previous one), and publish it beside the metrics when the run is a URI."""
    scratch = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=stage))
    write(scratch)
    replace_dir(scratch, stage / name)
    if publish_to:
        publish_files(stage, publish_to, [name, "metrics.jsonl", "tensorboard"])


def export_model(model, tokenizer, stage: Path, publish_to: str | None) -> None:
    """Save `model` and `tokenizer` as a Hugging Face folder `model/` (safetensors) in the run."""

    def write(folder: Path) -> None:
        save_pretrained(model, folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    export_dir(stage, "model", write, publish_to)


def fingerprint(path: str) -> str | None:
    """A cheap fingerprint of a file or folder (local or a storage URI): every file's name, size and
    modification time; None where nothing is there."""
    import hashlib
    import json

    entries: list[tuple[str, int, int]] = []
    if is_uri(path):
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(path)
        info = fs.get_file_info(root)
        infos = (
            [info]
            if info.type == pafs.FileType.File
            else (
                fs.get_file_info(pafs.FileSelector(root, recursive=True))
                if info.type == pafs.FileType.Directory
                else []
            )
        )
        entries = [
            (i.path, i.size or 0, int(i.mtime.timestamp() * 1e9) if i.mtime else 0)
            for i in infos
            if i.type == pafs.FileType.File
        ]
    else:
        local = Path(path).expanduser()
        files = (
            [local]
            if local.is_file()
            else sorted(p for p in local.rglob("*") if p.is_file())
            if local.is_dir()
            else []
        )
        entries = [
            (str(f.relative_to(local)) if f != local else f.name, f.stat().st_size, f.stat().st_mtime_ns)
            for f in files
        ]
    if not entries:
        return None
    return hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()


def cache_root() -> Path:
    """raylm's local cache on this node ($RAYLM_CACHE, else ~/.cache/raylm)."""
    import os

    return Path(os.environ.get("RAYLM_CACHE", "~/.cache/raylm")).expanduser()


def localize(path: str) -> str:
    """A model, tokenizer or adapter folder (or one file) at a storage URI as a path on this node:
    downloaded once into raylm's cache under a key of the objects' identity (the URI and every
    object's path, size and modification time), so that a changed object is fetched again and an
    unchanged one never twice. Written to a scratch folder and renamed into place, so a reader never
    sees a partial copy. A local path comes back as it is."""
    import hashlib
    import json

    import pyarrow.fs as pafs

    if not is_uri(path):
        return path
    fs, root = pafs.FileSystem.from_uri(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        entries, base = [info], root.rsplit("/", 1)[0]
    elif info.type == pafs.FileType.Directory:
        entries = [
            i
            for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if i.type == pafs.FileType.File
        ]
        base = root
    else:
        raise FileNotFoundError(f"{path}: no such object or folder in the store")
    identity = [(i.path[len(base) + 1 :], i.size, i.mtime_ns) for i in entries]
    key = hashlib.sha256(json.dumps([path, identity]).encode()).hexdigest()[:24]
    target = cache_root() / "objects" / key
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
        for entry, (relative, _, _) in zip(entries, identity, strict=True):
            destination = scratch / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(entry.path) as source, open(destination, "wb") as out:
                shutil.copyfileobj(source, out)
        try:
            scratch.rename(target)
        except OSError:  # another process of this node fetched it first
            shutil.rmtree(scratch, ignore_errors=True)
    return str(target / identity[0][0]) if info.type == pafs.FileType.File else str(target)


class RunFolderError(ValueError):
    """A raylm run folder that does not lead to what it produced; the message says why and what to give."""


def run_artifact(path: Path, full_model: bool = False) -> Path:
    """A raylm run folder -> what it produced: a fine-tuning run's adapter or model, a quantization's
    artifact, a pruning's folder, a pretraining run's model/ (anything else: `path` itself). The folders
    its summary.json names are looked for inside the run (the summary may name them relative to where it
    ran). `full_model`: a model that loads alone, so a fine-tuning run's merged/ rather than its
    adapter. RunFolderError where the run's summary or what it names cannot be used."""
    summary_file = path / "summary.json"
    if not path.is_dir() or (path / "config.json").exists() or not summary_file.exists():
        return path
    try:
        summary = summary_file.read_text()
    except (OSError, ValueError) as err:  # unreadable, not UTF-8
        raise _unreadable(path, err) from None
    named = _produced(summary, full_model, path)
    for found in named:
        inside, named_path = path / Path(found).name, Path(found)
        if inside.exists() and inside != path:
            option = inside
        elif named_path.is_absolute() and named_path.exists():
            option = named_path
        else:
            continue
        if full_model and (option / "adapter_config.json").exists():
            raise _adapter_only(path, option)
        return option
    raise _nowhere(path, named)


def _produced(summary: str, full_model: bool, run) -> list[str]:
    """The names a run's summary.json gives what it produced, the first choice first (a compression
    run's `model` is its input: only a run without an artifact produced `model`; a search produced its
    best trial's artifact, `best/`). RunFolderError where the summary is not a run's record."""
    try:
        record = json.loads(summary)
    except ValueError as err:
        raise _unreadable(run, err) from None
    if not isinstance(record, dict):
        raise _unreadable(run, "not a JSON object")
    if record.get("kind") == "tune":
        best = record.get("best")
        if not isinstance(best, dict) or not isinstance(best.get("artifact"), str):
            raise RunFolderError(
                f"{run} is a search that finished without a completed trial: it has no model"
            )
        return [best["artifact"]]
    keys = ["merged", "artifact"] if full_model else ["artifact"]
    named = [record[k] for k in keys if isinstance(record.get(k), str)]
    return named or ([record["model"]] if isinstance(record.get("model"), str) else ["model"])


def _unreadable(run, why) -> RunFolderError:
    return RunFolderError(
        f"{str(run).rstrip('/')}/summary.json is not readable ({why}): is {run} a finished raylm run?"
    )


def _nowhere(run, named: list[str]) -> RunFolderError:
    return RunFolderError(
        f"{run} is a raylm run folder, but what its summary.json names ({', '.join(map(str, named))}) is "
        "not there: give the artifact's folder itself"
    )


def _adapter_only(run, adapter) -> RunFolderError:
    return RunFolderError(
        f"{run} is a fine-tuning run whose artifact {adapter} is an adapter, not a model that loads alone: "
        f"give its merged model ({str(run).rstrip('/')}/merged, written with output.merge: true or "
        f"`raylm merge {adapter} --out ...`) or its base"
    )


def fetch_artifact(path: str | None, full_model: bool = False) -> str | None:
    """A model, adapter or GGUF file, or a raylm run folder, named by a storage URI -> this node's copy
    of what it holds (a run folder's artifact, not its checkpoints; `full_model` as for run_artifact);
    a local path as it is."""
    if path is None or not is_uri(path):
        return path
    if read_text(path, "config.json") is None and read_text(path, "adapter_config.json") is None:
        summary = read_text(path, "summary.json")
        if summary is not None:  # a run folder: what it produced, by name inside the run
            named = _produced(summary, full_model, path)
            run = path
            inside = [name for name in (Path(str(n)).name for n in named) if name and exists(run, name)]
            if not inside:
                raise _nowhere(run, named)
            path = f"{run.rstrip('/')}/{inside[0]}"
            if full_model and read_text(path, "adapter_config.json") is not None:
                raise _adapter_only(run, path)
    return localize(path)


def _path_sections(job):
    """(field name, section) of the job's sections whose `path` names an input (job.path_sections)."""
    wanted = [id(section) for section in getattr(job, "path_sections", ())]
    return [(name, getattr(job, name)) for name in type(job).model_fields if id(getattr(job, name)) in wanted]


def read_run_folders(job) -> list[tuple[str, str]]:
    """Point the job's model / tokenizer / teacher sections that name a local raylm run folder at what
    the run produced (`run_artifact`: a model that loads alone for the model and teacher). Returns
    (field, problem) pairs for run folders that lead nowhere."""
    problems = []
    for name, section in _path_sections(job):
        if not section.path or is_uri(section.path) or section._source is not None:
            continue
        folder = Path(section.path).expanduser()
        try:
            found = run_artifact(folder, full_model=name != "tokenizer")
        except RunFolderError as err:
            problems.append((f"{name}.path", str(err)))
            continue
        if found != folder:
            section.path = str(found)
    return problems


def localize_inputs(job) -> list[tuple[str, str]]:
    """Point the job's model / tokenizer / teacher sections that name a storage URI at their copies
    on this node (see `localize`), remembering the URI: a worker on another node calls this again and
    fetches its own copy, and the run's spec record keeps the URI. A section naming a raylm run folder
    (local or a URI) reads what the run produced (`run_artifact`). Returns (field, problem) pairs for
    inputs that cannot be fetched."""
    problems = read_run_folders(job)
    for name, section in _path_sections(job):
        source = section._source or section.path
        if not source or not is_uri(source):
            continue
        section._source = source
        if is_uri(section.path) or not Path(section.path).exists():  # not fetched on this node yet
            try:
                section.path = fetch_artifact(source, full_model=name != "tokenizer")
            except (OSError, ValueError) as err:  # pyarrow: no such bucket or object, no credentials
                problems.append((f"{name}.path", f"cannot fetch {source}: {err}"))
    return problems


def localize_inputs_here(job) -> None:
    """localize_inputs on a worker or task, where a problem is an error (preflight reported it before)."""
    problems = localize_inputs(job)
    if problems:
        raise RuntimeError("; ".join(f"{field}: {message}" for field, message in problems))


def as_written(job) -> dict:
    """The job as a JSON-able dict with every fetched input's path back to its storage URI: what a
    run records in spec.yaml and what a task on another node is handed (it fetches its own copy)."""
    written = job.model_dump(mode="json")
    for name in type(job).model_fields:
        source = getattr(getattr(job, name), "_source", None)
        if source:
            written[name]["path"] = source
    return written
