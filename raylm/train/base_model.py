"""The frozen base of a fine-tuning run: what its method starts from, and a preference objective's
reference."""

from __future__ import annotations


def base_model(job, tokenizer, device, empty: bool = False):
    """The frozen base: loaded the method's own way (QLoRA: 4-bit) or as the model spec says."""
    from raylm import methods
    from raylm.planning.models import build_model

    load_base = getattr(methods.module(job.method.name), "load_base", None)
    if load_base is not None:
        model = job.model
        return load_base(
            model.path, job.method, device, model.revision, model.trust_remote_code, model.attention
        )
    return build_model(job.model, len(tokenizer), tokenizer=tokenizer, seed=job.train.seed, empty=empty)
