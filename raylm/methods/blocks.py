"""Where a decoder's repeated blocks are: the unit that methods adapt or freeze, that sharded
strategies wrap and offload, and whose linear layers pruning acts on.

    from raylm.methods.blocks import prunable, transformer_blocks
    transformer_blocks(model)   # [LlamaDecoderLayer, ...]
    prunable(model)             # {"model.layers.0.self_attn.q_proj": Linear, ...}
"""

from __future__ import annotations


def transformer_blocks(model) -> list:
    """The repeated decoder layers (the unit of sharding, offload and adapters), found the way
    transformers marks them for device maps: the classes in `model._no_split_modules` (or classes made
    from them: FSDP2's fully_shard turns a LlamaDecoderLayer into an FSDPLlamaDecoderLayer)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not blocks:
        raise RuntimeError(f"{type(model).__name__} names no transformer block class (_no_split_modules)")
    return blocks


def prunable(model) -> dict:
    """name -> linear layer (torch.nn.Linear), for every linear layer inside the decoder blocks."""
    import torch

    blocks = {id(b) for b in transformer_blocks(model)}
    out = {}
    for name, module in model.named_modules():
        if id(module) in blocks:
            for child, layer in module.named_modules():
                if isinstance(layer, torch.nn.Linear):
                    out[f"{name}.{child}"] = layer
    return out
