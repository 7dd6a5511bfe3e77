"""Job specs: pydantic models (the one definition), YAML loading, overrides and JSON Schema."""

from raylm.spec.jobs import KINDS, PretrainJob, json_schema
from raylm.spec.loading import SpecError, apply_overrides, load_spec, read_yaml, validate_dict

__all__ = [
    "KINDS",
    "PretrainJob",
    "SpecError",
    "apply_overrides",
    "json_schema",
    "load_spec",
    "read_yaml",
    "validate_dict",
]
