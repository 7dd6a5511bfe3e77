"""Prompting strategies: PAL's sandbox stops programs that loop, allocate without bound, write outside
their folder or open sockets; the loops of fewshot / cot / pal / react driven by scripted model text
(the loop logic only); the ReAct tools; and `raylm generate --strategy` on a real tiny model, whose
answers may be wrong but never crash the command."""

import json
import socket
import threading

import pytest
from click.testing import CliRunner

from raylm import cli
from raylm.infer import strategies
from raylm.infer.sandbox import run_program
from raylm.infer.tools import DocumentSearch, ToolError, calculate, default_tools
from raylm.spec.generation import StrategySpec

EXEMPLARS = "jobs/exemplars"


# ---- the sandbox ------------------------------------------------------------------------------


@pytest.mark.quick
def test_sandbox_runs_a_program_and_returns_what_it_printed():
    result = run_program(
        "import math\nopen('scratch.txt', 'w').write('12')\nprint(math.factorial(int(open('scratch.txt').read())) % 1000)"
    )
    assert result.ok and result.answer == str(479001600 % 1000)


@pytest.mark.quick
def test_sandbox_stops_a_program_that_loops_forever():
    result = run_program("while True:\n    pass", timeout_s=1.0)
    assert not result.ok and result.error.startswith("time limit")


@pytest.mark.quick
def test_sandbox_stops_unbounded_allocation():
    result = run_program("blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))", memory_mb=128)
    assert not result.ok and result.error.startswith("memory limit")


@pytest.mark.quick
def test_sandbox_refuses_files_outside_its_folder(tmp_path):
    target = tmp_path / "escaped.txt"
    for program in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        "print(open('/etc/hostname').read())",
        f"import os\nos.rename('.', {str(tmp_path / 'moved')!r})",
    ):
        result = run_program(program)
        assert not result.ok and "PermissionError" in result.error, (program, result)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.quick
def test_sandbox_refuses_sockets_and_processes():
    # A listener here: the program must not reach it (and must fail, not hang).
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    for program in (
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}))",
        f"s = __import__('_socket').socket()\ns.connect(('127.0.0.1', {port}))",
        "import os\nos.system('true')",
        "import subprocess\nsubprocess.run(['true'])",
        "import ctypes",
    ):
        result = run_program(program)
        assert not result.ok and "not allowed" in result.error, (program, result)
    server.close()
    assert accepted == []


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
    script = Script("Action: weather[Paris]", "I wonder.", "Action: calculator[1/0]")
    outcome = run("react", script, max_steps=3)
    assert outcome.answer is None and "step limit" in outcome.error
    assert [s["observation"] for s in outcome.steps] == [
        "unknown tool 'weather'; the tools are: calculator",
        "no Action found: write 'Action: tool[input]' or 'Final Answer: ...'",
        "error: division by zero",
    ]


@pytest.mark.quick
def test_tools():
    assert calculate("2 ^ 10 + sqrt(16)") == "1028" and calculate("7 / 2") == "3.5"
    for bad in ("__import__('os')", "2 ** 100000", "open('x')"):
        with pytest.raises(ToolError):
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
