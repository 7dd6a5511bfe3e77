"""Tokenized data, written once as Parquet shards and read by every later run and resume.

    from raylm.data.cache import cache_key, ensure
    key = cache_key(job.data, tokenizer, inputs=job.data.paths)
    cache = ensure(f"{root}/{key}", lambda: token_rows(...))   # tokenizes only on a miss

Ray Data tokenizes and packs in parallel tasks; the driver writes the rows it streams back into
`<cache>/<split>/part-NNNNN.parquet` (one fixed-size list column per array column, int32) and, last,
`manifest.json` with every file's row count: a folder without a manifest is an unfinished write and
is rebuilt. The key is a digest of the inputs' bytes, the tokenizer's files and every data setting
that changes the rows, so a changed input or setting never reads stale rows. Workers read the shards
directly (raylm/train/reader.py) from a local or shared folder, or a storage URI.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from raylm.data.sources import BadExample, filesystem

VERSION = 1  # bump when the row layout changes
FILE_BYTES = 256 * 2**20  # rows per Parquet file, by size
GROUP_BYTES = 8 * 2**20  # rows per row group (the unit a reader fetches)
# data settings that change how rows are read, not what they are
READ_ONLY_FIELDS = {"cache", "shuffle_buffer", "padding", "group_by_length", "path", "paths"}


def cache_key(data_spec, tokenizer, inputs: list[str]) -> str:
    """A digest of everything the token rows depend on."""
    settings = {k: v for k, v in data_spec.model_dump(mode="json").items() if k not in READ_ONLY_FIELDS}
    digest = hashlib.sha256(json.dumps({"version": VERSION, "data": settings}, sort_keys=True).encode())
    digest.update(tokenizer_digest(tokenizer).encode())
    for name in inputs:
        digest.update(input_digest(name).encode())
    return digest.hexdigest()[:24]


def tokenizer_digest(tokenizer) -> str:
    """A digest of the files `save_pretrained` writes (vocabulary, merges, special tokens, template)."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        for file in sorted(Path(folder).rglob("*")):
            if file.is_file():
                digest.update(file.name.encode())
                digest.update(file.read_bytes())
    return digest.hexdigest()


def input_digest(name: str) -> str:
    """A digest of an input's bytes (a file, or every file under a folder, with their relative names);
    where it lives does not matter. The files are listed as the readers list them (pyarrow, through
    symlinked folders too). An input at a storage URI is not read for this: its objects' identity
    (relative names, sizes and modification times) stands for their bytes."""
    import pyarrow.fs as pafs

    digest = hashlib.sha256()
    fs, root = filesystem(name)
    root = root.rstrip("/")
    info = fs.get_file_info(root)
    found = (
        [info]
        if info.type == pafs.FileType.File
        else fs.get_file_info(pafs.FileSelector(root, recursive=True))
    )
    for entry in sorted((e for e in found if e.type == pafs.FileType.File), key=lambda e: e.path):
        relative = entry.base_name if entry.path == root else entry.path[len(root) + 1 :]
        if "://" in name:
            digest.update(json.dumps([relative, entry.size, entry.mtime_ns]).encode())
            continue
        digest.update(relative.encode())
        with fs.open_input_stream(entry.path) as handle:
            while chunk := handle.read(8 * 2**20):
                digest.update(chunk)
    return digest.hexdigest()


def load_manifest(where: str) -> dict | None:
    """The manifest of a finished cache at `where`, or None."""
    import pyarrow.fs as pafs

    fs, root = filesystem(where)
    if fs.get_file_info(f"{root}/manifest.json").type != pafs.FileType.File:
        return None
    with fs.open_input_stream(f"{root}/manifest.json") as source:
        return json.loads(source.read())


def ensure(where: str, make_rows: Callable, val_limit: int | None = None) -> tuple[dict, bool]:
    """The cache at `where`, written from the Ray Dataset `make_rows()` returns if it is not there
    yet. Returns (manifest, whether it was written now)."""
    manifest = load_manifest(where)
    if manifest is not None:
        return manifest, False
    return write(where, make_rows(), val_limit), True


def write(where: str, rows, val_limit: int | None = None) -> dict:
    """Stream the Ray Dataset `rows` (array columns and a boolean `val`) into Parquet shards: the
    train and val splits, val cut to `val_limit` rows. On a filesystem the cache is written beside the
    target and moved into place; an object store has no folder to move, so the shards go to their
    place under names of this write's own and `manifest.json`, which readers look for, is written
    last. Either way concurrent runs of the same data each finish with one complete copy."""
    import pyarrow.fs as pafs

    fs, root = filesystem(where)
    attempt = uuid.uuid4().hex[:8]
    in_place = not isinstance(fs, pafs.LocalFileSystem)
    target = root if in_place else f"{root}.incoming-{attempt}"
    prefix = f"{attempt}-" if in_place else ""
    writers = {split: _SplitWriter(fs, f"{target}/{split}", prefix) for split in ("train", "val")}
    for batch in rows.iter_batches(batch_size=None, batch_format="numpy"):
        bad = [str(b) for b in batch.pop("bad", ()) if b]  # examples that cannot be used
        if bad:
            if not in_place and fs.get_file_info(target).type != pafs.FileType.NotFound:
                fs.delete_dir(target)
            raise BadExample(bad[0])
        is_val = batch.pop("val").astype(bool)
        writers["train"].add({k: v[~is_val] for k, v in batch.items()})
        room = None if val_limit is None else max(0, val_limit - writers["val"].rows)
        writers["val"].add({k: v[is_val][:room] for k, v in batch.items()})
    manifest = {"version": VERSION, "splits": {name: w.close() for name, w in writers.items()}}
    finished = load_manifest(where)
    if finished is not None:  # another run finished the same cache first
        if not in_place:
            fs.delete_dir(target)
        return finished
    fs.create_dir(target, recursive=True)  # no row at all leaves no split folder behind
    with fs.open_output_stream(f"{target}/manifest.json") as out:
        out.write(json.dumps(manifest, indent=1).encode())
    if in_place:
        return manifest
    if fs.get_file_info(root).type != pafs.FileType.NotFound:  # an unfinished earlier write
        fs.delete_dir(root)
    try:
        fs.move(target, root)
    except OSError:  # another run moved its copy in meanwhile
        if load_manifest(where) is None:
            raise
        fs.delete_dir(target)
    return manifest


class _SplitWriter:
    """Rows of one split into numbered Parquet files of fixed-size int32 list columns."""

    def __init__(self, fs, folder: str, prefix: str = ""):
        self.fs, self.folder, self.prefix = fs, folder, prefix
        self.rows, self.files, self.columns = 0, [], None
        self.pending: list[dict] = []
        self.pending_rows = 0
        self.writer = None

    def add(self, batch: dict) -> None:
        n = len(next(iter(batch.values()))) if batch else 0
        if n == 0:
            return
        if self.columns is None:
            self.columns = {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for k, v in batch.items()}
            row_bytes = sum(4 * max(1, int(_prod(c["shape"]))) for c in self.columns.values())
            self.group_rows = max(1, GROUP_BYTES // row_bytes)
            self.file_rows = max(
                self.group_rows, FILE_BYTES // row_bytes // self.group_rows * self.group_rows
            )
        self.pending.append(batch)
        self.pending_rows += n
        while self.pending_rows >= self.group_rows:
            self._flush(self.group_rows)

    def _flush(self, count: int) -> None:
        import numpy as np

        merged = {k: np.concatenate([b[k] for b in self.pending]) for k in self.columns}
        head = {k: v[:count] for k, v in merged.items()}
        rest = {k: v[count:] for k, v in merged.items()}
        self.pending = [rest] if len(next(iter(rest.values()))) else []
        self.pending_rows -= count
        if self.writer is None or self.files[-1]["rows"] >= self.file_rows:
            self._next_file()
        self.writer.write_table(_table(head), row_group_size=count)
        self.files[-1]["rows"] += count
        self.rows += count

    def _next_file(self) -> None:
        import pyarrow.parquet as pq

        if self.writer is not None:
            self.writer.close()
        name = f"{self.prefix}part-{len(self.files):05d}.parquet"
        self.fs.create_dir(self.folder, recursive=True)
        self.writer = pq.ParquetWriter(f"{self.folder}/{name}", _schema(self.columns), filesystem=self.fs)
        self.files.append({"name": name, "rows": 0})

    def close(self) -> dict:
        if self.pending_rows:
            self._flush(self.pending_rows)
        if self.writer is not None:
            self.writer.close()
        return {"rows": self.rows, "files": self.files, "columns": self.columns or {}}


def _schema(columns: dict):
    import pyarrow as pa

    return pa.schema([(k, pa.list_(pa.int32(), _prod(c["shape"]))) for k, c in columns.items()])


def _table(batch: dict):
    import numpy as np
    import pyarrow as pa

    columns = {}
    for name, values in batch.items():
        flat = np.ascontiguousarray(values, dtype=np.int32).reshape(len(values), -1)
        columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    return pa.table(columns)


def _prod(shape: list[int]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out
