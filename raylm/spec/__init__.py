"""Job specs: pydantic models (the one definition), YAML loading, overrides and errors for people.

The section models live here (sections, strategies, sft, generation, jobs, compress, serve, tune, and
the search-space grammar in space); a fine-tuning method's block lives in its module (raylm/methods/,
which imports only spec.sections from here). `JOB_SPECS` (loading) maps each `kind:` to its model.
"""

from raylm.spec.loading import JOB_SPECS, load_spec, validate_dict
from raylm.spec.reading import SpecError, apply_overrides, read_yaml

__all__ = ["JOB_SPECS", "SpecError", "apply_overrides", "load_spec", "read_yaml", "validate_dict"]
