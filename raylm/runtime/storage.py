"""Run outputs on a local/shared path or a storage URI (s3://, gs://, file://) through pyarrow.fs.

Local folders are replaced atomically: a new model folder is written beside the old one and swapped
in with renames, so a failure while exporting never leaves a half-written `model/`.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path


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
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    export_dir(stage, "model", write, publish_to)
