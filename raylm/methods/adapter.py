"""Houlsby bottleneck adapters (Houlsby et al., 2019), implemented here: PEFT has none, and
AdapterHub's `adapters` pins transformers 4.

After the attention block's output projection and/or the feed-forward block's, each transformer block
gets `y + up(act(down(y)))`: a down-projection to `bottleneck`, a nonlinearity, an up-projection back
and a residual. The up-projection starts at zero, so training starts from the base model exactly.
The base is frozen (its norms too, unless `train_norms`). The artifact holds only the adapters:
`adapter.safetensors` and `raylm_adapter.json`; `load(base, folder)` puts them back on a base.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from raylm.spec.sections import Section


class AdapterMethod(Section):
    """Houlsby bottleneck adapters: x + up(act(down(x))) after attention and/or feed-forward; base frozen."""

    name: Literal["adapter"]
    bottleneck: int = Field(64, ge=1, description="Width of the down-projection.")
    nonlinearity: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="Between down and up.")
    placement: Literal["both", "attention", "ffn"] = Field(
        "both", description="After the attention block, the feed-forward block (Pfeiffer), or both (Houlsby)."
    )
    init_std: float = Field(
        1e-3,
        ge=0,
        description="Std of the down-projection's init; the up-projection starts at zero (the identity).",
    )
    train_norms: bool = Field(False, description="Also train the layer norms (as in Houlsby et al.).")


Spec = AdapterMethod


CONFIG = "raylm_adapter.json"
WEIGHTS = "adapter.safetensors"
# Where a block's sub-layers end, by architecture: (attention output, feed-forward output).
OUTPUTS = {
    "attention": ("self_attn.o_proj", "attn.c_proj", "self_attention.dense", "attn.out_proj"),
    "ffn": ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2"),
}


def _bottleneck_class():
    import torch

    activations = {
        "relu": torch.nn.ReLU,
        "gelu": torch.nn.GELU,
        "silu": torch.nn.SiLU,
        "tanh": torch.nn.Tanh,
    }

    class Bottleneck(torch.nn.Module):
        """Wraps a block's output projection: y = inner(x); y + up(act(down(y)))."""

        def __init__(self, inner, size: int, bottleneck: int, nonlinearity: str, init_std: float):
            super().__init__()
            self.inner = inner
            self.down = torch.nn.Linear(size, bottleneck)
            self.act = activations[nonlinearity]()
            self.up = torch.nn.Linear(bottleneck, size)
            torch.nn.init.normal_(self.down.weight, std=init_std)
            torch.nn.init.zeros_(self.down.bias)
            torch.nn.init.zeros_(self.up.weight)
            torch.nn.init.zeros_(self.up.bias)
            self.enabled = True

        def forward(self, *args, **kwargs):
            y = self.inner(*args, **kwargs)
            return y + self.up(self.act(self.down(y))) if self.enabled else y

    return Bottleneck


@contextlib.contextmanager
def reference(model):
    """The model computing as its base: every bottleneck switched off (trained norms, with
    train_norms, stay as trained: refused for the preference objectives that need a reference)."""
    switches = [m for m in model.modules() if hasattr(m, "enabled") and hasattr(m, "down")]
    for module in switches:
        module.enabled = False
    try:
        yield
    finally:
        for module in switches:
            module.enabled = True


def _places(placement: str) -> tuple[str, ...]:
    return ("attention", "ffn") if placement == "both" else (placement,)


def apply(model, method, tokenizer=None):
    from raylm.methods.blocks import transformer_blocks

    Bottleneck = _bottleneck_class()
    for param in model.parameters():
        param.requires_grad_(False)
    hidden = getattr(model.config, "hidden_size", None) or model.config.n_embd
    for block in transformer_blocks(model):
        for place in _places(method.placement):
            path = next((p for p in OUTPUTS[place] if _get(block, p) is not None), None)
            if path is None:
                raise ValueError(f"adapter: no {place} output projection found in {type(block).__name__}")
            parent, _, leaf = path.rpartition(".")
            owner = _get(block, parent)
            setattr(
                owner,
                leaf,
                Bottleneck(
                    getattr(owner, leaf), hidden, method.bottleneck, method.nonlinearity, method.init_std
                ),
            )
    if method.train_norms:
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                param.requires_grad_(True)
    model.raylm_adapter = method.model_dump()
    return model


def _get(module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def adapter_state(model) -> dict:
    """The adapter's own weights (and the norms when they train)."""
    return {
        name: param.detach().contiguous().cpu()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def save(model, folder: Path) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), folder / WEIGHTS)
    config = {**model.raylm_adapter, "base_model": getattr(model.config, "_name_or_path", None)}
    (folder / CONFIG).write_text(json.dumps(config, indent=2))


def load(base, folder):
    """`base` with the adapters of `folder` attached (the method settings come from its config)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    settings = json.loads((folder / CONFIG).read_text())
    settings.pop("base_model", None)
    model = apply(base, AdapterMethod.model_validate(settings))
    state = load_file(folder / WEIGHTS)
    missing, unexpected = model.load_state_dict(state, strict=False)
    expected = set(adapter_state(model))
    if unexpected or expected - set(state):
        raise ValueError(
            f"{folder}: adapter weights do not fit this base ({sorted(unexpected or expected - set(state))[:3]})"
        )
    return model
