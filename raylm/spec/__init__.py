"""Job specs: pydantic models (the one definition), YAML loading, overrides and errors for people.

    from raylm.spec.loading import load_spec, validate_dict    # a file or a mapping -> the kind's model
    from raylm.spec.reading import SpecError                  # every problem, each with its dotted path

The section models live here (sections, strategies, sft, generation, jobs, compress, serve, tune, and
the search-space grammar in space); a fine-tuning method's block lives in its module (raylm/methods/,
which imports only spec.sections from here). `JOB_SPECS` (loading) maps each `kind:` to its model.
This package's top level imports nothing, so that the method modules can import the section base
without loading the job models that import them.
"""
