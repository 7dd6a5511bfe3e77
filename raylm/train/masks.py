"""Sparsity kept while training (`train.keep_sparsity`): the weights that are exactly zero in the
starting model's decoder linear layers (a pruned model) stay exactly zero.

    masks = SparsityMasks(engine.module)   # after the strategy has wrapped (and sharded) the model
    masks.gradients()                      # before clipping and the optimizer step
    masks.weights()                        # after it

Masks are taken from each rank's own part of the weights (an FSDP2 shard is a DTensor's local
tensor), so they cost one byte per local weight of the layers that hold zeros. The gradients of
pruned weights are zeroed before clipping (the clipping norm and Adam's moments see only the live
weights) and the weights are zeroed again after the step (weight decay or any optimizer cannot
revive them).
"""

from __future__ import annotations


def _local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class SparsityMasks:
    def __init__(self, model):
        import torch

        from raylm.methods.blocks import prunable

        self.kept = []  # (parameter, bool mask of its local part: True where the weight lives)
        with torch.no_grad():
            for layer in prunable(model).values():
                local = _local(layer.weight)
                if layer.weight.requires_grad and local.numel() and bool((local == 0).any()):
                    self.kept.append((layer.weight, local != 0))

    @property
    def pruned(self) -> int:
        """Weights held at zero on this rank."""
        return sum(int((~mask).sum()) for _, mask in self.kept)

    def gradients(self) -> None:
        for weight, mask in self.kept:
            if weight.grad is not None:
                _local(weight.grad).mul_(mask)

    def weights(self) -> None:
        import torch

        with torch.no_grad():
            for weight, mask in self.kept:
                _local(weight).mul_(mask)
