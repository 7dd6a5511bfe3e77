"""Supervised examples -> (prompt, response) text -> token rows with response-only labels, in Ray Data.

    from raylm.data.sft import check_sft_data, examples, token_rows
    rows = token_rows(examples(spec.data), tokenizer, spec.data)   # both splits, `val` marks one

Formats: `completion` (prompt/completion fields), `alpaca` (instruction/input/output, rendered with
the Alpaca template), `chat` (a list of {role, content} messages rendered with the tokenizer's chat
template or `data.chat_template`; the last assistant turn is the response). Labels are -100 (ignored
by the loss) on prompt tokens unless `loss_on: all`, and on padding. An example goes to the validation
split by a hash of its text: deterministic, no counting pass.
"""

from __future__ import annotations

import functools
import json

import numpy as np

from raylm.data.sources import (
    BadExample,
    check_dataset,
    file_size,
    files_under,
    in_validation,
    is_saved_dataset,
    load_hub_dataset,
    load_saved_dataset,
    missing,
    missing_paths,
    one_store,
    open_file,
    plain,
    read_head,
    saved_dataset_in_store,
    shown,
    suffix,
    to_ray,
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
    if spec.format == "choices":
        return (spec.prompt_field, spec.choices_field, spec.answer_field)
    if spec.format == "preference":
        return (spec.prompt_field, spec.chosen_field, spec.rejected_field)
    if spec.format == "kto":
        return (spec.prompt_field, spec.completion_field, spec.label_field)
    return (spec.messages_field,)


def render(row: dict, spec: SFTDataSpec, tokenizer) -> tuple[str, str]:
    """(prompt, response) text of one example (choices: the right choice is the response); BadExample
    names an example that cannot be rendered."""
    if spec.format == "completion":
        return _text(row, spec.prompt_field), _text(row, spec.completion_field)
    if spec.format == "choices":
        options = choice_texts(row, spec)
        return _text(row, spec.prompt_field), options[answer_index(row, spec, len(options))]
    if spec.format == "alpaca":
        extra = "" if missing(row.get("input")) else str(row["input"]).strip()
        prompt = ALPACA.format(
            context=", paired with an input that provides further context" if extra else "",
            instruction=_text(row, "instruction").strip(),
            input=f"### Input:\n{extra}\n\n" if extra else "",
        )
        return prompt, _text(row, "output")
    messages = _messages(row, spec.messages_field)
    if not messages or messages[-1]["role"] != "assistant":
        raise BadExample(
            f"the example {shown(row)}: a chat example must end with an assistant message (the response)"
        )
    prompt = tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True, chat_template=spec.chat_template
    )
    return prompt, str(messages[-1]["content"])


def _text(row: dict, field: str) -> str:
    value = row.get(field)
    if missing(value):
        raise BadExample(f"the example {shown(row)} has no {field}")
    if not _is_text(value):
        raise BadExample(f"the example {shown(row)}: its {field} is {shown(value)}, not text")
    return str(value)


def _is_text(value) -> bool:
    """Text, or a number written as one (not a list, a mapping, true / false or a null)."""
    return (
        isinstance(value, (str, int, float, np.integer, np.floating))
        and not isinstance(value, (bool, np.bool_))
        and not missing(value)
    )


def _messages(row: dict, field: str) -> list[dict]:
    value = row.get(field)
    try:
        messages = [dict(m) for m in value]
        if all(_is_text(m.get("role")) and _is_text(m.get("content")) for m in messages):
            return messages
    except (TypeError, ValueError):
        pass
    raise BadExample(
        f"the example {shown(row)}: its {field} must be a list of {{role, content}} messages with text"
    )


def choice_texts(row: dict, spec: SFTDataSpec) -> list[str]:
    value = row.get(spec.choices_field)
    if value is None or isinstance(value, str):
        raise BadExample(f"the example {shown(row)}: its {spec.choices_field} must be a list of choices")
    if not all(_is_text(c) for c in value):
        raise BadExample(f"the example {shown(row)}: every one of its {spec.choices_field} must be text")
    options = [str(c) for c in value]
    if len(options) != spec.num_choices:
        raise BadExample(
            f"the example {shown(row)} has {len(options)} choices, data.num_choices is {spec.num_choices}: "
            "every example needs the same number"
        )
    return options


def answer_index(row: dict, spec: SFTDataSpec, count: int) -> int:
    answer = row.get(spec.answer_field)
    try:  # a whole float too: pandas reads an integer column with a null in it as floats
        whole = (
            not isinstance(answer, (bool, np.bool_)) and not missing(answer) and float(answer).is_integer()
        )
        index = int(float(answer)) if whole else None
    except (TypeError, ValueError):
        index = None
    if index is None or not 0 <= index < count:
        shown_answer = "none" if missing(answer) else repr(plain(answer))
        raise BadExample(
            f"the example {shown(row)}: its {spec.answer_field} ({shown_answer}) is not the index of one "
            f"of its {count} choices (0 to {count - 1})"
        )
    return index


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


def tokenize_batch(batch: dict, tokenizer, spec: SFTDataSpec):
    """Token rows of a batch of examples, each split's own (`val` marks the validation rows):
    input_ids, labels, attention_mask, seq_len each: packed, or right-padded (the training loop cuts
    each batch to its longest example). An example that cannot be used ends the batch with one row
    whose `bad` column names it (raylm.data.sources.BadExample); good rows hold "" there."""
    columns = list(batch)
    n = len(batch[columns[0]]) if columns else 0
    if spec.format == "choices":
        yield from choice_rows(batch, columns, n, tokenizer, spec)
        return
    encoded: dict[bool, list] = {False: [], True: []}
    for i in range(n):
        try:
            prompt, response = render({c: batch[c][i] for c in columns}, spec, tokenizer)
        except BadExample as err:  # reported by the driver (raylm.data.cache.write), without a traceback
            yield bad_row(str(err), spec)
            return
        ids, labels = encode(prompt, response, tokenizer, spec)
        if any(label != IGNORE for label in labels[1:]):  # a prompt filling seq_len has nothing to learn
            encoded[is_val(prompt, response, spec.val_fraction)].append((ids, labels))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for val, rows in encoded.items():
        out = (
            packed(rows, spec.seq_len) if spec.packing else collate(rows, spec.seq_len, pad) if rows else None
        )
        if out is not None:
            count = len(out["input_ids"])
            yield {**out, "val": np.full(count, val), "bad": np.full(count, "", dtype=object)}


def bad_row(message: str, spec: SFTDataSpec) -> dict:
    """One row naming an example that cannot train, with every column a good batch has: Ray Data may
    merge it into one block with the task's earlier good rows, which needs one schema."""
    shape = (1, spec.num_choices, spec.seq_len) if spec.format == "choices" else (1, spec.seq_len)
    row = {
        "input_ids": np.zeros(shape, dtype=np.int64),
        "labels": np.full(shape, IGNORE, dtype=np.int64),
        "attention_mask": np.zeros(shape, dtype=np.int64),
    }
    if spec.format == "choices":
        row["answer"] = np.zeros(1, dtype=np.int64)
    return {**row, "val": np.zeros(1, dtype=bool), "bad": np.asarray([message], dtype=object)}


def packed(encoded: list, seq_len: int) -> dict | None:
    """Examples concatenated and cut into `seq_len` rows (labels keep each one's prompt masked)."""
    ids = np.fromiter((t for e in encoded for t in e[0]), dtype=np.int64)
    labels = np.fromiter((t for e in encoded for t in e[1]), dtype=np.int64)
    rows = len(ids) // seq_len
    if rows == 0:
        return None
    shape = (rows, seq_len)
    return {
        "input_ids": ids[: rows * seq_len].reshape(shape),
        "labels": labels[: rows * seq_len].reshape(shape),
        "attention_mask": np.ones(shape, dtype=np.int64),
    }


def choice_rows(batch: dict, columns: list, n: int, tokenizer, spec: SFTDataSpec):
    """Multiple-choice rows: each example's choices side by side ([num_choices, seq_len] arrays, labels
    on each choice's tokens), `answer`, the right one's index, and `val`."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, answers, val = [], [], []
    for i in range(n):
        row = {c: batch[c][i] for c in columns}
        try:
            prompt, right = render(row, spec, tokenizer)
            options = choice_texts(row, spec)
            answers.append(answer_index(row, spec, len(options)))
        except BadExample as err:  # reported by the driver (raylm.data.cache.write), without a traceback
            yield bad_row(str(err), spec)
            return
        rows.append(
            collate([encode(prompt, option, tokenizer, spec) for option in options], spec.seq_len, pad)
        )
        val.append(is_val(prompt, right, spec.val_fraction))
    if rows:
        out = {key: np.stack([r[key] for r in rows]) for key in rows[0]}
        yield {
            **out,
            "answer": np.asarray(answers, dtype=np.int64),
            "val": np.asarray(val),
            "bad": np.full(len(rows), "", dtype=object),
        }


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
        from raylm.data.tasks import generate

        task = spec.generate
        choices = spec.num_choices if spec.format == "choices" else 0
        return ray.data.from_items(generate(task.task, task.examples, task.seed, choices))
    if spec.dataset is not None:
        return to_ray(load_hub_dataset(spec.dataset))
    parts = []
    for raw in spec.paths:
        if is_saved_dataset(raw):
            parts.append(to_ray(load_saved_dataset(raw)))
            continue
        files = files_under(raw, tuple(SUFFIXES))
        kind = SUFFIXES.get(suffix(files[0]), "json")
        read = (
            ray.data.read_parquet if kind == "parquet" else functools.partial(ray.data.read_json, lines=True)
        )
        parts.append(read(files))  # local paths or URIs: each read task opens its own
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def token_rows(records, tokenizer, spec: SFTDataSpec):
    """The examples' token rows (both splits, `val` marking the validation rows)."""
    fn = functools.partial(tokenize_batch, tokenizer=tokenizer, spec=spec)
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
    if spec.dataset is not None:
        return check_dataset(spec.dataset)
    problems = one_store(spec.paths)
    if problems:
        return problems
    for raw in spec.paths:
        if missing := missing_paths([raw]):
            problems += missing
            continue
        try:  # a folder that cannot be listed, an object that cannot be read: a problem, not a traceback
            problems += _check_path(raw, spec)
        except (OSError, ValueError) as err:  # pyarrow's errors are OSError / ValueError subclasses
            problems.append(("data.path", f"cannot read {raw}: {err}"))
    return problems


def _check_path(raw: str, spec: SFTDataSpec) -> list[tuple[str, str]]:
    if is_saved_dataset(raw):
        if refused := saved_dataset_in_store(raw):
            return refused
        try:
            columns = load_saved_dataset(raw).column_names
        except Exception as err:  # datasets raises several types
            return [("data.path", f"{raw}: not a datasets.save_to_disk folder ({err})")]
        return _missing_fields(raw, columns, spec)
    files = files_under(raw, tuple(SUFFIXES))
    if not files:
        return [("data.path", f"no .jsonl / .parquet files under {raw}")]
    return [problem for file in files for problem in _check_file(file, spec)]


def _check_file(file: str, spec: SFTDataSpec) -> list[tuple[str, str]]:
    if suffix(file) == ".parquet":
        import pyarrow.parquet as pq

        if file_size(file) == 0:
            return [("data.path", f"{file}: file is empty")]
        try:
            with open_file(file) as handle:
                return _missing_fields(file, pq.read_schema(handle).names, spec)
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
        "choices": "set data.prompt_field / data.choices_field / data.answer_field",
        "preference": "set data.prompt_field / data.chosen_field / data.rejected_field",
        "kto": "set data.prompt_field / data.completion_field / data.label_field",
    }[spec.format]
    return [
        (
            "data.path",
            f"{where}: no field {', '.join(map(repr, missing))} for format {spec.format} "
            f"(found: {', '.join(columns)}); {hint}",
        )
    ]
