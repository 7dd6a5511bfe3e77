"""Reading a spec file and `--set a.b=value` overrides into a plain mapping; SpecError, the error every
spec problem is reported with (a dotted path and a hint for each)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

Problems = list[tuple[str, str]]  # (dotted field, what is wrong and how to fix it)


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
    """One spec from a YAML file, a local path or a storage URI (s3://, gs://: e.g. a search's base)."""
    if "://" in str(path):
        raw = _read_uri(str(path))
    else:
        path = Path(path)
        if not path.is_file():
            raise SpecError([("file", f"no such spec file: {path}")], source=str(path))
        raw = None
    try:
        text = (raw if raw is not None else path.read_bytes()).decode("utf-8")
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


def _read_uri(uri: str) -> bytes:
    import pyarrow.fs as pafs

    try:
        fs, where = pafs.FileSystem.from_uri(uri)
        if fs.get_file_info(where).type != pafs.FileType.File:
            raise SpecError([("file", f"no such spec file: {uri}")], source=uri)
        with fs.open_input_stream(where) as source:
            return source.read()
    except (OSError, ValueError) as err:  # no such bucket, no credentials, an unknown scheme
        raise SpecError([("file", f"cannot read {uri}: {err}")], source=uri) from None


def deep_merge(base: dict, override: dict) -> dict:
    """`base` with `override` merged over it: mappings merged key by key, any other value replaced."""
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out
