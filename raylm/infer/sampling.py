"""Generation with raylm's controls (raylm.spec.generation.GenerationSpec) through transformers'
`generate`: greedy, sampling (temperature, top-k, top-p, min-p), beam search, repetition penalty,
stop sequences, seeds, several choices; finish reasons and token counts as OpenAI reports them.

    from raylm.infer.sampling import complete
    result = complete(model, tokenizer, "Once upon a time", GenerationSpec(temperature=0.7, seed=1))
    result["choices"][0]["text"], result["usage"]
"""

from __future__ import annotations


class GenerationError(ValueError):
    """A request the model cannot serve (too long for its context); the message says why."""


def generate_kwargs(controls, tokenizer) -> dict:
    """transformers `generate` arguments for `controls`. Every sampling control is given explicitly, so
    transformers' own defaults (top_k 50) and a model's saved generation config do not apply."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = {
        "max_new_tokens": controls.max_new_tokens,
        "do_sample": controls.sampling,
        "num_beams": controls.num_beams,
        "num_return_sequences": controls.n,
        "repetition_penalty": controls.repetition_penalty,
        "pad_token_id": pad,
    }
    if controls.sampling:
        kwargs.update(
            temperature=controls.temperature,
            top_k=controls.top_k or 0,
            top_p=controls.top_p if controls.top_p is not None else 1.0,
            min_p=controls.min_p,
        )
    else:  # greedy / beam search: no sampling controls at all
        kwargs.update(temperature=None, top_k=None, top_p=None, min_p=None)
    if controls.num_beams > 1:
        kwargs["length_penalty"] = controls.length_penalty
    if controls.stop:
        kwargs.update(stop_strings=list(controls.stop), tokenizer=tokenizer)
    return kwargs


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )


def check_fits(prompt_tokens: int, controls, limit: int | None, field: str = "max_new_tokens") -> None:
    """Refuse a prompt whose tokens plus the tokens to generate exceed the model's context; `field`
    names the limit as the caller knows it (the server's max_tokens)."""
    if limit is not None and prompt_tokens + controls.max_new_tokens > limit:
        raise GenerationError(
            f"the prompt ({prompt_tokens} tokens) plus {field} ({controls.max_new_tokens}) exceed the "
            f"model's context of {limit} tokens: shorten the prompt or lower {field}"
        )


def complete(model, tokenizer, prompt: str | list[int], controls) -> dict:
    """`controls.n` continuations of one prompt (text or token ids): {"choices": [{"index", "text",
    "finish_reason": "stop" | "length", "tokens"}], "usage": {"prompt_tokens", "completion_tokens"}}."""
    import torch

    ids = (
        tokenizer(prompt, return_tensors="pt")["input_ids"][0].tolist()
        if isinstance(prompt, str)
        else list(prompt)
    )
    check_fits(len(ids), controls, context_length(model))
    device = next(model.parameters()).device
    if controls.seed is not None:
        torch.manual_seed(controls.seed)
    model.eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            **generate_kwargs(controls, tokenizer),
        )
    eos = eos_ids(model, tokenizer)
    choices = [
        _choice(i, ids, row[len(ids) :].tolist(), tokenizer, controls, eos) for i, row in enumerate(out)
    ]
    return {
        "choices": choices,
        "usage": {"prompt_tokens": len(ids), "completion_tokens": sum(c["tokens"] for c in choices)},
    }


def eos_ids(model, tokenizer) -> frozenset[int]:
    """Every end-of-sequence id: the generation config's (Llama-3-style models list several, and
    `generate` stops on each) and the tokenizer's."""
    config = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    listed = config if isinstance(config, (list, tuple)) else [config]
    return frozenset(i for i in [*listed, tokenizer.eos_token_id] if i is not None)


def completion_text(tokenizer, prompt_ids: list[int], generated: list[int], context: int = 5) -> str:
    """The text `generated` adds after the prompt, decoded in the context of the prompt's last tokens:
    a completion that starts a new word keeps its leading space (SentencePiece drops it when the
    completion is decoded alone)."""
    tail = list(prompt_ids[-context:])
    before = tokenizer.decode(tail, skip_special_tokens=True)
    after = tokenizer.decode(tail + generated, skip_special_tokens=True)
    if after.startswith(before):
        return after[len(before) :]
    return tokenizer.decode(generated, skip_special_tokens=True)


def _choice(index: int, prompt_ids, generated: list[int], tokenizer, controls, eos: frozenset[int]) -> dict:
    """One continuation: cut at the first end-of-sequence id (padding after it is not the model's) and
    at the first stop sequence (not included, as in OpenAI's API)."""
    pad = tokenizer.pad_token_id
    finish = "length"
    while pad is not None and pad not in eos and generated and generated[-1] == pad:
        generated = generated[:-1]  # a choice that stopped (at a stop sequence) before the others
        finish = "stop"
    ends = [i for i, token in enumerate(generated) if token in eos]
    if ends:
        generated = generated[: ends[0] + 1]
        finish = "stop"
    text = completion_text(tokenizer, prompt_ids, generated)
    cuts = [text.find(s) for s in controls.stop if s in text]
    if cuts:
        text, finish = text[: min(cuts)], "stop"
    return {"index": index, "text": text, "finish_reason": finish, "tokens": len(generated)}
