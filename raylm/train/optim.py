"""AdamW with decoupled weight decay (not on norms and biases) and a warm-up + decay schedule."""

from __future__ import annotations

import math

from raylm.spec.sections import TrainSpec


def param_groups(model, spec: TrainSpec) -> list[dict]:
    """Trainable parameters in two groups: matrices decay, norms and biases do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if _ndim(p) >= 2], "weight_decay": spec.weight_decay},
        {"params": [p for p in params if _ndim(p) < 2], "weight_decay": 0.0},
    ]


def _ndim(param) -> int:
    """Dimensions of the full parameter (a ZeRO-3 partitioned one holds an empty stand-in tensor)."""
    return len(getattr(param, "ds_shape", param.shape))


def adamw(model, spec: TrainSpec):
    """torch's AdamW: the fused CUDA kernel when every trained parameter is on a GPU, else foreach."""
    import torch

    groups = param_groups(model, spec)
    on_gpu = all(p.is_cuda for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, fused=True if on_gpu else None)


def lr_factor(step: int, spec: TrainSpec, total_steps: int) -> float:
    """Multiplier of the peak lr at `step`: linear warm-up, then cosine / linear decay or constant."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    if spec.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - spec.warmup_steps) / max(1, total_steps - spec.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if spec.schedule == "cosine" else 1 - progress
    return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * shape


def scheduler(optimizer, spec: TrainSpec, total_steps: int):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, spec, total_steps))
