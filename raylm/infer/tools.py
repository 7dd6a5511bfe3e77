"""Tools a ReAct loop can call: `Action: name[input]` -> an observation string.

    tools = default_tools(documents="docs/")      # {"calculator": ..., "search": ...}
    tools["calculator"].run("12 * (3 + 4)")       # "84"

A tool is a name, a one-line description (it goes into the prompt) and a function of one string.
Add one by putting another `Tool` into the dict that the strategy receives.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    run: Callable[[str], str]


class ToolError(ValueError):
    """The tool could not answer this input; the message becomes the observation."""


# ---- calculator: arithmetic only, evaluated on the syntax tree (never eval) ------------------------

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "log": math.log, "exp": math.exp, "abs": abs, "round": round}
_CONSTANTS = {"pi": math.pi, "e": math.e}
# Bounds that keep one call to microseconds and kilobytes whatever the model writes: an integer
# result of at most MAX_BITS (about 1200 digits), checked before a power is computed.
MAX_LENGTH = 1000  # characters of expression
MAX_BITS = 4000


def calculate(expression: str) -> str:
    text = expression.strip().replace("^", "**").replace(",", "")
    if len(text) > MAX_LENGTH:
        raise ToolError(f"expression too long (at most {MAX_LENGTH} characters)")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as err:
        raise ToolError(f"not an arithmetic expression ({err.msg}): {expression[:80]!r}") from None
    except ValueError:  # e.g. a null byte
        raise ToolError(f"not an arithmetic expression: {expression[:80]!r}") from None
    except (RecursionError, MemoryError):
        raise ToolError("expression nested too deeply") from None
    try:
        value = _evaluate(tree.body)
    except RecursionError:
        raise ToolError("expression nested too deeply") from None
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(value)


def _evaluate(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            return _bounded(_BINARY[type(node.op)](left, right))
        except (ZeroDivisionError, OverflowError, ValueError) as err:
            raise ToolError(str(err)) from None
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCTIONS
        and not node.keywords
    ):
        try:  # one argument each: commas were removed above (thousands separators)
            return _bounded(_FUNCTIONS[node.func.id](*[_evaluate(a) for a in node.args]))
        except (TypeError, ValueError, OverflowError) as err:
            raise ToolError(f"{node.func.id}: {err}") from None
    raise ToolError(
        "only numbers, + - * / // % ** and sqrt, log, exp, abs, round, pi, e are allowed; "
        f"got {ast.unparse(node)!r}"
    )


def _check_power(base, exponent) -> None:
    if abs(exponent) > 1000:
        raise ToolError("exponent too large (at most 1000)")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if (abs(base).bit_length() - 1) * exponent > MAX_BITS:  # a lower bound of the result's size
            raise ToolError(f"result too large (more than {MAX_BITS} bits)")


def _bounded(value):
    if isinstance(value, int) and value.bit_length() > MAX_BITS:
        raise ToolError(f"result too large (more than {MAX_BITS} bits)")
    return value


# ---- search over a local folder of documents ---------------------------------------------------

_WORD = re.compile(r"\w+")


class DocumentSearch:
    """Ranks the paragraphs of the .txt / .md files under a folder by BM25 against the query and
    returns the best one with its file name."""

    def __init__(self, folder: str | Path, k1: float = 1.5, b: float = 0.75):
        self.passages: list[tuple[str, str]] = []  # (file, paragraph)
        root = Path(folder)
        for file in sorted(p for p in root.rglob("*") if p.suffix in (".txt", ".md") and p.is_file()):
            text = file.read_text(encoding="utf-8", errors="replace")
            for paragraph in re.split(r"\n\s*\n", text):
                if paragraph.strip():
                    self.passages.append((str(file.relative_to(root)), " ".join(paragraph.split())))
        self.counts = [Counter(_WORD.findall(p.lower())) for _, p in self.passages]
        self.lengths = [sum(c.values()) for c in self.counts]
        self.average = sum(self.lengths) / max(len(self.lengths), 1)
        self.document_frequency = Counter(term for c in self.counts for term in c)
        self.k1, self.b = k1, b

    def score(self, index: int, terms: list[str]) -> float:
        counts, n = self.counts[index], len(self.passages)
        total = 0.0
        for term in terms:
            tf = counts.get(term, 0)
            if not tf:
                continue
            df = self.document_frequency[term]
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            norm = self.k1 * (1 - self.b + self.b * self.lengths[index] / max(self.average, 1e-9))
            total += idf * tf * (self.k1 + 1) / (tf + norm)
        return total

    def __call__(self, query: str) -> str:
        terms = _WORD.findall(query.lower())
        if not terms:
            raise ToolError("empty search query")
        scores = [self.score(i, terms) for i in range(len(self.passages))]
        if not scores or max(scores) <= 0:
            return f"no document mentions {query!r}"
        best = max(range(len(scores)), key=scores.__getitem__)
        file, passage = self.passages[best]
        return f"[{file}] {passage[:600]}"


def default_tools(documents: str | Path | None = None) -> dict[str, Tool]:
    tools = {
        "calculator": Tool("calculator", "evaluates an arithmetic expression, e.g. 12 * (3 + 4)", calculate)
    }
    if documents is not None:
        tools["search"] = Tool(
            "search",
            "finds the passage of the local documents that best matches the words given",
            DocumentSearch(documents),
        )
    return tools
