"""Unstructured and N:M pruning of a decoder's linear layers: magnitude, and Wanda (Sun et al. 2023,
"A Simple and Effective Pruning Approach for Large Language Models", github.com/locuslab/wanda).

    from raylm.compress.sparsity import prune_magnitude, prune_wanda
    prune_magnitude(model, 0.5)                       # each layer: its 50% smallest |W| set to zero
    prune_wanda(model, calibration, 0.5, n_m=(2, 4))  # |W| x ||X_j||, 2 of every 4 kept per row

The pruned layers are every nn.Linear inside the repeated decoder blocks (attention and MLP
projections); embeddings and the LM head stay dense, as in the Wanda paper.
"""

from __future__ import annotations

import torch

from raylm.methods.blocks import prunable, transformer_blocks


def mask_lowest(scores: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None, per_row: bool):
    """True where a weight is pruned: in every group of M consecutive columns of a row the M - N lowest
    scores (N:M); else the lowest `sparsity` share of each row (per_row) or of the whole layer."""
    if n_m is not None:
        n, m = n_m
        rows, cols = scores.shape
        groups = scores.reshape(rows, cols // m, m)
        lowest = groups.topk(m - n, dim=-1, largest=False).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest, True)
        return mask.reshape(rows, cols)
    if per_row:
        count = int(scores.shape[1] * sparsity)
        lowest = scores.topk(count, dim=1, largest=False).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, lowest, True)
    count = int(scores.numel() * sparsity)
    lowest = scores.flatten().topk(count, largest=False).indices
    return (
        torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        .scatter_(0, lowest, True)
        .view_as(scores)
    )


def prune_magnitude(model, sparsity: float, n_m: tuple[int, int] | None = None) -> None:
    """Each layer's smallest weights by |W| (the layer as a whole, or N:M within rows) set to zero."""
    with torch.no_grad():
        for layer in prunable(model).values():
            layer.weight[mask_lowest(layer.weight.abs(), sparsity, n_m, per_row=False)] = 0


class _Stop(Exception):
    """Raised after the block being pruned has run: the rest of the model is not needed yet."""


def prune_wanda(model, calibration: torch.Tensor, sparsity: float, n_m=None, batch: int = 8) -> None:
    """Wanda, block by block: the inputs of block i come from the calibration text run through the
    blocks before it, already pruned; each of its linear layers is scored by |W_ij| * ||X_j||_2 over
    every calibration token and pruned within each output row."""
    blocks = transformer_blocks(model)
    layers = prunable(model)
    model.eval()
    for block in blocks:
        inside = {name: layer for name, layer in layers.items() if _within(layer, block)}
        norms = {name: torch.zeros(layer.in_features, dtype=torch.float64) for name, layer in inside.items()}

        def collector(name, sums=norms):
            def hook(module, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
                sums[name] += (x * x).sum(0).cpu()

            return hook

        def stop(module, args, output):
            raise _Stop

        handles = [layer.register_forward_pre_hook(collector(name)) for name, layer in inside.items()]
        handles.append(block.register_forward_hook(stop))
        with torch.no_grad():
            for start in range(0, len(calibration), batch):
                try:
                    model(input_ids=calibration[start : start + batch].to(_device(model)))
                except _Stop:
                    pass
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for name, layer in inside.items():
                scores = layer.weight.abs().double().cpu() * norms[name].sqrt().unsqueeze(0)
                layer.weight[mask_lowest(scores, sparsity, n_m, per_row=True).to(layer.weight.device)] = 0


def _within(layer, block) -> bool:
    return any(module is layer for module in block.modules())


def _device(model):
    return next(model.parameters()).device


def layer_sparsity(tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, float]:
    """Share of exact zeros in each named weight (read from saved tensors)."""
    return {name: round((tensors[name] == 0).sum().item() / tensors[name].numel(), 6) for name in names}


def nm_holds(weight: torch.Tensor, n: int, m: int) -> bool:
    """At most N non-zeros in every group of M consecutive weights of each row."""
    rows, cols = weight.shape
    return bool(((weight.reshape(rows, cols // m, m) != 0).sum(-1) <= n).all())
