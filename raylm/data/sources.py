"""What the pretraining and supervised data pipelines share about their inputs: finding files (on
local disk or at a storage URI), `datasets.save_to_disk` folders, the first checks on a file, and the
hash split.

    from raylm.data.sources import files_under, in_validation, is_saved_dataset, read_head

Files at a storage URI (s3://, gs://) are listed and sniffed through pyarrow's filesystem on the driver
and handed to Ray Data as URIs, so each read task streams its own file on whatever node it runs (with
that node's credentials); nothing is copied to the driver's disk.
"""

from __future__ import annotations

import zlib
from pathlib import Path, PurePosixPath

SNIFF_BYTES = 1 << 20
VAL_BUCKETS = 10_000


class BadExample(ValueError):
    """An example that cannot be used (the message names it). A Ray Data task that finds one yields a
    row whose `bad` column holds the message (good rows hold "") instead of raising, which would print
    the task's traceback on the console: the cache writer raises it in the driver, which reports it as
    a problem of the data."""


def shown(value) -> str:
    """An example's value as a message shows it: its first 60 characters (numpy values as the lists and
    numbers of the file they were read from)."""
    text = value if isinstance(value, str) else repr(plain(value))
    return repr(text[:60] + ("..." if len(text) > 60 else ""))


def plain(value):
    """A value Ray Data read, as the file had it: numpy arrays and numbers as lists and numbers, a JSON
    null as None."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if missing(value):
        return None
    return value.tolist() if hasattr(value, "tolist") else value


def missing(value) -> bool:
    """A JSON null, as Ray Data hands it: None, or NaN where pandas read the column as numbers."""
    return value is None or isinstance(value, float) and value != value


def filesystem(where: str):
    """(pyarrow filesystem, path in it) for a local path or a storage URI."""
    import pyarrow.fs as pafs

    if "://" in where:
        return pafs.FileSystem.from_uri(where)
    return pafs.LocalFileSystem(), str(Path(where).expanduser().resolve())


def _type(path: str):
    fs, inside = filesystem(path)
    return fs.get_file_info(inside).type


def is_folder(path: str) -> bool:
    import pyarrow.fs as pafs

    return _type(path) == pafs.FileType.Directory


def suffix(name: str) -> str:
    return PurePosixPath(name).suffix.lower()


def is_saved_dataset(path: str) -> bool:
    """A folder written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    import pyarrow.fs as pafs

    base = str(path).rstrip("/")
    return is_folder(base) and any(
        _type(f"{base}/{name}") == pafs.FileType.File for name in ("dataset_info.json", "dataset_dict.json")
    )


def load_hub_dataset(spec):
    """A `data.dataset` section (raylm.spec.sections.HubDataset) read with `datasets.load_dataset`;
    a gated hub dataset authenticates through huggingface_hub's own lookup (HF_TOKEN in the node's
    environment, HF_TOKEN_PATH, ~/.cache/huggingface/token), never through the spec."""
    import datasets

    return datasets.load_dataset(
        spec.name,
        spec.config,
        split=spec.split,
        revision=spec.revision,
        data_files=spec.data_files,
    )


def to_ray(dataset):
    """A Ray Dataset of a `datasets.Dataset` that raylm loaded. Not `ray.data.from_huggingface`: that
    first calls `load_dataset` again with the dataset's recorded name (a local folder's name too) to
    look for the hub's Parquet copy, which without a network waits ~20 s and with one may download an
    unrelated public dataset of that name."""
    import ray.data

    return ray.data.from_arrow(dataset.with_format("arrow")[:])


def dataset_inputs(spec) -> list[str]:
    """The local files a `data.dataset` section reads (its folder, its data_files), for the cache key;
    a hub dataset is keyed by its name and revision alone."""
    files = [spec.data_files] if isinstance(spec.data_files, str) else list(spec.data_files or [])
    return [p for p in [spec.name, *files] if Path(p).expanduser().exists()]


def check_dataset(spec) -> list[tuple[str, str]]:
    """A local dataset folder or data file that is not there (a hub dataset is checked when read)."""
    files = [spec.data_files] if isinstance(spec.data_files, str) else list(spec.data_files or [])
    local = [spec.name] if spec.name.startswith((".", "/", "~")) else []
    return [
        ("data.dataset", f"{p} does not exist") for p in [*local, *files] if not Path(p).expanduser().exists()
    ]


def load_saved_dataset(path: str):
    """A save_to_disk folder as one Dataset: a DatasetDict gives its `train` split (else its first)."""
    import datasets

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    return loaded


def files_under(path: str, suffixes: tuple[str, ...]) -> list[str]:
    """`path` itself if it is a file, else the files below it with one of `suffixes`, sorted (named as
    `path` names them: local paths, or URIs under a URI)."""
    import pyarrow.fs as pafs

    # a local path by its expanded name (Ray Data's readers do not expand ~), a URI as written
    name = str(path) if "://" in str(path) else str(Path(path).expanduser())
    if not is_folder(path):
        return [name]
    fs, inside = filesystem(path)
    inside, base = inside.rstrip("/"), name.rstrip("/")
    found = fs.get_file_info(pafs.FileSelector(inside, recursive=True))
    return sorted(
        base + info.path[len(inside) :]
        for info in found
        if info.type == pafs.FileType.File and suffix(info.path) in suffixes
    )


def missing_paths(paths: list[str]) -> list[tuple[str, str]]:
    """A data path that is not there, or a storage URI that cannot be reached (no such bucket, no
    credentials)."""
    import pyarrow.fs as pafs

    problems = []
    for raw in paths:
        try:
            missing = _type(raw) == pafs.FileType.NotFound
        except (OSError, ValueError) as err:  # pyarrow: unknown scheme, no bucket, no credentials
            problems.append(("data.path", f"cannot read {raw}: {err}"))
            continue
        if missing:
            where = "in the store" if "://" in raw else "(paths are relative to where raylm runs)"
            problems.append(("data.path", f"{raw} does not exist {where}"))
    return problems


def one_store(paths: list[str]) -> list[tuple[str, str]]:
    """Ray Data reads one list of files through one filesystem: local paths, or URIs of one store."""
    stores = {raw.split("/", 3)[2] if "://" in raw else "" for raw in paths}
    schemes = {raw.split("://", 1)[0] if "://" in raw else "" for raw in paths}
    if len(stores) > 1 or len(schemes) > 1:
        return [
            (
                "data.path",
                f"the list mixes {', '.join(sorted(f'{s}://' if s else 'local paths' for s in schemes))} "
                "or several buckets; give files of one place (copy them into one bucket or folder)",
            )
        ]
    return []


def saved_dataset_in_store(raw: str) -> list[tuple[str, str]]:
    """datasets.save_to_disk folders are read from local disk (datasets memory-maps them): one at a
    storage URI is refused with the fix."""
    if "://" not in raw:
        return []
    return [
        (
            "data.path",
            f"{raw}: a datasets.save_to_disk folder is read from local disk; in a bucket, write Parquet "
            "instead (dataset.to_parquet('.../data.parquet')) and point data.path at it",
        )
    ]


def file_size(file: str) -> int:
    fs, inside = filesystem(file)
    return fs.get_file_info(inside).size


def open_file(file: str):
    """A seekable binary handle on a local file or an object in the store."""
    fs, inside = filesystem(file)
    return fs.open_input_file(inside)


def read_head(file: str) -> tuple[str, str | None]:
    """The start of a text file and the problem with it (empty, not UTF-8), if any."""
    if file_size(file) == 0:
        return "", "file is empty"
    with open_file(file) as handle:
        head = handle.read(SNIFF_BYTES)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # not just a character cut at the sniff boundary
            byte = head[err.start : err.start + 1]
            return "", f"not UTF-8 text (byte {err.start}: {byte!r}); convert it to UTF-8"
        return head[: err.start].decode("utf-8"), None
    if not text.strip() and len(head) < SNIFF_BYTES:  # read whole: nothing but blank lines
        return "", "file is empty (blank lines only)"
    return text, None


def in_validation(key: bytes, fraction: float) -> bool:
    """Whether the item identified by `key` belongs to the validation split: a hash bucket, so the
    split is deterministic and needs no pass over the data to count it."""
    return zlib.crc32(key) % VAL_BUCKETS < int(fraction * VAL_BUCKETS)
