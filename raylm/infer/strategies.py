"""Prompting strategies around a model's completions: few-shot, chain-of-thought, PAL and ReAct.

    raylm generate runs/sft --strategy cot --exemplars jobs/exemplars/arithmetic-cot.jsonl --prompt "..."
    raylm generate runs/sft --strategy pal --prompt "What is 17 * 23 + 4?"
    raylm generate runs/sft --strategy react --documents docs/ --prompt "When was ...?"

Each strategy is one function of (spec, question, complete, exemplars, tools) where `complete(prompt,
stop) -> text` is the model (any generation controls already applied); it returns an `Outcome`: the
extracted answer (None when there is none), the model's text or the ReAct trace, and an error that says
why an answer is missing. A strategy never raises for what the model wrote.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

Complete = Callable[[str, list[str]], str]


class StrategyError(ValueError):
    """The strategy's inputs (exemplars file, documents folder) are unusable; the message says why."""


@dataclass
class Outcome:
    answer: str | None
    text: str
    error: str | None = None
    steps: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


REQUIRED = {"fewshot": ("question", "answer"), "cot": ("question", "reasoning", "answer"),
            "pal": ("question", "program"), "react": ("question", "trace")}  # fmt: skip


def load_exemplars(path: str | Path | None, strategy: str) -> list[dict]:
    if path is None:
        return []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise StrategyError(f"exemplars {path}: cannot read it ({err})") from None
    exemplars = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise StrategyError(f"exemplars {path} line {number}: not JSON ({err})") from None
        missing = [
            k for k in REQUIRED[strategy] if not isinstance(row, dict) or not isinstance(row.get(k), str)
        ]
        if missing:
            raise StrategyError(
                f"exemplars {path} line {number}: {strategy} needs text fields {', '.join(REQUIRED[strategy])}; "
                f"missing or not text: {', '.join(missing)}"
            )
        exemplars.append(row)
    if not exemplars:
        raise StrategyError(f"exemplars {path}: no examples in it")
    return exemplars


def fewshot(spec, question: str, complete: Complete, exemplars: list[dict], tools=None) -> Outcome:
    shots = "".join(f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in exemplars)
    text = complete(f"{shots}Question: {question}\nAnswer:", ["\n"])
    answer = text.strip()
    return Outcome(answer or None, text, None if answer else "the model gave an empty answer")


ANSWER_IS = re.compile(r"the answer is[:\s]*(.+?)\s*(?:\.\s|\.?$|\n)", re.IGNORECASE)


def cot(spec, question: str, complete: Complete, exemplars: list[dict], tools=None) -> Outcome:
    shots = "".join(
        f"Question: {e['question']}\nAnswer: {e['reasoning']} The answer is {e['answer']}.\n\n"
        for e in exemplars
    )
    cue = "" if exemplars else " Let's think step by step."  # zero-shot CoT (Kojima et al., 2022)
    text = complete(f"{shots}Question: {question}\nAnswer:{cue}", ["\nQuestion:", "\n\n"])
    found = ANSWER_IS.findall(text)
    if not found:
        return Outcome(None, text, "no 'The answer is ...' in the model's reasoning")
    return Outcome(found[-1].strip(), text)


PAL_INSTRUCTION = "Write a Python program that prints the answer to the question.\n\n"


def pal(spec, question: str, complete: Complete, exemplars: list[dict], tools=None) -> Outcome:
    from raylm.infer.sandbox import run_program

    shots = "".join(
        f"Question: {e['question']}\n```python\n{e['program'].rstrip()}\n```\n\n" for e in exemplars
    )
    program = complete(f"{PAL_INSTRUCTION}{shots}Question: {question}\n```python\n", ["```"])
    confine = spec.sandbox == "kernel"
    result = run_program(program, timeout_s=spec.timeout_s, memory_mb=spec.memory_mb, confine=confine)
    step = {"program": program, "stdout": result.stdout, "error": result.error}
    if not result.ok:
        return Outcome(None, program, f"the program failed: {result.error}", [step])
    if result.answer is None:
        return Outcome(None, program, "the program printed nothing", [step])
    return Outcome(result.answer, program, None, [step])


ACTION = re.compile(r"Action:\s*([\w-]+)\s*\[(.*)\]\s*$", re.MULTILINE)
FINAL = re.compile(r"Final Answer:\s*(.*)")


def react(spec, question: str, complete: Complete, exemplars: list[dict], tools=None) -> Outcome:
    tools = tools or {}
    listing = "\n".join(f"- {t.name}: {t.description}" for t in tools.values())
    header = (
        f"Answer the question with these tools:\n{listing}\n"
        "Write 'Thought: ...', then 'Action: tool[input]'; an 'Observation: ...' follows. Repeat as "
        "needed, then write 'Final Answer: ...'.\n\n"
    )
    shots = "".join(f"Question: {e['question']}\n{e['trace'].strip()}\n\n" for e in exemplars)
    trace = "Thought:"
    steps: list[dict] = []
    for _ in range(spec.max_steps):
        text = complete(f"{header}{shots}Question: {question}\n{trace}", ["\nObservation:", "\nQuestion:"])
        trace += text
        final = FINAL.search(text)
        action = ACTION.search(text)
        if final and (action is None or final.start() < action.start()):  # whichever the model wrote first
            answer = final.group(1).strip()
            steps.append({"text": text, "final_answer": answer})
            return Outcome(answer or None, trace, None if answer else "empty final answer", steps)
        if action:
            name, argument = action.groups()
            observation = _observe(tools, name, argument.strip())
            steps.append(
                {"text": text, "action": name, "input": argument.strip(), "observation": observation}
            )
        else:
            observation = "no Action found: write 'Action: tool[input]' or 'Final Answer: ...'"
            steps.append({"text": text, "observation": observation})
        trace += f"\nObservation: {observation}\nThought:"
    return Outcome(None, trace, f"step limit: no final answer after {spec.max_steps} steps", steps)


def _observe(tools: dict, name: str, argument: str) -> str:
    from raylm.infer.tools import ToolError

    if name not in tools:
        return f"unknown tool {name!r}; the tools are: {', '.join(tools) or 'none'}"
    try:
        return tools[name].run(argument)
    except ToolError as err:
        return f"error: {err}"
    except Exception as err:  # noqa: BLE001 - a tool's own failure is an observation, not a failed request
        return f"error: {name} failed ({type(err).__name__}: {err})"


STRATEGIES = {"fewshot": fewshot, "cot": cot, "pal": pal, "react": react}


def prepare(spec) -> tuple[list[dict], dict]:
    """The exemplars and tools of a StrategySpec, read once (the server keeps them per replica)."""
    from raylm.infer.tools import default_tools

    exemplars = load_exemplars(_local(spec.exemplars, "exemplars"), spec.name)
    if spec.name == "pal" and spec.sandbox == "kernel":
        from raylm.infer import sandbox

        try:
            sandbox.check()
        except sandbox.SandboxUnavailable as err:
            raise StrategyError(f"sandbox: {err}") from None
    tools = {}
    if spec.name == "react":
        documents = _local(spec.documents, "documents")
        if documents is not None and not Path(documents).is_dir():
            raise StrategyError(f"documents {spec.documents}: not a folder")
        tools = default_tools(documents)
    return exemplars, tools


def _local(path: str | None, field: str) -> str | None:
    """An exemplars file or documents folder named by a storage URI: this node's copy of it."""
    from raylm.runtime import storage

    if path is None or not storage.is_uri(path):
        return path
    try:
        return storage.localize(path)
    except (OSError, ValueError) as err:
        raise StrategyError(f"{field} {path}: cannot fetch it ({err})") from None


def run(spec, question: str, complete: Complete, exemplars: list[dict], tools: dict) -> Outcome:
    from raylm.infer.sampling import GenerationError

    try:
        return STRATEGIES[spec.name](spec, question, complete, exemplars, tools)
    except GenerationError as err:  # the prompt (exemplars, a growing trace) outgrew the context
        return Outcome(None, "", str(err))


def step_controls(controls, stop: list[str]):
    """The controls of one strategy step: one choice, the strategy's stop sequences before the user's."""
    return controls.model_copy(update={"stop": list(dict.fromkeys([*stop, *controls.stop])), "n": 1})


def completer(model, tokenizer, controls) -> Complete:
    """`complete(prompt, stop) -> text`: the first choice under `step_controls`."""
    from raylm.infer.sampling import complete

    def run_one(prompt: str, stop: list[str]) -> str:
        return complete(model, tokenizer, prompt, step_controls(controls, stop))["choices"][0]["text"]

    return run_one
