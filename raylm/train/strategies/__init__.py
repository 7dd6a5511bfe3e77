"""Distributed strategies, one module each: `setup(model, strategy, train, total_steps, device, ...) -> Engine`.

ddp        torch DistributedDataParallel through Ray Train (gloo on CPU, NCCL on GPU)
fsdp       PyTorch FSDP2: fully_shard per transformer block, DCP sharded checkpoints
deepspeed  DeepSpeed ZeRO stage 1/2/3 with optional CPU offload
"""

from __future__ import annotations

import importlib

STRATEGIES = {
    "ddp": "raylm.train.strategies.ddp",
    "fsdp": "raylm.train.strategies.fsdp",
    "deepspeed": "raylm.train.strategies.deepspeed",
}


def setup(model, strategy, train, total_steps: int, device, make_optimizer=None, rebuild=None):
    """Wrap `model` for data-parallel training under `strategy` (a concrete strategy spec).

    `make_optimizer(model, train)` replaces AdamW (QLoRA's paged 8-bit AdamW; DeepSpeed builds its
    own); `rebuild()` makes a fresh unwrapped model of the same structure for the final gather."""
    return importlib.import_module(STRATEGIES[strategy.name]).setup(
        model, strategy, train, total_steps, device, make_optimizer=make_optimizer, rebuild=rebuild
    )


def fills_from_rank0(strategy) -> bool:
    """Whether `strategy` builds the full model on rank 0 only and fills the other ranks' shards from
    it (fsdp, ZeRO-3); the other strategies keep a whole copy on every rank anyway."""
    return strategy.name == "fsdp" or (strategy.name == "deepspeed" and strategy.stage == 3)


def quant_states_to(model, device) -> None:
    """Move bitsandbytes 4-bit layers' quantisation constants (absmax, code book: not parameters, so
    a strategy moving the weights leaves them behind) to `device`."""
    if device.type == "cpu":
        return
    for module in model.modules():
        state = getattr(module, "quant_state", None)
        if state is not None and hasattr(state, "absmax"):
            state.to(device)


def autocast(precision: str, device):
    """Autocast to the 16-bit type of `precision` (nothing for fp32)."""
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
