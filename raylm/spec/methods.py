"""The `method:` block of a finetune job: which weights train, and how.

    method: lora                                              # a name is shorthand for {name: ...}
    method: {name: lora, r: 16, alpha: 32, target_modules: [q_proj, v_proj], use_dora: true}
    method: {name: qlora, r: 8, quant_type: nf4, double_quant: true, compute_dtype: bf16}
    method: {name: prompt, num_virtual_tokens: 20, init_text: "Answer the sum:"}

Each method is implemented by one module of raylm/peft/, registered by name.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from raylm.spec.sections import Section

ALL_LINEAR = "all-linear"


class FullMethod(Section):
    """Every weight trains."""

    name: Literal["full"]


class FreezeMethod(Section):
    """Transfer learning: freeze the bottom of the network, train the rest."""

    name: Literal["freeze"]
    layers: int = Field(1, ge=0, description="Freeze the first N transformer blocks.")
    freeze_embeddings: bool = Field(True, description="Freeze the input embeddings (and a tied LM head).")
    patterns: list[str] = Field(
        default_factory=list,
        description="Also freeze parameters whose names match these regular expressions.",
    )
    new_head: bool = Field(
        False, description="Re-initialise the LM head (a new output layer; needs untied embeddings)."
    )


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


class LoraMethod(Section):
    """LoRA: a trainable low-rank update B·A beside chosen linear layers; base frozen."""

    name: Literal["lora"]
    r: int = Field(8, ge=1, description="Rank of the update.")
    alpha: float = Field(
        16, gt=0, description="Scale: the update is multiplied by alpha / r (alpha / sqrt(r) with rsLoRA)."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch's input.")
    target_modules: str | list[str] = Field(
        ALL_LINEAR,
        description='Module names (suffixes) to adapt, or "all-linear" (every linear but the LM head).',
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    use_dora: bool = Field(
        False, description="DoRA: weight-decomposed LoRA (a trained magnitude per output)."
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full beside LoRA and saved with the adapter."
    )


class QLoraMethod(LoraMethod):
    """QLoRA: the base loaded in 4 bits by bitsandbytes, LoRA on top, a paged 8-bit optimizer."""

    name: Literal["qlora"]  # type: ignore[assignment]
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the base weights.")
    double_quant: bool = Field(True, description="Quantise the quantisation constants too (~0.4 bit/param).")
    compute_dtype: Literal["bf16", "fp32"] = Field("bf16", description="dtype of the de-quantised matmuls.")
    optimizer: Literal["paged_adamw_8bit", "adamw_8bit", "adamw"] = Field(
        "paged_adamw_8bit", description="bitsandbytes paged 8-bit AdamW, plain 8-bit AdamW, or torch AdamW."
    )


class IA3Method(Section):
    """IA3: learned scaling vectors on keys, values and the feed-forward input; base frozen."""

    name: Literal["ia3"]
    target_modules: list[str] | None = Field(
        None,
        description="Modules scaled; default PEFT's for the architecture (llama: k_proj, v_proj, down_proj).",
    )
    feedforward_modules: list[str] | None = Field(
        None,
        description="Which targets are feed-forward (scaled on their input); must be among target_modules.",
    )

    @model_validator(mode="after")
    def _feedforward_among_targets(self) -> IA3Method:
        if self.feedforward_modules and self.target_modules is not None:
            extra = set(self.feedforward_modules) - set(self.target_modules)
            if extra:
                raise ValueError(f"feedforward_modules {sorted(extra)} are not in target_modules")
        if self.feedforward_modules and self.target_modules is None:
            raise ValueError("feedforward_modules needs target_modules too")
        return self


class PTuningMethod(Section):
    """P-Tuning: virtual tokens produced by a prompt encoder (LSTM or MLP); base frozen."""

    name: Literal["ptuning"]
    num_virtual_tokens: int = Field(20, ge=1, description="Virtual tokens prepended to every input.")
    encoder_type: Literal["lstm", "mlp"] = Field("mlp", description="Prompt encoder.")
    encoder_hidden_size: int = Field(128, ge=1, description="Hidden size of the prompt encoder.")
    encoder_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout in the prompt encoder.")


class PrefixMethod(Section):
    """Prefix tuning: trainable key/value prefixes at every layer; base frozen."""

    name: Literal["prefix"]
    num_virtual_tokens: int = Field(20, ge=1, description="Prefix length.")
    projection: bool = Field(False, description="Reparameterise the prefixes through a 2-layer MLP.")
    encoder_hidden_size: int = Field(128, ge=1, description="Hidden size of that MLP.")


class PromptMethod(Section):
    """Prompt tuning: trainable soft-prompt embeddings; base frozen."""

    name: Literal["prompt"]
    num_virtual_tokens: int = Field(20, ge=1, description="Soft-prompt length.")
    init_text: str | None = Field(
        None, description="Initialise the soft prompt from this text's token embeddings (default random)."
    )


MethodSpec = Annotated[
    Union[  # noqa: UP007
        FullMethod,
        FreezeMethod,
        AdapterMethod,
        LoraMethod,
        QLoraMethod,
        IA3Method,
        PTuningMethod,
        PrefixMethod,
        PromptMethod,
    ],
    Field(discriminator="name"),
]
PROMPT_LEARNING = ("ptuning", "prefix", "prompt")
FROZEN_BASE = ("adapter", "lora", "qlora", "ia3", *PROMPT_LEARNING)
MERGEABLE = ("lora", "qlora", "ia3")
