"""DDP: each worker keeps the whole model and optimizer; gradients are all-reduced in buckets."""

from __future__ import annotations


def setup(model, strategy, train, total_steps: int, device, make_optimizer=None, rebuild=None):
    import ray.train.torch
    import torch

    from raylm.train import optim
    from raylm.train.engine import Engine
    from raylm.train.strategies import autocast

    wrapped = ray.train.torch.prepare_model(model, parallel_strategy="ddp")
    optimizer = (make_optimizer or optim.adamw)(wrapped, train)
    return Engine(
        wrapped,
        optimizer,
        optim.scheduler(optimizer, train, total_steps),
        train,
        autocast(train.precision, device),
        torch.amp.GradScaler("cuda") if train.precision == "fp16" else None,
        rebuild=rebuild,
    )
