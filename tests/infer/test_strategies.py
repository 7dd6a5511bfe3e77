"""Prompting strategies: the loops of fewshot / cot / pal / react driven by scripted model text (the
loop logic only; PAL's sandbox has its own tests in test_sandbox.py); the ReAct tools, bounded
against hostile input; and `raylm generate --strategy` on a real tiny model, whose answers may be
wrong but never crash the command."""

import json

import pytest
from click.testing import CliRunner

from raylm import cli
from raylm.infer import strategies
from raylm.infer.tools import DocumentSearch, ToolError, calculate, default_tools
from raylm.spec.generation import StrategySpec

EXEMPLARS = "jobs/exemplars"


# ---- the loops, driven by scripted text ---------------------------------------------------------


class Script:
    """Replays fixed model outputs in order and records the prompts and stops it was given."""

    def __init__(self, *outputs):
        self.outputs, self.calls = list(outputs), []

    def __call__(self, prompt, stop):
        self.calls.append((prompt, stop))
        return self.outputs.pop(0)


def run(name, script, question="Q?", **settings):
    spec = StrategySpec(name=name, **settings)
    exemplars, tools = strategies.prepare(spec)
    return strategies.run(spec, question, script, exemplars, tools)


@pytest.mark.quick
def test_fewshot_puts_the_exemplars_before_the_question_and_takes_one_line():
    script = Script(" Rome")
    outcome = run(
        "fewshot", script, "What is the capital of Italy?", exemplars=f"{EXEMPLARS}/capitals-fewshot.jsonl"
    )
    prompt, stop = script.calls[0]
    assert prompt.startswith("Question: What is the capital of France?\nAnswer: Paris\n\n")
    assert prompt.endswith("Question: What is the capital of Italy?\nAnswer:") and stop == ["\n"]
    assert outcome.answer == "Rome"


@pytest.mark.quick
def test_cot_extracts_the_answer_from_the_reasoning():
    outcome = run(
        "cot",
        Script(" 2 boxes of 6 is 12, plus 3 is 15. The answer is 15."),
        exemplars=f"{EXEMPLARS}/arithmetic-cot.jsonl",
    )
    assert outcome.answer == "15"
    zero_shot = Script(" I count them. So the answer is 4")
    assert run("cot", zero_shot).answer == "4"
    assert zero_shot.calls[0][0].endswith("Let's think step by step.")
    missing = run("cot", Script(" I am not sure."))
    assert missing.answer is None and "The answer is" in missing.error


@pytest.mark.quick
def test_pal_runs_the_written_program_and_reports_failures_as_answers():
    script = Script("total = 17 * 23 + 4\nprint(total)\n")
    outcome = run("pal", script, exemplars=f"{EXEMPLARS}/arithmetic-pal.jsonl")
    assert outcome.answer == "395" and script.calls[0][1] == ["```"]
    assert script.calls[0][0].endswith("```python\n")
    looping = run("pal", Script("while True: pass"), timeout_s=1.0)
    assert looping.answer is None and "time limit" in looping.error
    broken = run("pal", Script("print(1/0)"))
    assert broken.answer is None and "ZeroDivisionError" in broken.error


@pytest.mark.quick
def test_react_calls_tools_and_keeps_the_trace(tmp_path):
    (tmp_path / "rivers.md").write_text("The Danube flows through ten countries.\n\nThe Nile is long.")
    (tmp_path / "cities.txt").write_text("Vienna lies on the Danube.")
    script = Script(
        " I should look it up.\nAction: search[Danube countries]",
        " Ten countries. Now double it.\nAction: calculator[10 * 2]",
        " Done.\nFinal Answer: 20",
    )
    outcome = run(
        "react",
        script,
        "Twice the Danube's countries?",
        documents=str(tmp_path),
        exemplars=f"{EXEMPLARS}/react.jsonl",
    )
    assert outcome.answer == "20"
    assert [s.get("action") for s in outcome.steps] == ["search", "calculator", None]
    assert outcome.steps[0]["observation"] == "[rivers.md] The Danube flows through ten countries."
    assert outcome.steps[1]["observation"] == "20"
    assert "Observation: 20\nThought: Done.\nFinal Answer: 20" in outcome.text
    assert script.calls[1][0].endswith(
        "Action: search[Danube countries]\nObservation: [rivers.md] The Danube "
        "flows through ten countries.\nThought:"
    )
    assert "- search:" in script.calls[0][0] and "Question: What is 15% of 240?" in script.calls[0][0]


@pytest.mark.quick
def test_react_stops_at_the_step_limit_and_reports_bad_actions():
    script = Script(
        "Action: weather[Paris]",
        "I wonder.",
        "Action: calculator[1/0]",
        "Action: calculator[((10**1000)**1000)**1000]",
    )
    outcome = run("react", script, max_steps=4)
    assert outcome.answer is None and "step limit" in outcome.error
    assert [s["observation"] for s in outcome.steps] == [
        "unknown tool 'weather'; the tools are: calculator",
        "no Action found: write 'Action: tool[input]' or 'Final Answer: ...'",
        "error: division by zero",
        "error: result too large (more than 4000 bits)",
    ]


@pytest.mark.quick
def test_tools():
    assert calculate("2 ^ 10 + sqrt(16)") == "1028" and calculate("7 / 2") == "3.5"
    assert calculate("2 ** 1000") == str(2**1000) and calculate("-(10 ** 300) * 10 ** 300") == str(-(10**600))
    for bad, reason in [
        ("__import__('os')", "only numbers"),
        ("open('x')", "only numbers"),
        ("2 ** 100000", "exponent too large"),
        ("(10**1000)**5", "result too large"),  # each power is small; the result is not
        ("((10**1000)**1000)**1000", "result too large"),
        ("10**1000 * 10**1000 * 10**1000 * 10**1000", "result too large"),
        ("(10**1000) / 3", "too large for a float"),
        ("(" * 400 + "1" + ")" * 400, "nested"),
        ("1 + " * 2000 + "1", "too long"),
    ]:
        with pytest.raises(ToolError, match=reason):
            calculate(bad)
    assert set(default_tools()) == {"calculator"}
    with pytest.raises(strategies.StrategyError, match="line 1"):
        strategies.load_exemplars(f"{EXEMPLARS}/arithmetic-pal.jsonl", "cot")


@pytest.mark.quick
def test_document_search_ranks_by_bm25(tmp_path):
    (tmp_path / "a.txt").write_text("cats and dogs\n\ncats cats cats")
    (tmp_path / "b.md").write_text("the rare word zebra")
    search = DocumentSearch(tmp_path)
    assert search("zebra") == "[b.md] the rare word zebra"
    assert search("cats") == "[a.txt] cats cats cats"
    assert search("unicorn") == "no document mentions 'unicorn'"


# ---- on a real tiny model through the CLI -------------------------------------------------------


def test_generate_with_each_strategy_on_a_real_model(reference_run, tmp_path):
    (tmp_path / "doc.txt").write_text("the cat sat on the mat")
    model = str(reference_run[0])
    for flags in (
        ["--strategy", "fewshot", "--exemplars", f"{EXEMPLARS}/capitals-fewshot.jsonl"],
        ["--strategy", "cot", "--exemplars", f"{EXEMPLARS}/arithmetic-cot.jsonl"],
        ["--strategy", "pal", "--timeout-s", "2"],
        ["--strategy", "react", "--documents", str(tmp_path), "--max-steps", "2"],
    ):
        result = CliRunner().invoke(
            cli.main, ["generate", model, "--prompt", "the cat", "--max-new-tokens", "8", "--json", *flags]
        )
        assert result.exit_code == 0, result.output
        row = json.loads(result.output.strip().splitlines()[-1])
        assert row["strategy"] == flags[1] and (row["answer"] is not None or row["error"]), row
    # the model's context (32 tokens) cannot hold the exemplars: an error answer, not a traceback
    assert "exceed the model's context" in row["error"] or row["answer"] is not None


@pytest.mark.quick
def test_strategy_flags_are_checked():
    runner = CliRunner()
    for flags, message in (
        (["--strategy", "fewshot"], "needs exemplars"),
        (["--max-steps", "3"], "add --strategy"),
        (["--strategy", "cot", "--exemplars", "missing.jsonl"], "cannot read it"),
        (["--strategy", "react", "--max-steps", "0"], "--max-steps"),
    ):
        result = runner.invoke(cli.main, ["generate", "nowhere", "--prompt", "x", *flags])
        assert result.exit_code == 2 and message in result.output, (flags, result.output)
