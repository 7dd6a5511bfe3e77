"""The loop's one handle on a wrapped model: forward, a micro-batch step, checkpoints, the final model.

A strategy (raylm/train/strategies/) wraps a freshly built model and returns an Engine. This base
class is the plain PyTorch path that DDP uses; FSDP and DeepSpeed override what they do differently
(gradient-sync control, sharded checkpoints, gathering the full model for export).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from raylm.spec.sections import TrainSpec


class Engine:
    def __init__(self, model, optimizer, scheduler, spec: TrainSpec, autocast, scaler=None):
        self.model = model  # what forward runs on (the wrapper)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.spec = spec
        self.autocast = autocast
        self.scaler = scaler

    @property
    def module(self):
        """The transformers model inside the wrapper."""
        return getattr(self.model, "module", self.model)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def loss(self, ids):
        with self.autocast:
            return self.model(input_ids=ids, labels=ids).loss

    def no_sync(self):
        """Skip the gradient all-reduce of a micro-batch that does not end an accumulation."""
        return self.model.no_sync() if hasattr(self.model, "no_sync") else contextlib.nullcontext()

    def micro_step(self, ids, boundary: bool) -> float:
        """Forward and backward of one micro-batch; at an accumulation boundary, the optimizer step."""
        with contextlib.nullcontext() if boundary else self.no_sync():
            loss = self.loss(ids) / self.spec.grad_accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        if boundary:
            self.optimizer_step()
        return loss.item()

    def optimizer_step(self) -> None:
        import torch

        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.spec.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    # ---- checkpoints: every rank calls these; each writes its own files into its own folder ---------
    def save(self, folder: Path, rank: int) -> None:
        """Replicated weights: rank 0 writes the full model, optimizer and schedule."""
        import torch

        from raylm.train.checkpoint import save_weights

        if rank != 0:
            return
        save_weights(self.module, folder / "model.safetensors")
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")

    def load(self, folder: Path, rank: int) -> None:
        import torch
        from safetensors.torch import load_file

        self.module.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))

    def consolidated(self, rank: int):
        """The complete trained model as a plain transformers model on rank 0 (None elsewhere).
        Collective: every rank must call it."""
        return self.module if rank == 0 else None


def plain_copy(module, state: dict):
    """A fresh, unwrapped transformers model of `module`'s config holding `state` (on the CPU)."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_config(module.config)  # real init: non-persistent buffers (RoPE)
    plain.load_state_dict(state, strict=True)
    return plain
