"""Supervised examples -> (prompt, response) text -> token rows with response-only labels, in Ray Data.

    from raylm.sft import check_sft_data, examples, token_rows
    rows = token_rows(examples(spec.data), tokenizer, spec.data, split="train")

Formats: `completion` (prompt/completion fields), `alpaca` (instruction/input/output, rendered with
the Alpaca template), `chat` (a list of {role, content} messages rendered with the tokenizer's chat
template or `data.chat_template`; the last assistant turn is the response). Labels are -100 (ignored
by the loss) on prompt tokens unless `loss_on: all`, and on padding. An example goes to the validation
split by a hash of its text: deterministic, no counting pass.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from raylm.sources import (
    files_under,
    in_validation,
    is_saved_dataset,
    load_saved_dataset,
    missing_paths,
    read_head,
)
from raylm.spec.sft import SFTDataSpec

IGNORE = -100
ALPACA = (
    "Below is an instruction that describes a task{context}. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n"
)
FIELDS = {"alpaca": ("instruction", "output")}
SUFFIXES = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet"}


def required_fields(spec: SFTDataSpec) -> tuple[str, ...]:
    if spec.format == "completion":
        return (spec.prompt_field, spec.completion_field)
    if spec.format == "alpaca":
        return FIELDS["alpaca"]
    return (spec.messages_field,)


def render(row: dict, spec: SFTDataSpec, tokenizer) -> tuple[str, str]:
    """(prompt, response) text of one example."""
    if spec.format == "completion":
        return str(row[spec.prompt_field]), str(row[spec.completion_field])
    if spec.format == "alpaca":
        extra = str(row.get("input") or "").strip()
        prompt = ALPACA.format(
            context=", paired with an input that provides further context" if extra else "",
            instruction=str(row["instruction"]).strip(),
            input=f"### Input:\n{extra}\n\n" if extra else "",
        )
        return prompt, str(row["output"])
    messages = list(row[spec.messages_field])
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a chat example must end with an assistant message (the response)")
    prompt = tokenizer.apply_chat_template(
        [dict(m) for m in messages[:-1]],
        tokenize=False,
        add_generation_prompt=True,
        chat_template=spec.chat_template,
    )
    return prompt, str(messages[-1]["content"])


def encode(prompt: str, response: str, tokenizer, spec: SFTDataSpec) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example (BOS + prompt + response + EOS), cut to seq_len."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    p = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + eos
    ids = (p + r)[: spec.seq_len]
    labels = ids.copy() if spec.loss_on == "all" else ([IGNORE] * len(p) + r)[: spec.seq_len]
    return ids, labels


def prompt_ids(prompt: str, tokenizer) -> list[int]:
    """What generation starts from: BOS + prompt, as in training."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def is_val(prompt: str, response: str, val_fraction: float) -> bool:
    return in_validation(f"{prompt}\x00{response}".encode(), val_fraction)


def tokenize_batch(batch: dict, tokenizer, spec: SFTDataSpec, split: str):
    """Rows of this split: input_ids, labels, attention_mask (seq_len each; packed or padded)."""
    columns = list(batch)
    n = len(batch[columns[0]]) if columns else 0
    encoded = []
    for i in range(n):
        prompt, response = render({c: batch[c][i] for c in columns}, spec, tokenizer)
        if is_val(prompt, response, spec.val_fraction) != (split == "val"):
            continue
        ids, labels = encode(prompt, response, tokenizer, spec)
        if any(label != IGNORE for label in labels[1:]):  # a prompt filling seq_len has nothing to learn
            encoded.append((ids, labels))
    if not encoded:
        return
    if spec.packing:
        ids = np.fromiter((t for e in encoded for t in e[0]), dtype=np.int64)
        labels = np.fromiter((t for e in encoded for t in e[1]), dtype=np.int64)
        rows = len(ids) // spec.seq_len
        if rows == 0:
            return
        shape = (rows, spec.seq_len)
        yield {
            "input_ids": ids[: rows * spec.seq_len].reshape(shape),
            "labels": labels[: rows * spec.seq_len].reshape(shape),
            "attention_mask": np.ones(shape, dtype=np.int64),
        }
        return
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    yield collate(encoded, spec.seq_len, pad)


def collate(encoded: list[tuple[list[int], list[int]]], seq_len: int, pad: int) -> dict:
    """Encoded examples as `seq_len` rows: input_ids (padded with `pad`), labels (padded with IGNORE)
    and attention_mask, as int64 arrays."""
    out = {
        "input_ids": np.full((len(encoded), seq_len), pad, dtype=np.int64),
        "labels": np.full((len(encoded), seq_len), IGNORE, dtype=np.int64),
        "attention_mask": np.zeros((len(encoded), seq_len), dtype=np.int64),
    }
    for row, (ids, labels) in enumerate(encoded):
        out["input_ids"][row, : len(ids)] = ids
        out["labels"][row, : len(labels)] = labels
        out["attention_mask"][row, : len(ids)] = 1
    return out


def examples(spec: SFTDataSpec):
    """A Ray Dataset of the raw examples."""
    import ray.data

    if spec.generate is not None:
        from raylm.tasks import generate

        return ray.data.from_items(generate(spec.generate.task, spec.generate.examples, spec.generate.seed))
    parts = []
    for raw in spec.paths:
        if is_saved_dataset(raw):
            parts.append(ray.data.from_huggingface(load_saved_dataset(raw)))
            continue
        files = files_under(raw, tuple(SUFFIXES))
        kind = SUFFIXES.get(files[0].suffix.lower(), "json")
        read = (
            ray.data.read_parquet if kind == "parquet" else functools.partial(ray.data.read_json, lines=True)
        )
        parts.append(read([str(f) for f in files]))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def token_rows(records, tokenizer, spec: SFTDataSpec, split: str):
    fn = functools.partial(tokenize_batch, tokenizer=tokenizer, spec=spec, split=split)
    return records.map_batches(fn, batch_size=512, batch_format="numpy")


def held_out(records, tokenizer, spec: SFTDataSpec, limit: int) -> list[tuple[str, str]]:
    """Up to `limit` (prompt, response) pairs of the validation split, for exact match."""
    found = []
    for batch in records.iter_batches(batch_size=256, batch_format="numpy"):
        columns = list(batch)
        for i in range(len(batch[columns[0]])):
            prompt, response = render({c: batch[c][i] for c in columns}, spec, tokenizer)
            if is_val(prompt, response, spec.val_fraction):
                found.append((prompt, response))
                if len(found) >= limit:
                    return found
    return found


def check_sft_data(spec: SFTDataSpec) -> list[tuple[str, str]]:
    """Missing files, unreadable rows and missing fields, found before any worker starts."""
    if spec.generate is not None:
        return []
    problems = missing_paths(spec.paths)
    for raw in spec.paths:
        if not Path(raw).exists():
            continue
        if is_saved_dataset(raw):
            try:
                columns = load_saved_dataset(raw).column_names
            except Exception as err:  # datasets raises several types
                problems.append(("data.path", f"{raw}: not a datasets.save_to_disk folder ({err})"))
                continue
            problems += _missing_fields(raw, columns, spec)
            continue
        files = files_under(raw, tuple(SUFFIXES))
        if not files:
            problems.append(("data.path", f"no .jsonl / .parquet files under {raw}"))
        for file in files:
            problems += _check_file(file, spec)
    return problems


def _check_file(file: Path, spec: SFTDataSpec) -> list[tuple[str, str]]:
    if file.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        if file.stat().st_size == 0:
            return [("data.path", f"{file}: file is empty")]
        try:
            return _missing_fields(str(file), pq.read_schema(file).names, spec)
        except Exception as err:  # pyarrow raises several types for corrupt files
            return [("data.path", f"{file}: not a readable Parquet file ({err})")]
    text, problem = read_head(file)
    if problem:
        return [("data.path", f"{file}: {problem}")]
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError as err:
        return [("data.path", f"{file}: first line is not JSON ({err.msg}); JSONL needs one object per line")]
    if not isinstance(row, dict):
        return [("data.path", f"{file}: rows must be JSON objects")]
    return _missing_fields(str(file), list(row), spec)


def _missing_fields(where: str, columns: list[str], spec: SFTDataSpec) -> list[tuple[str, str]]:
    missing = [f for f in required_fields(spec) if f not in columns]
    if not missing:
        return []
    hint = {
        "completion": "set data.prompt_field / data.completion_field",
        "alpaca": "alpaca rows need instruction and output (input optional)",
        "chat": "set data.messages_field",
    }[spec.format]
    return [
        (
            "data.path",
            f"{where}: no field {', '.join(map(repr, missing))} for format {spec.format} "
            f"(found: {', '.join(columns)}); {hint}",
        )
    ]
