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
    def __init__(self, model, optimizer, scheduler, spec: TrainSpec, autocast, scaler=None, rebuild=None):
        self.model = model  # what forward runs on (the wrapper)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.spec = spec
        self.autocast = autocast
        self.scaler = scaler
        self.rebuild = rebuild  # a fresh unwrapped model of the same structure, for consolidation
        self.compiled = None  # torch.compile of the wrapper, for training steps (train.compile)
        self.objective = None  # a kind's own training loss, objective(model, batch, items) (distillation)
        self.masks = None  # raylm.train.masks.SparsityMasks under train.keep_sparsity

    def compile(self) -> None:
        """Compile the training forward and backward (evaluation and generation stay eager: their
        shapes change from call to call)."""
        import torch

        self.compiled = torch.compile(self.model)

    @property
    def module(self):
        """The transformers model inside the wrapper."""
        return getattr(self.model, "module", self.model)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def loss(self, batch: dict, training: bool = False, items=None):
        """Loss of a batch (input_ids, and labels / attention_mask when the data has them; pretraining
        blocks are their own labels): the mean, or with `items` the sum over its labelled tokens
        divided by `items`."""
        model = self.compiled if training and self.compiled is not None else self.model
        with self.autocast:
            if training and self.objective is not None:
                return self.objective(model, batch, items)
            return forward_loss(model, batch, self.spec, items)

    def generating(self):
        """Around generation on `module` (which may skip the wrapper's own forward)."""
        return contextlib.nullcontext()

    def no_sync(self):
        """Skip the gradient all-reduce of a micro-batch that does not end an accumulation."""
        return self.model.no_sync() if hasattr(self.model, "no_sync") else contextlib.nullcontext()

    def micro_step(self, batch: dict, items, boundary: bool) -> float:
        """Forward and backward of one micro-batch; at an accumulation boundary, the optimizer step.

        `items` is the global batch's labelled-token count divided by the number of ranks: each rank's
        gradient is its token losses' sum over it, and the ranks' average (DDP, FSDP and DeepSpeed all
        average) is then the sum over every labelled token of the global batch over their count.
        Returns this micro-batch's summed token loss."""
        with contextlib.nullcontext() if boundary else self.no_sync():
            loss = self.loss(batch, training=True, items=items)
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        if boundary:
            self.optimizer_step()
        return loss.item() * float(items)

    def optimizer_step(self) -> None:
        import torch

        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.masks is not None:
            self.masks.gradients()
        if self.spec.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.masks is not None:
            self.masks.weights()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    # ---- checkpoints: every rank calls these; each writes its own files into its own folder ---------
    def save(self, folder: Path, rank: int) -> None:
        """Replicated weights: rank 0 writes the trained weights, optimizer and schedule. Frozen
        weights (a fine-tuning base) are not written: the run rebuilds them from their source."""
        import torch

        from raylm.train.checkpoint import save_weights

        if rank != 0:
            return
        save_weights(self.module, folder / "model.safetensors", trainable_only=True)
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")

    def load(self, folder: Path, rank: int) -> None:
        import torch

        from raylm.train.checkpoint import load_weights

        load_weights(self.module, folder / "model.safetensors")
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))

    def consolidated(self, rank: int):
        """The complete trained model as a plain transformers model on rank 0 (None elsewhere).
        Collective: every rank must call it."""
        return self.module if rank == 0 else None


def forward_loss(model, batch: dict, spec: TrainSpec, items=None):
    """The training loss of a batch: the causal-LM loss, or for multiple-choice batches (`answer`)
    the weighted T-Few objective (raylm.train.objectives), whose unit is the example. Without `items`
    the mean; with it, the sum over the batch's labelled tokens (examples) divided by `items`."""
    if "answer" in batch:
        from raylm.train.objectives import choices_loss

        loss = choices_loss(model, batch, spec.objective)
        return loss if items is None else loss * len(batch["answer"]) / items
    if items is None:
        return model(**inputs(batch)).loss
    # transformers' causal-LM loss sums and divides by num_items_in_batch (a tensor: no recompiles)
    return model(**inputs(batch), num_items_in_batch=items).loss


def inputs(batch: dict) -> dict:
    return {**batch, "labels": batch.get("labels", batch["input_ids"])}


def plain_copy(engine, module, state: dict):
    """A fresh, unwrapped model like `module` (its config; or the engine's `rebuild`, for a
    fine-tuning method's structure, whose frozen weights come from their source as in training)
    holding `state`: every trained parameter (and any other entry), on the CPU."""
    from transformers import AutoModelForCausalLM

    # a real init, not the meta device: non-persistent buffers (RoPE's) are not in `state`
    plain = engine.rebuild() if engine.rebuild else AutoModelForCausalLM.from_config(module.config)
    tensors = dict(plain.named_parameters()) | dict(plain.named_buffers())
    trained = {name for name, param in plain.named_parameters() if param.requires_grad}
    # state-dict entries that are neither (bitsandbytes' quantisation constants) are the rebuild's own
    unexpected = [key for key in state if key not in plain.state_dict()]
    missing = sorted(trained - state.keys())
    if unexpected or missing:
        raise RuntimeError(f"consolidation: state does not fit the model ({(unexpected or missing)[:3]})")
    plain.load_state_dict({k: v for k, v in state.items() if k in tensors}, strict=False)
    return plain
