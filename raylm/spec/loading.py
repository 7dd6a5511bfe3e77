"""A mapping -> the validated job spec of its kind, with errors written for people.

from raylm.spec.loading import load_spec, validate_dict
job = load_spec("jobs/quickstart.yaml", ["train.lr=3e-4"])
"""

from __future__ import annotations

import difflib
from pathlib import Path

from pydantic import BaseModel, ValidationError

from raylm.spec.compress import PruneJob, QuantizeJob
from raylm.spec.evaluate import EvaluateJob
from raylm.spec.jobs import DistillJob, FinetuneJob, PretrainJob
from raylm.spec.pipeline import PipelineJob, validate_stages
from raylm.spec.reading import SpecError, apply_overrides, read_yaml
from raylm.spec.serve import ServeJob
from raylm.spec.tune import TuneJob

# The spec model of every job kind, by `kind:`; raylm.kinds pairs each with its driver.
JOB_SPECS: dict[str, type[BaseModel]] = {
    "pretrain": PretrainJob,
    "finetune": FinetuneJob,
    "tune": TuneJob,
    "distill": DistillJob,
    "quantize": QuantizeJob,
    "prune": PruneJob,
    "serve": ServeJob,
    "evaluate": EvaluateJob,
    "pipeline": PipelineJob,
}


def validate_dict(data: dict, source: str = "spec") -> BaseModel:
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in JOB_SPECS:
        choices = ", ".join(JOB_SPECS)
        hint = _did_you_mean(kind, JOB_SPECS) if isinstance(kind, str) else ""
        if kind is None:
            what = "missing: every spec starts with `kind:`"
        elif isinstance(kind, str):
            what = f"unknown kind {kind!r}"
        else:
            what = f"expected a kind name, got a {type(kind).__name__}"
        raise SpecError([("kind", f"{what}; choose one of: {choices}{hint}")], source=source)
    model = JOB_SPECS[kind]
    try:
        job = model.model_validate(data)
    except ValidationError as err:
        raise SpecError([_describe(model, e) for e in err.errors()], source=source) from None
    if kind == "pipeline":  # its stages: every kind's spec, references resolved
        try:
            validate_stages(job, validate_dict)
        except SpecError as err:
            raise SpecError(err.problems, source=source) from None
    return job


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
