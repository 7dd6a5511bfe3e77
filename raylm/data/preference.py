"""Preference data -> token rows: a prompt with a chosen and a rejected answer (DPO and its kin), or
with one completion marked desirable or not (KTO).

    {"prompt": "Q: 2+3=\\nA:", "chosen": " 5", "rejected": " 6"}                       format: preference
    {"prompt": [{"role": "user", "content": "2+3?"}],
     "chosen": [{"role": "assistant", "content": "5"}], "rejected": [...]}          (chat messages)
    {"prompt": "Q: 2+3=\\nA:", "completion": " 6", "label": false}                    format: kto

A prompt given as messages is rendered with the tokenizer's chat template (or data.chat_template) and
its generation prompt; an answer given as messages is its last (assistant) message, and the messages
before it join the prompt. Each answer is encoded as supervised fine-tuning encodes a response (BOS +
prompt + answer + EOS, labels on the answer only), so the two rows of an example share the prompt's
tokens. Rows: input_ids / labels / attention_mask of shape [examples, 2, seq_len]: the chosen and the
rejected answer (`pair`), or for KTO the completion and the same prompt with another example's
completion (`desirable`), from which the KL term's estimate comes (TRL rotates completions the same
way). A generated task gives its right answer as chosen and a wrong one as rejected.

An example goes to the validation split by a hash of its prompt (all pairs of a prompt together). An
example that cannot train is an error naming it, found while tokenizing (before any training
worker starts): an empty answer, a prompt that leaves no room for the answer in data.seq_len. A pair
whose two answers are equal teaches nothing and is left out; data where every pair is such is an error.
"""

from __future__ import annotations

import functools

import numpy as np

from raylm.data.sft import IGNORE, collate, encode, is_val
from raylm.data.sft import examples as file_examples
from raylm.data.sources import BadExample, shown
from raylm.spec.sft import SFTDataSpec


def examples(spec: SFTDataSpec):
    """A Ray Dataset of the raw examples (a generated task's, or the files')."""
    if spec.generate is None:
        return file_examples(spec)
    import ray.data

    from raylm.data.tasks import generate

    task = spec.generate
    return ray.data.from_items(generated(generate(task.task, task.examples, task.seed, 2), spec))


def generated(task_rows: list[dict], spec: SFTDataSpec) -> list[dict]:
    """Preference examples from a generated task's 2-choice rows: the right answer chosen, the wrong
    one rejected; for kto, each example's right or wrong answer (alternately) with its label."""
    out = []
    for i, row in enumerate(task_rows):
        right, wrong = row["choices"][row["answer"]], row["choices"][1 - row["answer"]]
        if spec.format == "kto":
            desirable = i % 2 == 0
            out.append(
                {
                    spec.prompt_field: row["prompt"],
                    spec.completion_field: right if desirable else wrong,
                    spec.label_field: desirable,
                }
            )
        else:
            out.append(
                {spec.prompt_field: row["prompt"], spec.chosen_field: right, spec.rejected_field: wrong}
            )
    return out


def render_prompt(prompt, spec: SFTDataSpec, tokenizer, before: list | None = None) -> str:
    """The prompt's text: as given, or messages (plus the answer's earlier messages) through the chat
    template with its generation prompt."""
    if isinstance(prompt, str) and not before:
        return prompt
    messages = (
        [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _prompt_messages(prompt)
    ) + (before or [])
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, chat_template=spec.chat_template
    )


def _messages(value) -> list[dict]:
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]


def _prompt_messages(prompt) -> list[dict]:
    try:
        return _messages(prompt)
    except (KeyError, TypeError):
        raise BadExample(f"a prompt {shown(prompt)} is neither text nor {{role, content}} messages") from None


def split_answer(answer, field: str, prompt) -> tuple[str, list]:
    """(the answer's text, the messages before it that join the prompt)."""
    if isinstance(answer, str):
        return answer, []
    try:
        messages = _messages(answer)
    except (KeyError, TypeError):
        raise BadExample(
            f"the example with prompt {shown(prompt)}: {field} must be text or {{role, content}} messages"
        ) from None
    if not messages or messages[-1]["role"] != "assistant":
        raise BadExample(
            f"the example with prompt {shown(prompt)}: {field} must be text or messages ending with an "
            "assistant message"
        )
    return messages[-1]["content"], messages[:-1]


def example_texts(row: dict, spec: SFTDataSpec, tokenizer) -> tuple[str, list[str]]:
    """(prompt, [chosen, rejected]) or (prompt, [completion]) of one example, as text."""
    prompt = row[spec.prompt_field]
    if isinstance(prompt, np.ndarray):
        prompt = list(prompt)
    if not isinstance(prompt, (str, list)):
        raise BadExample(f"an example's {spec.prompt_field} is {prompt!r}: text or chat messages expected")
    fields = [spec.completion_field] if spec.format == "kto" else [spec.chosen_field, spec.rejected_field]
    answers, before = [], None
    for field in fields:
        value = row[field]
        if not isinstance(value, (str, list, np.ndarray)):
            raise BadExample(f"the example with prompt {shown(prompt)}: no {field} answer (found {value!r})")
        text, earlier = split_answer(list(value) if isinstance(value, np.ndarray) else value, field, prompt)
        if not text.strip():
            raise BadExample(f"the example with prompt {shown(prompt)}: its {field} answer is empty")
        if before is not None and earlier != before:
            raise BadExample(
                f"the example with prompt {shown(prompt)}: chosen and rejected differ before their last "
                "message; the conversation before the answer must be the same"
            )
        before = earlier
        answers.append(text)
    return render_prompt(prompt, spec, tokenizer, before), answers


def encoded_answer(prompt: str, answer: str, tokenizer, spec: SFTDataSpec) -> tuple[list[int], list[int]]:
    ids, labels = encode(prompt, answer, tokenizer, spec)
    if all(label == IGNORE for label in labels[1:]):
        raise BadExample(
            f"the example with prompt {shown(prompt)}: the prompt fills data.seq_len ({spec.seq_len} "
            "tokens), leaving no room for the answer; raise data.seq_len or shorten the prompt"
        )
    return ids, labels


def held(prompt: str, spec: SFTDataSpec) -> bool:
    """In the validation split, by a hash of the prompt: every pair of a prompt (and KTO's desirable
    and undesirable completions of it) lands in the same split, so the held-out prompts are unseen."""
    return is_val(prompt, "", spec.val_fraction)


def desirable(value, prompt) -> bool:
    if isinstance(value, (bool, np.bool_)) or value in (0, 1):
        return bool(value)
    raise BadExample(f"the example with prompt {shown(prompt)}: label {value!r} is not true or false")


def preference_rows(batch: dict, tokenizer, spec: SFTDataSpec):
    """Token rows of a batch of examples, each split's own (`val` marks the validation rows)."""
    columns = list(batch)
    n = len(batch[columns[0]]) if columns else 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = {False: [], True: []}
    for i in range(n):
        row = {c: batch[c][i] for c in columns}
        try:
            prompt, answers = example_texts(row, spec, tokenizer)
            if spec.format == "preference" and answers[0] == answers[1]:
                continue  # no preference to learn
            encoded = [encoded_answer(prompt, answer, tokenizer, spec) for answer in answers]
            label = desirable(row[spec.label_field], prompt) if spec.format == "kto" else None
        except BadExample as err:  # reported by the driver (raylm.data.cache.write), without a traceback
            yield bad_row(str(err), spec)
            return
        examples[held(prompt, spec)].append((prompt, answers, encoded, label))
    for val, rows in examples.items():
        if not rows:
            continue
        if spec.format == "kto":
            # the KL estimate's mismatched pairs: each prompt with the previous example's completion
            shifted = [rows[-1]] + rows[:-1]
            pairs = [
                [encoded[0], encode(prompt, other[1][0], tokenizer, spec)]
                for (prompt, _, encoded, _), other in zip(rows, shifted, strict=True)
            ]
            extra = {"desirable": np.asarray([int(r[3]) for r in rows], dtype=np.int64)}
        else:
            pairs = [encoded for _, _, encoded, _ in rows]
            extra = {"pair": np.ones(len(rows), dtype=np.int64)}
        parts = [collate(p, spec.seq_len, pad) for p in pairs]
        out = {key: np.stack([p[key] for p in parts]) for key in parts[0]}
        yield {**out, **extra, "val": np.full(len(rows), val), "bad": np.full(len(rows), "", dtype=object)}


def bad_row(message: str, spec: SFTDataSpec) -> dict:
    """One row naming an example that cannot train, with every column a good batch has: Ray Data may
    merge it into one block with the task's earlier good rows, which needs one schema."""
    shape = (1, 2, spec.seq_len)
    extra = "desirable" if spec.format == "kto" else "pair"
    return {
        "input_ids": np.zeros(shape, dtype=np.int64),
        "labels": np.full(shape, IGNORE, dtype=np.int64),
        "attention_mask": np.zeros(shape, dtype=np.int64),
        extra: np.zeros(1, dtype=np.int64),
        "val": np.zeros(1, dtype=bool),
        "bad": np.asarray([message], dtype=object),
    }


def token_rows(records, tokenizer, spec: SFTDataSpec):
    """The examples' token rows (both splits, `val` marking the validation rows)."""
    fn = functools.partial(preference_rows, tokenizer=tokenizer, spec=spec)
    return records.map_batches(fn, batch_size=512, batch_format="numpy")


def held_out(records, tokenizer, spec: SFTDataSpec, limit: int) -> list[tuple[str, str]]:
    """Up to `limit` (prompt, preferred answer) pairs of the validation split, for exact match: the
    chosen answers (kto: the desirable completions)."""
    found = []
    for batch in records.iter_batches(batch_size=256, batch_format="numpy"):
        columns = list(batch)
        for i in range(len(batch[columns[0]])):
            row = {c: batch[c][i] for c in columns}
            prompt, answers = example_texts(row, spec, tokenizer)
            if not held(prompt, spec):
                continue
            if spec.format == "kto" and not desirable(row[spec.label_field], prompt):
                continue
            found.append((prompt, answers[0]))
            if len(found) >= limit:
                return found
    return found
