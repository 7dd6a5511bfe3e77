"""Structured pruning of a Llama-family decoder: whole key/value head groups (with their query heads)
and MLP channels are removed from every layer, so the saved model is smaller and its config says so.

    from raylm.compress.structured import problems, prune_structured
    smaller = prune_structured(model, heads=0.25, channels=0.25)

Every layer loses the same number of groups and channels (a transformers config holds one head count
and one intermediate size for all layers, and the head count must divide the hidden size, so fewer
groups are removed when the share asked for would break that); within a layer the ones kept are those whose weights have
the largest L2 norm (query, key, value rows and output-projection columns of a group; gate and up rows
and down-projection columns of a channel). The head size stays as it was (`head_dim` in the config).
"""

from __future__ import annotations

import copy

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def problems(model) -> list[str]:
    """Why this model's layers cannot be pruned structurally here ([] when they can)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not len(layers):
        return [
            f"structured pruning covers Llama-style decoders (model.layers); this is {type(model).__name__}"
        ]
    names = {name for name, _ in layers[0].named_modules()}
    missing = [p for p in PROJECTIONS + MLP if p not in names]
    if missing:
        return [
            f"structured pruning needs {', '.join(PROJECTIONS + MLP)} in each layer; missing: {', '.join(missing)}"
        ]
    return []


def kept_groups(hidden: int, n_kv: int, group: int, heads: float) -> int:
    """Key/value groups kept: `heads` of them removed, rounded down, and fewer removed when the head
    count left would not divide the hidden size (transformers' Llama config requires it)."""
    keep = n_kv - int(n_kv * heads)
    while hidden % (keep * group):
        keep += 1
    return keep


def prune_structured(model, heads: float, channels: float):
    """A new, smaller model: `heads` of each layer's key/value groups and `channels` of its MLP
    channels removed (rounded down), the weights of what is kept copied over."""
    from transformers import AutoModelForCausalLM

    config = model.config
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    group = n_heads // n_kv
    keep_groups = kept_groups(config.hidden_size, n_kv, group, heads)
    keep_channels = config.intermediate_size - int(config.intermediate_size * channels)

    state = {k: v.detach() for k, v in model.state_dict().items()}
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        q = attn.q_proj.weight.detach().view(n_kv, group * head_dim, -1)
        k = attn.k_proj.weight.detach().view(n_kv, head_dim, -1)
        v = attn.v_proj.weight.detach().view(n_kv, head_dim, -1)
        o = attn.o_proj.weight.detach().view(o_rows := attn.o_proj.weight.shape[0], n_kv, group * head_dim)
        score = (q**2).sum((1, 2)) + (k**2).sum((1, 2)) + (v**2).sum((1, 2)) + (o**2).sum((0, 2))
        kept = score.topk(keep_groups).indices.sort().values
        state[prefix + "self_attn.q_proj.weight"] = q[kept].reshape(-1, q.shape[-1])
        state[prefix + "self_attn.k_proj.weight"] = k[kept].reshape(-1, k.shape[-1])
        state[prefix + "self_attn.v_proj.weight"] = v[kept].reshape(-1, v.shape[-1])
        state[prefix + "self_attn.o_proj.weight"] = o[:, kept].reshape(o_rows, -1)
        for name, rows in (("q_proj", group * head_dim), ("k_proj", head_dim), ("v_proj", head_dim)):
            bias = getattr(attn, name).bias
            if bias is not None:
                state[prefix + f"self_attn.{name}.bias"] = bias.detach().view(n_kv, rows)[kept].reshape(-1)
        gate, up, down = (
            mlp.gate_proj.weight.detach(),
            mlp.up_proj.weight.detach(),
            mlp.down_proj.weight.detach(),
        )
        score = (gate**2).sum(1) + (up**2).sum(1) + (down**2).sum(0)
        channels_kept = score.topk(keep_channels).indices.sort().values
        state[prefix + "mlp.gate_proj.weight"] = gate[channels_kept]
        state[prefix + "mlp.up_proj.weight"] = up[channels_kept]
        state[prefix + "mlp.down_proj.weight"] = down[:, channels_kept]

    smaller_config = config.__class__.from_dict(
        {
            **config.to_dict(),
            "num_attention_heads": keep_groups * group,
            "num_key_value_heads": keep_groups,
            "head_dim": head_dim,
            "intermediate_size": keep_channels,
        }
    )
    smaller = AutoModelForCausalLM.from_config(smaller_config, dtype=next(model.parameters()).dtype)
    smaller.load_state_dict(state, strict=True)
    # generation settings as the original's (a config-built model's default would turn the KV cache off)
    smaller.generation_config = copy.deepcopy(model.generation_config)
    return smaller.to(next(model.parameters()).device)
