"""What the pretraining and supervised data pipelines share about their inputs: finding files,
`datasets.save_to_disk` folders, the first checks on a file, and the hash split.

    from raylm.data.sources import in_validation, is_saved_dataset, load_saved_dataset
"""

from __future__ import annotations

import zlib
from pathlib import Path

SNIFF_BYTES = 1 << 20
VAL_BUCKETS = 10_000


def is_saved_dataset(path: str | Path) -> bool:
    """A folder written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    path = Path(path)
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())


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


def files_under(path: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """`path` itself if it is a file, else the files below it with one of `suffixes`, sorted."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    return [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in suffixes]


def missing_paths(paths: list[str]) -> list[tuple[str, str]]:
    return [
        ("data.path", f"{raw} does not exist (paths are relative to where raylm runs)")
        for raw in paths
        if not Path(raw).exists()
    ]


def read_head(file: Path) -> tuple[str, str | None]:
    """The start of a text file and the problem with it (empty, not UTF-8), if any."""
    if file.stat().st_size == 0:
        return "", "file is empty"
    with open(file, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
    try:
        return head.decode("utf-8"), None
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # not just a character cut at the sniff boundary
            byte = head[err.start : err.start + 1]
            return "", f"not UTF-8 text (byte {err.start}: {byte!r}); convert it to UTF-8"
        return head[: err.start].decode("utf-8"), None


def in_validation(key: bytes, fraction: float) -> bool:
    """Whether the item identified by `key` belongs to the validation split: a hash bucket, so the
    split is deterministic and needs no pass over the data to count it."""
    return zlib.crc32(key) % VAL_BUCKETS < int(fraction * VAL_BUCKETS)
