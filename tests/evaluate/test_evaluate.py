"""`kind: evaluate` on real local Ray: a base model and a LoRA adapter over it side by side, checked
against references computed here with transformers and PEFT directly: perplexity is exp of the
token-weighted mean of the model's own cross-entropy (transformers' loss), exact match is the share of
transformers' greedy `generate` answers equal to the reference, choice accuracy the share of examples
whose right choice (its tokens and EOS) has the largest mean log-probability."""

import json
import math

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner

from raylm import cli
from raylm.data.tasks import generate
from raylm.spec.loading import validate_dict
from raylm.submit import run_here

TEXTS = [f"Once upon a time a fox number {i} found {i * 7 % 13} apples." for i in range(12)]


@pytest.fixture(scope="module")
def adapter(sft_base, tmp_path_factory):
    """A LoRA adapter over sft_base, initialised away from identity (so it changes the outputs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(sft_base),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    folder = tmp_path_factory.mktemp("lora") / "adapter"
    model.save_pretrained(folder)
    return folder


def reference_model(sft_base, adapter=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sft_base)
    return (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()


def reference_perplexity(model, tokenizer, seq_len: int) -> float:
    """Every document's tokens then EOS, concatenated, cut into seq_len blocks (the remainder dropped);
    transformers' own loss per block, weighted by its predicted tokens."""
    stream = [
        t
        for text in TEXTS
        for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ]
    blocks = [stream[i : i + seq_len] for i in range(0, len(stream) // seq_len * seq_len, seq_len)]
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([b]), labels=torch.tensor([b])).loss.item() for b in blocks]
    return math.exp(sum(loss * (seq_len - 1) for loss in losses) / (len(blocks) * (seq_len - 1)))


def reference_answers(model, tokenizer, rows, max_new_tokens: int) -> list[str]:
    """transformers' greedy `generate` for each prompt (BOS + prompt, as fine-tuning renders it)."""
    answers = []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([[tokenizer.bos_token_id, *prompt]])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return answers


def reference_choices(model, tokenizer, rows) -> list[str]:
    """For each example, the choice whose tokens and EOS have the largest mean log-probability (what
    fine-tuning's choice accuracy picks)."""
    picked = []
    for row in rows:
        context = [tokenizer.bos_token_id, *tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]]
        scores = []
        for option in row["choices"]:
            tail = [*tokenizer(option, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
            with torch.no_grad():
                logp = torch.log_softmax(
                    model(input_ids=torch.tensor([context + tail])).logits[0].float(), -1
                )
            scores.append(sum(logp[len(context) - 1 + k, t].item() for k, t in enumerate(tail)) / len(tail))
        picked.append(row["choices"][max(range(len(scores)), key=scores.__getitem__)])
    return picked


def write_harness_tasks(folder):
    """Two lm-eval task YAMLs over local JSONL files (relative to the folder): multiple choice scored by
    accuracy, and greedy generation scored by exact match."""
    folder.mkdir()
    mc = generate("arithmetic", 20, seed=5, choices=3)
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    qa = generate("arithmetic", 6, seed=6)
    (folder / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    local = {"dataset_path": "json", "test_split": "test", "doc_to_text": "prompt"}
    (folder / "arith_mc.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "arith_mc",
                **local,
                "dataset_kwargs": {"data_files": {"test": "mc.jsonl"}},
                "output_type": "multiple_choice",
                "doc_to_choice": "choices",
                "doc_to_target": "answer",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            }
        )
    )
    (folder / "arith_qa.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "arith_qa",
                **local,
                "dataset_kwargs": {"data_files": {"test": "qa.jsonl"}},
                "output_type": "generate_until",
                "doc_to_target": "completion",
                "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            }
        )
    )
    return folder


def direct_harness(folder, model_args: str) -> dict:
    """lm_eval.simple_evaluate on a model folder by lm-eval's own loading (the reference)."""
    import os

    import lm_eval
    from lm_eval.tasks import TaskManager

    before = os.getcwd()
    os.chdir(folder)  # the YAMLs' data_files are relative to their folder
    try:
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args=model_args,
            tasks=["arith_mc", "arith_qa"],
            task_manager=TaskManager(include_path=str(folder), include_defaults=False),
            bootstrap_iters=0,
        )
    finally:
        os.chdir(before)
    return out["results"]


def test_models_side_by_side_equal_the_references(ray_local, sft_base, adapter, tmp_path, capsys):
    from transformers import AutoTokenizer

    corpus = tmp_path / "heldout.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    qa = tmp_path / "qa.jsonl"
    qa_rows = generate("arithmetic", 6, seed=3)
    qa.write_text("".join(json.dumps(r) + "\n" for r in qa_rows))
    mc = tmp_path / "mc.jsonl"
    mc_rows = generate("arithmetic", 5, seed=4, choices=3)
    mc.write_text("".join(json.dumps(r) + "\n" for r in mc_rows))
    harness = write_harness_tasks(tmp_path / "tasks")
    spec = {
        "kind": "evaluate",
        "models": [str(sft_base), {"name": "lora", "path": str(adapter), "base": str(sft_base)}],
        "harness": {"tasks": ["arith_mc", "arith_qa"], "include_path": str(harness)},
        "perplexity": {"data": {"path": str(corpus), "seq_len": 16}},
        "tasks": [
            {"name": "qa", "data": {"path": str(qa)}, "max_new_tokens": 6},
            {"name": "mc", "data": {"path": str(mc), "format": "choices", "num_choices": 3}},
        ],
        "output": str(tmp_path / "eval"),
    }
    summary = run_here(validate_dict(spec))
    printed = capsys.readouterr().out
    rows = {r["model"]: r for r in pq.read_table(tmp_path / "eval" / "results.parquet").to_pylist()}
    assert list(rows) == [sft_base.name, "lora"]
    assert summary["metrics"] == ["perplexity", "qa", "mc", "arith_mc.acc", "arith_qa.exact_match"]
    tokenizer = AutoTokenizer.from_pretrained(sft_base)
    answers = pq.read_table(tmp_path / "eval" / "answers.parquet").to_pylist()
    for name, model in (
        (sft_base.name, reference_model(sft_base)),
        ("lora", reference_model(sft_base, adapter)),
    ):
        row = rows[name]
        assert row["perplexity"] == pytest.approx(reference_perplexity(model, tokenizer, 16), rel=1e-5)
        mine = {t: [a for a in answers if a["model"] == name and a["task"] == t] for t in ("qa", "mc")}
        expected = reference_answers(model, tokenizer, qa_rows, 6)
        assert [a["answer"] for a in mine["qa"]] == expected
        assert (
            row["qa"]
            == sum(a.strip() == r["completion"].strip() for a, r in zip(expected, qa_rows, strict=True)) / 6
        )
        picked = reference_choices(model, tokenizer, mc_rows)
        assert [a["answer"] for a in mine["mc"]] == picked
        assert (
            row["mc"] == sum(p == r["choices"][r["answer"]] for p, r in zip(picked, mc_rows, strict=True)) / 5
        )
    assert rows["lora"]["perplexity"] != rows[sft_base.name]["perplexity"]  # the adapter is not identity
    # the table: one line per model, the second with its differences to the first
    lora_line = next(line for line in printed.splitlines() if line.startswith("[raylm] lora "))
    assert f"({rows['lora']['perplexity'] - rows[sft_base.name]['perplexity']:+.4f})" in lora_line
    assert len(answers) == 2 * (6 + 5 + 20 + 6)
    # lm-evaluation-harness through raylm equals lm-eval run directly on the same folders
    for name, model_args in (
        (sft_base.name, f"pretrained={sft_base},device=cpu"),
        ("lora", f"pretrained={sft_base},peft={adapter},device=cpu"),
    ):
        direct = direct_harness(harness, model_args)
        assert rows[name]["arith_mc.acc"] == direct["arith_mc"]["acc,none"]
        assert rows[name]["arith_qa.exact_match"] == direct["arith_qa"]["exact_match,none"]
    picked = [a for a in answers if a["model"] == "lora" and a["task"] == "arith_mc"]
    assert sum(a["correct"] for a in picked) == round(20 * rows["lora"]["arith_mc.acc"])
    assert sum(a["correct"] for a in answers if a["model"] == "lora" and a["task"] == "qa") == round(
        6 * rows["lora"]["qa"]
    )
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == summary["models"]
    assert yaml.safe_load((tmp_path / "eval" / "spec.yaml").read_text())["kind"] == "evaluate"
    # the same spec again: the recorded result, nothing evaluated
    again = run_here(validate_dict(spec))
    assert again == json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert "already holds this evaluation" in capsys.readouterr().out


def write(tmp_path, spec) -> str:
    file = tmp_path / "spec.yaml"
    file.write_text(yaml.safe_dump(spec))
    return str(file)


@pytest.mark.quick
def test_bad_evaluate_specs_name_the_field(tmp_path):
    runner = CliRunner()
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # what the preflight looks for; nothing is loaded
    base = {"kind": "evaluate", "models": [str(model)], "output": str(tmp_path / "out")}
    result = runner.invoke(cli.main, ["validate", write(tmp_path, base)])
    assert result.exit_code == 2 and "nothing to evaluate" in result.output
    task = {"name": "qa", "data": {"generate": {"task": "arithmetic", "examples": 10}}}
    twice = {**base, "models": [str(model), str(model)], "tasks": [task]}
    result = runner.invoke(cli.main, ["validate", write(tmp_path, twice)])
    assert result.exit_code == 2 and "give each a `name`" in result.output
    missing = {**base, "models": [str(model), str(tmp_path / "nope")], "tasks": [task]}
    result = runner.invoke(cli.main, ["validate", write(tmp_path, missing)])
    assert result.exit_code == 2 and "models.1.path" in result.output and "does not exist" in result.output
    assert "models.0" not in result.output
    taken = {**base, "tasks": [{**task, "name": "perplexity"}]}
    result = runner.invoke(cli.main, ["validate", write(tmp_path, taken)])
    assert result.exit_code == 2 and "tasks.0.name" in result.output and "choose another" in result.output
    no_split = {
        **base,
        "perplexity": {"data": {"generate": {"documents": 10}, "val_fraction": 0}, "split": "validation"},
    }
    result = runner.invoke(cli.main, ["validate", write(tmp_path, no_split)])
    assert result.exit_code == 2 and "val_fraction > 0" in result.output
    tasks = write_harness_tasks(tmp_path / "tasks")
    typo = {**base, "harness": {"tasks": ["arith_mc", "arith_mcq"], "include_path": str(tasks)}}
    result = runner.invoke(cli.main, ["validate", write(tmp_path, typo)])
    assert result.exit_code == 2 and "harness.tasks.1: lm-eval knows no task 'arith_mcq'" in result.output
    assert "did you mean 'arith_mc'" in result.output and "harness.tasks.0" not in result.output
    gone = {**base, "harness": {"tasks": ["arith_mc"], "include_path": str(tmp_path / "nowhere")}}
    result = runner.invoke(cli.main, ["validate", write(tmp_path, gone)])
    assert result.exit_code == 2 and "harness.include_path" in result.output
    no_file = {**base, "tasks": [{"name": "qa", "data": {"path": str(tmp_path / "none.jsonl")}}]}
    result = runner.invoke(cli.main, ["validate", write(tmp_path, no_file)])
    assert result.exit_code == 2 and "tasks.0.data.path" in result.output
    assert "Traceback" not in result.output
