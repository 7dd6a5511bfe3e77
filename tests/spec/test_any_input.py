"""Property-based: whatever a spec file holds, every command that reads one ends with exit 0 or 2 and
no traceback. Arbitrary YAML values go in every position of every kind's spec (each strategy and each
method), and arbitrary bytes and text go in as the whole file.

The commands run in-process through click's runner (a subprocess per example would cost a second
each). `raylm run` must stop at validation or preflight: the specs point at data that does not exist,
and reaching Ray would fail the test rather than start a job.
"""

from __future__ import annotations

import copy

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raylm import cli, submit
from raylm.kinds import KINDS
from raylm.methods import METHODS
from raylm.spec.loading import validate_dict

pytestmark = pytest.mark.quick

STRATEGIES = ["ddp", "fsdp", {"name": "deepspeed", "stage": 3}, "auto"]


def base_specs() -> list[dict]:
    """One complete spec (every field written out, defaults included) per kind x strategy / method."""
    pretrain = {
        "kind": "pretrain",
        "model": {"architecture": {"layers": 2, "heads": 2, "hidden": 32, "context": 32}},
        "tokenizer": {"train": {"type": "char"}},
        "data": {"path": "no-such-corpus.txt", "seq_len": 32},
        "output": "runs/x",
    }
    finetune = {
        "kind": "finetune",
        "model": {"path": "no-such-model-folder/x/y"},
        "data": {"path": "no-such-examples.jsonl"},
        "output": "runs/y",
    }
    tune = {
        "kind": "tune",
        "base": {**finetune, "method": "lora"},
        "search": {
            "train.lr": {"loguniform": [1e-4, 1e-2]},
            "method": {"choice": [{"name": "lora", "r": {"choice": [4, 8]}}, {"name": "ia3"}]},
        },
        "output": "runs/z",
    }
    quantize = {
        "kind": "quantize",
        "model": {"path": "no-such-model-folder/x/y"},
        "data": {"path": "no-such-corpus.txt", "seq_len": 32},
        "output": "runs/q",
    }
    specs = [{**pretrain, "strategy": s} for s in STRATEGIES]
    specs.append({**pretrain, "kind": "distill", "teacher": {"path": "no-such-teacher/x"}, "tokenizer": {}})
    specs += [{**quantize, "method": m} for m in ("nf4", "int8", {"name": "gguf", "type": "q4_0"})]
    specs += [
        {**quantize, "kind": "prune", "method": m}
        for m in ({"name": "wanda", "pattern": "2:4"}, "magnitude", "structured")
    ]
    specs += [{**finetune, "method": name} for name in METHODS]
    specs += [tune, {**tune, "algorithm": "grid", "search": {"train.lr": {"grid": [1e-3]}}}]
    specs.append(
        {
            "kind": "serve",
            "model": "no-such-model-folder/x/y",
            "adapters": {"a": "no-such-adapter"},
            "strategies": [{"name": "cot"}, {"name": "react", "documents": "no-such-docs"}],
            "scaling": {"autoscaling": {"min_replicas": 1, "max_replicas": 2}},
            "http": {"host": "0.0.0.0", "api_key_file": "no-such-key-file"},
        }
    )
    specs.append(
        {
            "kind": "evaluate",
            "models": [
                "no-such-model-folder/x/y",
                {"name": "b", "path": "no-such-adapter", "base": "no-such-base"},
            ],
            "perplexity": {"data": {"path": "no-such-corpus.txt", "seq_len": 32}, "split": "validation"},
            "tasks": [{"name": "t", "data": {"path": "no-such-examples.jsonl", "format": "choices"}}],
            "output": "runs/e",
        }
    )
    specs.append(
        {
            "kind": "pipeline",
            "output": "runs/p",
            "stages": {
                "ft": {**finetune, "method": "lora", "output": {"merge": True}},
                "q": {**quantize, "model": {"from": "ft", "pick": "merged"}, "method": "nf4"},
                "ev": {
                    "kind": "evaluate",
                    "models": [{"from": "ft"}, {"from": "q", "name": "nf4"}],
                    "perplexity": {"data": {"path": "no-such-corpus.txt"}},
                },
                "srv": {"kind": "serve", "model": {"from": "ft"}},
            },
        }
    )
    return [validate_dict(s).model_dump(mode="json") for s in specs]


BASES = base_specs()


def positions(node, prefix=()) -> list[tuple]:
    """Every dotted position of a spec: sections, fields, list items."""
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += positions(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += positions(value, (*prefix, i))
    return found


POSITIONS = [(i, p) for i, base in enumerate(BASES) for p in positions(base)]

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["", ".", "/", "auto", "ddp", "lora", "-1", "1e-3", "~", "[1, 2]", "pretrain"])
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


# A search's own fields (its space above all), apart: among every position they would be drawn rarely.
SEARCH_POSITIONS = [(i, p) for i, p in POSITIONS if BASES[i]["kind"] == "tune" and p[0] != "base"]


@st.composite
def mutated_specs(draw, positions=POSITIONS) -> str:
    index, path = draw(st.sampled_from(positions))
    spec = copy.deepcopy(BASES[index])
    node = spec
    for key in path[:-1]:
        node = node[key]
    action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "extra"]))
    if action == "delete":
        del node[path[-1]]
    elif action == "extra" and isinstance(node, dict):
        node[draw(st.text(min_size=1, max_size=8))] = draw(values)
    else:
        node[path[-1]] = draw(values)
    return yaml.safe_dump(spec, allow_unicode=True)


COMMANDS = [
    ["validate"],
    ["validate", "--no-files"],
    ["estimate"],
    ["run"],
]


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    def refuse(job):
        raise AssertionError(f"raylm run got past validation and preflight: {job}")

    monkeypatch.setattr(submit, "ensure_ray", refuse)


def invoke(tmp_path, content: bytes, command: list[str]):
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(content)
    result = CliRunner().invoke(cli.main, [*command, str(spec)], catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code in (0, 2), (result.exit_code, result.output)
    assert "Traceback" not in result.output
    return result


SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@SETTINGS
@given(text=mutated_specs())
def test_any_value_in_any_position(command, text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    invoke(tmp_path, text.encode(), command)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@SETTINGS
@given(content=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_as_the_file(command, content, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(tmp_path, content, command)
    assert result.exit_code == 2  # nothing here is a runnable spec


@SETTINGS
@given(text=mutated_specs(SEARCH_POSITIONS))
def test_any_value_in_a_search(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    invoke(tmp_path, text.encode(), ["validate", "--no-files"])


def test_every_kind_and_method_has_positions():
    kinds = {base["kind"] for base in BASES}
    methods = {base["method"]["name"] for base in BASES if base["kind"] == "finetune"}
    assert kinds == set(KINDS) and methods == set(METHODS)
    assert len(SEARCH_POSITIONS) > 15
    assert len(POSITIONS) > 300
