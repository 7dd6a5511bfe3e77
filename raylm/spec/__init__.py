"""Job specs: pydantic models (the one definition), YAML loading, overrides and errors for people.

The section models live in raylm/spec/ (sections, strategies, sft, jobs); method blocks in each method's
module (raylm/methods/); the kinds are registered in raylm.kinds. This package's top level loads only
the loader, so that the method modules can import the section base without a cycle.
"""

from raylm.spec.loading import SpecError, apply_overrides, load_spec, read_yaml, validate_dict

__all__ = ["SpecError", "apply_overrides", "load_spec", "read_yaml", "validate_dict"]
