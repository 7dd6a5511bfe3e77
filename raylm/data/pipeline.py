"""Ray Data pipeline: read text / JSONL / Parquet / save_to_disk folders -> tokenize -> pack -> split.

    from raylm.data.pipeline import check_data, documents, packed_blocks
    problems = check_data(spec.data)            # before any worker starts
    blocks = packed_blocks(documents(spec.data), tokenizer, spec.data)   # rows: input_ids, val

Tokenizing and packing run in parallel Ray tasks (`map_batches`); the train split streams to the
tokenized cache (raylm/data/cache.py) that the workers read. Each packed block goes to the validation
split by a hash of its tokens, so the split is deterministic and needs no pass over the data to count.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from raylm.data.sources import (
    check_dataset,
    file_size,
    files_under,
    in_validation,
    is_folder,
    is_saved_dataset,
    load_hub_dataset,
    load_saved_dataset,
    missing_paths,
    one_store,
    open_file,
    read_head,
    saved_dataset_in_store,
    suffix,
    to_ray,
)
from raylm.spec.sections import DataSpec

EXTENSIONS = {
    "text": (".txt", ".text", ".md"),
    "jsonl": (".jsonl", ".json", ".ndjson"),
    "parquet": (".parquet",),
}


def configure_ray_data() -> None:
    """Deterministic order (a resumed run replays exactly the batches it would have seen), no bars."""
    import ray.data
    from ray.util.debug import log_once

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # raylm turned them off: no warning saying so


def resolve_format(spec: DataSpec) -> str:
    """The input format: the spec's, or one guessed from the files' extensions."""
    if spec.dataset is not None:
        return "dataset"
    if spec.format != "auto" or spec.generate is not None:
        return spec.format if spec.generate is None else "generated"
    first = spec.paths[0]
    if is_saved_dataset(first):
        return "hf"
    if is_folder(first):
        known = tuple(s for suffixes in EXTENSIONS.values() for s in suffixes)
        files = [f for f in files_under(first, known) if not Path(f).name.startswith(".")]
        first = files[0] if files else first
    for fmt, suffixes in EXTENSIONS.items():
        if suffix(first) in suffixes:
            return fmt
    return "text"


def input_files(spec: DataSpec, fmt: str) -> list[str]:
    return [file for raw in spec.paths for file in files_under(raw, EXTENSIONS[fmt])]


def check_data(spec: DataSpec) -> list[tuple[str, str]]:
    """Problems with the input data, found before any worker starts: missing, empty, undecodable."""
    if spec.generate is not None:
        return []
    if spec.dataset is not None:
        return check_dataset(spec.dataset)
    problems = one_store(spec.paths) or missing_paths(spec.paths)
    if problems:
        return problems
    try:  # a folder that cannot be listed (permissions, a store refusing or dropping the request)
        fmt = resolve_format(spec)
        if fmt == "hf":
            return [
                p
                for raw in spec.paths
                for p in saved_dataset_in_store(raw) or _check_hf_folder(raw, spec.text_field)
            ]
        files = input_files(spec, fmt)
    except (OSError, ValueError) as err:  # pyarrow's errors are OSError / ValueError subclasses
        return [("data.path", f"cannot list {', '.join(spec.paths)}: {err}")]
    if not files:
        wanted = ", ".join(EXTENSIONS[fmt])
        return [("data.path", f"no {fmt} files ({wanted}) found under {', '.join(spec.paths)}")]
    for file in files:
        try:
            problem = _check_file(file, fmt, spec.text_field)
        except (OSError, ValueError) as err:
            problem = f"cannot read it ({err})"
        if problem:
            problems.append(("data.path", f"{file}: {problem}"))
    return problems


def _check_file(file: str, fmt: str, text_field: str) -> str | None:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        if file_size(file) == 0:
            return "file is empty"
        try:
            with open_file(file) as handle:
                schema = pq.read_schema(handle)
        except Exception as err:  # pyarrow raises several types for corrupt files
            return f"not a readable Parquet file ({err})"
        if text_field not in schema.names:
            return f"no column {text_field!r} (columns: {', '.join(schema.names)}); set data.text_field"
        return None
    text, problem = read_head(file)
    if problem:
        return problem
    if fmt == "jsonl":
        first = next((line for line in text.splitlines() if line.strip()), "")
        try:
            row = json.loads(first)
        except json.JSONDecodeError as err:
            return f"first line is not JSON ({err.msg}); JSONL needs one JSON object per line"
        if not isinstance(row, dict) or text_field not in row:
            keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            return f"rows have no field {text_field!r} (found: {keys}); set data.text_field"
    elif not text.strip():
        return "file holds only whitespace"
    return None


def _check_hf_folder(raw: str, text_field: str) -> list[tuple[str, str]]:
    try:
        dataset = load_saved_dataset(raw)
    except Exception as err:  # datasets raises FileNotFoundError, ValueError, ...
        return [("data.path", f"{raw}: not a datasets.save_to_disk folder ({err})")]
    if text_field not in dataset.column_names:
        cols = ", ".join(dataset.column_names)
        return [("data.path", f"{raw}: no column {text_field!r} (columns: {cols}); set data.text_field")]
    if len(dataset) == 0:
        return [("data.path", f"{raw}: the dataset has no rows")]
    return []


def documents(spec: DataSpec):
    """A Ray Dataset of {"text": str} rows read from the spec's inputs."""
    import ray.data

    fmt = resolve_format(spec)
    if fmt == "generated":
        from raylm.data.corpus import stories

        return ray.data.from_items(
            [{"text": s} for s in stories(spec.generate.documents, spec.generate.seed)]
        )
    if fmt == "dataset":
        loaded = load_hub_dataset(spec.dataset)
        if spec.text_field not in loaded.column_names:
            from raylm.spec.reading import SpecError

            columns = ", ".join(loaded.column_names)
            raise SpecError(
                [("data.text_field", f"the dataset has no column {spec.text_field!r} ({columns})")]
            )
        ds = to_ray(loaded.select_columns([spec.text_field]))
    elif fmt == "hf":
        parts = [to_ray(load_saved_dataset(p).select_columns([spec.text_field])) for p in spec.paths]
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    else:
        files = input_files(spec, fmt)  # local paths or URIs: each read task opens its own
        if fmt == "text":
            # One row per line; keep the newlines so packed blocks see the text as written.
            return ray.data.read_text(files, drop_empty_lines=False).map_batches(
                _with_newline, batch_format="pyarrow"
            )
        if fmt == "jsonl":
            ds = ray.data.read_json(files, lines=True)
        else:
            ds = ray.data.read_parquet(files, columns=[spec.text_field])
    if spec.text_field != "text":
        ds = ds.rename_columns({spec.text_field: "text"})
    return ds.select_columns(["text"])


def _with_newline(table):
    import pyarrow.compute as pc

    return table.set_column(0, "text", pc.binary_join_element_wise(table["text"], "\n", ""))


def is_line_format(spec: DataSpec) -> bool:
    """Plain text arrives line by line: an EOS after every line would break the text apart."""
    return resolve_format(spec) == "text"


def pack_batch(batch: dict, tokenizer, seq_len: int, add_eos: bool, val_fraction: float):
    """Tokenize a batch of documents, concatenate, cut into `seq_len` blocks; `val` marks the blocks
    of the validation split. A generator, so that a batch too short for a block yields nothing (Ray
    Data cannot type an empty tensor column)."""
    texts = [str(t) for t in batch["text"]]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    stream = np.fromiter((tok for ids in encoded for tok in (*ids, *eos)), dtype=np.int32)
    blocks = stream[: len(stream) // seq_len * seq_len].reshape(-1, seq_len)
    if len(blocks):
        is_val = np.array([in_validation(b.tobytes(), val_fraction) for b in blocks], dtype=bool)
        yield {"input_ids": blocks, "val": is_val}


def packed_blocks(docs, tokenizer, spec: DataSpec):
    """`docs` tokenized and packed into `spec.seq_len` blocks, each marked `val` or not."""
    fn = functools.partial(
        pack_batch,
        tokenizer=tokenizer,
        seq_len=spec.seq_len,
        add_eos=spec.add_eos and not is_line_format(spec),
        val_fraction=spec.val_fraction,
    )
    return docs.map_batches(fn, batch_size=spec.pack_batch_docs, batch_format="numpy")


def corpus_sample(docs, max_chars: int):
    """Texts from the start of `docs` totalling at most `max_chars` characters (tokenizer training)."""
    total = 0
    for batch in docs.iter_batches(batch_size=1024, batch_format="numpy"):
        for text in batch["text"]:
            text = str(text)
            yield text
            total += len(text)
            if total >= max_chars:
                return
