"""Supervised data: formats render as their ecosystems do, labels cover the response only, packing,
a deterministic validation split, and input checks that name the field and the fix."""

import json

import numpy as np
import pytest

from raylm.data.sft import IGNORE, check_sft_data, encode, examples, held_out, render, token_rows
from raylm.data.sources import BadExample
from raylm.spec.sft import SFTDataSpec

CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(sft_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(sft_base)


@pytest.mark.quick
def test_alpaca_renders_with_and_without_input(tokenizer):
    spec = SFTDataSpec(path="x.jsonl", format="alpaca")
    prompt, response = render({"instruction": "Add.", "input": "2 and 3", "output": "5"}, spec, tokenizer)
    assert "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n" in prompt and response == "5"
    for empty in ("", None, float("nan")):  # a JSON null reaches here as None, or NaN from pandas
        prompt, _ = render({"instruction": "Add.", "input": empty, "output": "5"}, spec, tokenizer)
        assert "### Input" not in prompt and "paired with an input" not in prompt


@pytest.mark.quick
def test_chat_uses_the_template_and_the_last_assistant_turn(tokenizer):
    spec = SFTDataSpec(path="x.jsonl", format="chat", chat_template=CHATML)
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    prompt, response = render({"messages": messages}, spec, tokenizer)
    assert prompt == "<|user|>hi\n<|assistant|>hello\n<|user|>2+2?\n<|assistant|>" and response == "4"
    with pytest.raises(BadExample, match="must end with an assistant"):
        render({"messages": messages[:-1]}, spec, tokenizer)


@pytest.mark.quick
def test_an_example_that_cannot_train_becomes_a_row_naming_it(tokenizer):
    """A Ray Data task does not raise for a bad example (its traceback would reach the console): it
    yields one row whose `bad` column names the example; good rows hold "" there, with the same columns."""
    from raylm.data.sft import tokenize_batch

    def rows_of(rows, **fields):
        spec = SFTDataSpec(path="x.jsonl", seq_len=32, chat_template=CHATML, **fields)
        batch = {k: np.empty(len(rows), dtype=object) for k in rows[0]}  # as Ray Data hands JSON rows
        for i, row in enumerate(rows):
            for k in batch:
                batch[k][i] = row.get(k)
        return list(tokenize_batch(batch, tokenizer, spec))

    def problem(rows, **fields):
        (out,) = rows_of(rows, **fields)  # the batch ends at its bad example
        assert len(out["bad"]) == 1
        return str(out["bad"][0])

    fine = {"prompt": "1+1=", "completion": " 2"}
    assert """the example "{'prompt': '2+2=', 'completion': None}" has no completion""" == problem(
        [fine, {"prompt": "2+2=", "completion": None}]
    )
    (good,) = rows_of([fine])
    (bad,) = rows_of([{"prompt": "2+2=", "completion": None}])
    assert good["bad"].tolist() == [""] and set(good) == set(bad)
    assert good["input_ids"].shape[1:] == bad["input_ids"].shape[1:]
    assert "has no output" in problem([{"instruction": "Add.", "output": None}], format="alpaca")
    user_only = {"messages": [{"role": "user", "content": "say 150"}]}
    assert """"{'messages': [{'role': 'user', 'content': 'say 150'}]}": a chat example must end""" in problem(
        [user_only], format="chat"
    )
    assert "messages must be a list of {role, content} messages with text" in problem(
        [{"messages": "hello"}], format="chat"
    )
    row = {"prompt": "pick", "choices": ["a", "b"], "answer": 0}
    assert "has 2 choices, data.num_choices is 4" in problem([row], format="choices")
    out_of_range = {"prompt": "pick", "choices": ["a", "b", "c", "d"], "answer": 7}
    assert "its answer (7) is not the index of one of its 4 choices (0 to 3)" in problem(
        [out_of_range], format="choices"
    )
    # pandas reads an integer column with a null in it as floats: the whole ones are indices, the null
    # is the example named
    answers = [dict(out_of_range, answer=1.0), dict(out_of_range, prompt="blank", answer=float("nan"))]
    assert "'prompt': 'blank'" in problem(answers, format="choices") and "(none)" in problem(
        answers, format="choices"
    )
    # what is not text is refused, not trained as its Python spelling
    assert "its completion is \"['a', 'b']\", not text" in problem(
        [{"prompt": "p", "completion": ["a", "b"]}]
    )
    assert "its instruction is" in problem([{"instruction": {"x": 1}, "output": "o"}], format="alpaca")
    no_content = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}
    assert "messages with text" in problem([no_content], format="chat")
    a_null_choice = {"prompt": "pick", "choices": ["a", None, "c", "d"], "answer": 0}
    assert "every one of its choices must be text" in problem([a_null_choice], format="choices")


def test_a_bad_example_stops_the_cache_in_the_driver_and_leaves_nothing(ray_local, tokenizer, tmp_path):
    """Through Ray Data: the driver raises the example's problem (which the training kinds report as a
    problem of `data`, exit 2, no traceback) and no cache folder is left behind."""
    from raylm.data.cache import ensure

    rows = [{"prompt": f"{i}+1=", "completion": f" {i + 1}"} for i in range(600)]
    rows[550]["completion"] = None  # in the second batch: earlier good rows are already on their way
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = SFTDataSpec(path=str(tmp_path / "sft.jsonl"), seq_len=16)
    with pytest.raises(BadExample, match="'550\\+1=', 'completion': None}\" has no completion"):
        ensure(str(tmp_path / "cache" / "key"), lambda: token_rows(examples(spec), tokenizer, spec))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.quick
def test_labels_cover_the_response_only_unless_asked(tokenizer):
    spec = SFTDataSpec(generate={}, seq_len=64)
    ids, labels = encode("Q: 1+2=\nA:", " 3", tokenizer, spec)
    response = tokenizer(" 3", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert [t for t in labels if t != IGNORE] == response and ids[-len(response) :] == response
    _, all_labels = encode(
        "Q: 1+2=\nA:", " 3", tokenizer, SFTDataSpec(generate={}, seq_len=64, loss_on="all")
    )
    assert all_labels == ids


def test_pipeline_pads_packs_and_splits_deterministically(ray_local, tokenizer):
    spec = SFTDataSpec(generate={"examples": 300}, seq_len=32, val_fraction=0.2)
    records = examples(spec)
    rows = token_rows(records, tokenizer, spec).take_all()
    train, val = [r for r in rows if not r["val"]], [r for r in rows if r["val"]]
    assert len(train) + len(val) == 300 and 30 < len(val) < 90
    row = train[0]
    assert len(row["input_ids"]) == 32 and (row["labels"][row["attention_mask"] == 0] == IGNORE).all()
    again = [r for r in token_rows(records, tokenizer, spec).take_all() if r["val"]]
    assert [r["input_ids"].tolist() for r in again] == [r["input_ids"].tolist() for r in val]
    packed = token_rows(records, tokenizer, spec.model_copy(update={"packing": True})).take_all()
    packed = [r for r in packed if not r["val"]]
    assert len(packed) < len(train) and all(r["attention_mask"].all() for r in packed)
    pairs = held_out(records, tokenizer, spec, 5)
    assert len(pairs) == 5 and all(p.startswith("Q: ") and a.startswith(" ") for p, a in pairs)


@pytest.mark.quick
def test_input_checks_name_the_field_and_the_fix(tmp_path):
    rows = tmp_path / "sft.jsonl"
    rows.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    problems = dict(check_sft_data(SFTDataSpec(path=str(rows))))
    assert "no field 'prompt', 'completion'" in problems["data.path"]
    assert "data.prompt_field" in problems["data.path"]
    assert (
        check_sft_data(SFTDataSpec(path=str(rows), prompt_field="question", completion_field="answer")) == []
    )
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    assert (
        "blank lines only"
        in dict(check_sft_data(SFTDataSpec(path=str(tmp_path / "blank.jsonl"))))["data.path"]
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert "not JSON" in dict(check_sft_data(SFTDataSpec(path=str(bad))))["data.path"]
    assert (
        "does not exist" in dict(check_sft_data(SFTDataSpec(path=str(tmp_path / "nope.jsonl"))))["data.path"]
    )


@pytest.mark.quick
def test_rows_in_the_bucket_get_the_same_checks(object_store, tmp_path):
    from tests.runtime.test_object_store import upload

    bucket = object_store("sft-inputs")
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "sft.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    upload(tmp_path / "rows", f"{bucket}/rows")
    [(where, what)] = check_sft_data(SFTDataSpec(path=f"{bucket}/rows"))
    assert where == "data.path" and what.startswith(f"{bucket}/rows/sft.jsonl: no field 'prompt'")
    fixed = SFTDataSpec(path=f"{bucket}/rows", prompt_field="question", completion_field="answer")
    assert check_sft_data(fixed) == []
    assert "does not exist in the store" in check_sft_data(SFTDataSpec(path=f"{bucket}/gone.jsonl"))[0][1]


def test_dynamic_padding_leaves_the_loss_unchanged(tokenizer, sft_base):
    """A right-padded batch cut to its longest example gives the model's loss on the full-width batch
    (transformers' own loss, padding ignored), to float precision."""
    import torch
    from transformers import AutoModelForCausalLM

    from raylm.data.sft import collate
    from raylm.data.tasks import generate
    from raylm.train.reader import to_longest

    spec = SFTDataSpec(generate={"task": "arithmetic"}, seq_len=64)
    rows = [encode(r["prompt"], r["completion"], tokenizer, spec) for r in generate("arithmetic", 6, 3)]
    batch = {k: torch.tensor(v) for k, v in collate(rows, 64, tokenizer.pad_token_id).items()}
    cut = to_longest(batch)
    assert cut["input_ids"].shape[1] == max(len(ids) for ids, _ in rows) < 64
    model = AutoModelForCausalLM.from_pretrained(sft_base).eval()
    with torch.no_grad():
        full = model(**batch).loss
        short = model(**cut).loss
    torch.testing.assert_close(short, full, atol=1e-6, rtol=1e-6)
