"""Log-probabilities of tokens under a model: one forward pass over prompt + completion.

    entries = token_logprobs(model, tokenizer, ids, start=len(prompt_ids), top=2)
    entries[0].token, entries[0].logprob, entries[0].top      # "▁cat", -1.83, [("▁cat", -1.83), ...]

What the server's `logprobs` / `echo` (and evaluation clients such as lm-evaluation-harness's
`local-completions`, which score a continuation with `echo` and `max_tokens: 0`) read. The values
are the model's own distribution, log_softmax of its logits before any sampling control
(temperature, top-k ...), as vLLM reports them by default.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenLogprob:
    token_id: int
    token: str  # the token's text as decoded alone
    logprob: float | None  # None for the first token (nothing before it predicts it)
    top: list[tuple[str, float]]  # the `top` most likely tokens at that position, most likely first


def token_logprobs(model, tokenizer, ids: list[int], start: int, top: int, adapter: str | None = None):
    """A TokenLogprob for each of ids[start:], each predicted from the ids before it."""
    import torch

    device = next(model.parameters()).device
    kwargs = {} if adapter is None else {"adapter_names": [adapter]}
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=device), **kwargs).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    entries = []
    for position in range(start, len(ids)):
        token = ids[position]
        if position == 0:
            entries.append(TokenLogprob(token, tokenizer.decode([token]), None, []))
            continue
        row = logprobs[position - 1]
        best = torch.topk(row, top) if top else None
        ranked = [] if best is None else list(zip(best.indices.tolist(), best.values.tolist(), strict=True))
        entries.append(
            TokenLogprob(
                token,
                tokenizer.decode([token]),
                float(row[token]),
                [(tokenizer.decode([i]), value) for i, value in ranked],
            )
        )
    return entries
