"""Models: build a causal LM from an architecture block, or load one from a Hugging Face folder.

    from raylm.planning.models import build_model
    model = build_model(spec.model, vocab_size=len(tokenizer))

Loading goes through safetensors only; custom modelling code runs only with trust_remote_code.
"""

from __future__ import annotations

from pathlib import Path

from raylm.spec.sections import Architecture, ModelSpec

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def architecture_config(arch: Architecture, vocab_size: int, tokenizer=None):
    """A transformers config for `arch`; special token ids follow the tokenizer."""
    from transformers import GPT2Config, LlamaConfig

    vocab = arch.vocab_size or vocab_size
    ids = {}
    if tokenizer is not None:
        ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    if arch.family == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_positions=arch.context,
            n_embd=arch.hidden,
            n_layer=arch.layers,
            n_head=arch.heads,
            n_inner=arch.intermediate,
            tie_word_embeddings=arch.tie_embeddings,
            resid_pdrop=arch.dropout,
            embd_pdrop=arch.dropout,
            attn_pdrop=arch.dropout,
            layer_norm_epsilon=arch.norm_eps,
            initializer_range=arch.init_std,
            **ids,
        )
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=arch.hidden,
        intermediate_size=arch.intermediate,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads or arch.heads,
        max_position_embeddings=arch.context,
        tie_word_embeddings=arch.tie_embeddings,
        attention_dropout=arch.dropout,
        rms_norm_eps=arch.norm_eps,
        rope_theta=arch.rope_theta,  # transformers 5 files it under rope_parameters
        initializer_range=arch.init_std,
        **ids,
    )


def build_model(spec: ModelSpec, vocab_size: int, tokenizer=None, seed: int = 0, empty: bool = False):
    """The model of `spec`: random init from the architecture (seeded), or weights from `spec.path`.

    `empty`: the structure only, parameters on the meta device (no memory) and buffers computed as
    usual, for a rank whose shard a sharded strategy fills from rank 0 (raylm/train/strategies)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, DTYPES[spec.dtype])
    options = {"dtype": dtype, "attn_implementation": spec.attention}
    if spec.architecture is not None or empty:
        config = (
            architecture_config(spec.architecture, vocab_size, tokenizer)
            if spec.architecture is not None
            else AutoConfig.from_pretrained(
                spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
            )
        )
        torch.manual_seed(seed)
        with empty_weights(empty):
            model = AutoModelForCausalLM.from_config(
                config, trust_remote_code=spec.trust_remote_code, **options
            )
    else:
        model = AutoModelForCausalLM.from_pretrained(
            spec.path,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
            use_safetensors=True,
            **options,
        )
    if model.get_input_embeddings().num_embeddings < vocab_size:
        with empty_weights(empty):
            model.resize_token_embeddings(vocab_size)
    return model


def empty_weights(enabled: bool = True):
    """Parameters created inside go to the meta device (buffers stay real: RoPE's are computed, not
    loaded); a plain context when not `enabled`."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def model_config(job):
    """The transformers config of a job's model, without loading weights: from its architecture block
    (vocabulary: the tokenizer it trains, else 256) or the config.json of its folder / hub id."""
    from raylm.spec.reading import SpecError

    if job.model.architecture is not None:
        arch = job.model.architecture
        training = job.tokenizer.train
        vocab = arch.vocab_size or (training.vocab_size if training and training.type == "bpe" else 256)
        return architecture_config(arch, vocab)
    from transformers import AutoConfig

    path = job.model.path
    if not Path(path).expanduser().is_dir() and not looks_like_hub_id(path):
        raise SpecError(
            [("model.path", f"{path} is not a folder on this machine (nor a hub id like org/name)")]
        )
    try:
        return AutoConfig.from_pretrained(
            path, revision=job.model.revision, trust_remote_code=job.model.trust_remote_code
        )
    except Exception as err:  # OSError, huggingface_hub's validation errors, ValueError ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SpecError([("model.path", f"cannot read the config of {path} here ({reason})")]) from None


def meta_model(config, method=None):
    """The model of `config` (with a fine-tuning method applied) on the meta device: shapes and
    parameter counts without memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        if method is not None:
            from raylm import methods

            model = methods.apply(model, method)
    return model


def looks_like_hub_id(path: str) -> bool:
    """`org/name`: a Hugging Face hub id rather than a local path."""
    return path.count("/") == 1 and not path.startswith((".", "/", "~")) and "://" not in path
