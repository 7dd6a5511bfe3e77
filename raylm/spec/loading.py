"""YAML -> validated job spec, with `--set a.b=value` overrides and errors written for people."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


class SpecError(Exception):
    """Every problem found in a spec, each with its dotted path and a hint. Picklable across Ray."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "spec"):
        self.problems = list(problems)
        self.source = source
        super().__init__(self.problems, source)

    def __str__(self) -> str:
        lines = [f"{self.source}: {len(self.problems)} problem(s)"]
        lines += [f"  {where}: {what}" for where, what in self.problems]
        return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 0.0003); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise SpecError([(f"--set {text}", "expected KEY=VALUE with a dotted key, e.g. --set train.lr=3e-4")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise SpecError([(f"--set {text}", f"value is not valid YAML: {err}")]) from None
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
    return key.strip().split("."), value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in {"nan", "inf", "-inf", "infinity", "-infinity"}


class NotASection(ValueError):
    """A dotted path runs through a value: `where` (the prefix) holds a `found`, not a mapping."""

    def __init__(self, where: str, found: str):
        super().__init__(f"{where} is a {found}, not a section")
        self.where, self.found = where, found


def set_dotted(data: dict, keys: list[str], value) -> None:
    """data[k0][k1]...[kn] = value, creating sections on the way (NotASection when one is a value)."""
    node = data
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise NotASection(".".join(keys[: depth + 1]), type(child).__name__)
        node = child
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        try:
            set_dotted(data, keys, value)
        except NotASection as err:
            raise SpecError([(f"--set {text}", str(err))]) from None
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SpecError([("file", f"no such spec file: {path}")], source=str(path))
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(
            [("file", f"not UTF-8 text (byte {err.start}): a spec is a YAML text file; save it as UTF-8")],
            source=str(path),
        ) from None
    except OSError as err:
        raise SpecError([("file", f"cannot read it: {err.strerror}")], source=str(path)) from None
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "file"
        raise SpecError(
            [(where, f"not valid YAML: {getattr(err, 'problem', None) or err}")], source=str(path)
        ) from None
    except RecursionError:
        raise SpecError([("file", "not a spec: nested too deeply")], source=str(path)) from None
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise SpecError([("file", "expected one YAML mapping with a `kind:` key")], source=str(path))
    return documents[0]


def validate_dict(data: dict, source: str = "spec") -> BaseModel:
    from raylm.kinds import KINDS  # the registry imports the spec models: not at module level

    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        choices = ", ".join(KINDS)
        hint = _did_you_mean(kind, KINDS) if isinstance(kind, str) else ""
        if kind is None:
            what = "missing: every spec starts with `kind:`"
        elif isinstance(kind, str):
            what = f"unknown kind {kind!r}"
        else:
            what = f"expected a kind name, got a {type(kind).__name__}"
        raise SpecError([("kind", f"{what}; choose one of: {choices}{hint}")], source=source)
    model = KINDS[kind].spec
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise SpecError([_describe(model, e) for e in err.errors()], source=source) from None


def validate_section(model: type[BaseModel], data: dict, source: str) -> BaseModel:
    """One section model (e.g. generation controls from CLI flags), errors as for a spec."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise SpecError([_describe(model, e) for e in err.errors()], source=source) from None


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> BaseModel:
    data = apply_overrides(read_yaml(path), list(overrides))
    return validate_dict(data, source=str(path))


def _describe(model: type[BaseModel], error: dict) -> tuple[str, str]:
    raw = [str(p) for p in error["loc"] if not str(p).startswith("function-")]
    loc = _walk(model, raw)[1]
    where = ".".join(loc) or "spec"
    kind = error["type"]
    if kind == "extra_forbidden":
        siblings = _fields_at(model, raw[:-1])
        return where, f"unknown field{_did_you_mean(loc[-1], siblings)}; allowed here: {', '.join(siblings)}"
    if kind == "missing":
        field = _field_info(model, raw)
        hint = f" ({field.description})" if field is not None and field.description else ""
        return where, f"required field is missing{hint}"
    message = error["msg"].removeprefix("Value error, ")
    if kind in {"literal_error", "enum"}:
        return where, f"{message}, got {error.get('input')!r}"
    if kind == "union_tag_invalid":
        return where, f"unknown name {error['ctx']['tag']!r}; choose one of: {error['ctx']['expected_tags']}"
    field = _field_info(model, raw)
    if field is not None and field.description and kind not in {"value_error", "assertion_error"}:
        message += f" (got {error.get('input')!r}; {field.description})"
    return where, message


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _members(model: type[BaseModel] | None, key: str) -> list[type[BaseModel]]:
    """The spec models a field holds: one section, or the members of a tagged union (strategy)."""
    if model is None or key not in model.model_fields:
        return []
    annotation = model.model_fields[key].annotation
    return [
        c
        for c in (annotation, *getattr(annotation, "__args__", ()))
        if isinstance(c, type) and issubclass(c, BaseModel)
    ]


def _tag(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("name")
    args = getattr(field.annotation, "__args__", ()) if field is not None else ()
    return args[0] if len(args) == 1 and isinstance(args[0], str) else None


def _walk(model: type[BaseModel], loc: list[str]) -> tuple[type[BaseModel] | None, list[str]]:
    """The model at `loc`, and `loc` without the union tags pydantic puts in error paths."""
    clean: list[str] = []
    i = 0
    while i < len(loc):
        members = _members(model, loc[i])
        clean.append(loc[i])
        i += 1
        tagged = [m for m in members if i < len(loc) and _tag(m) == loc[i]]
        if len(members) > 1 and tagged:
            model, i = tagged[0], i + 1
        else:
            model = members[0] if members else None
    return model, clean


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    found, _ = _walk(model, loc)
    return list(found.model_fields) if found is not None else []


def _field_info(model: type[BaseModel], loc: list[str]):
    found, _ = _walk(model, loc[:-1])
    if found is None or not loc or loc[-1] not in found.model_fields:
        return None
    return found.model_fields[loc[-1]]
