"""Distributed strategies: one function each, wrapping a model for data-parallel training."""

from __future__ import annotations


def ddp(model, spec):
    """DistributedDataParallel through Ray Train: gloo on CPU, NCCL on GPU (the process group is Ray's)."""
    import ray.train.torch

    return ray.train.torch.prepare_model(model, parallel_strategy="ddp")


STRATEGIES = {"ddp": ddp}


def wrap(model, spec):
    return STRATEGIES[spec.strategy](model, spec)
