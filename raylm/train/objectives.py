"""T-Few's objectives for multiple-choice data (Liu et al. 2022, "Few-Shot Parameter-Efficient
Fine-Tuning is Better and Cheaper than In-Context Learning"), and choice accuracy.

A `choices` batch holds every example's choices side by side: input_ids / labels / attention_mask of
shape [batch, choices, length] (labels only on the choice's tokens) and `answer` [batch].

    lm            cross-entropy of the right choice's tokens (mean over its tokens in the batch)
    unlikelihood  -log(1 - p(token)) over the wrong choices' tokens (mean over those tokens)
    length_norm   softmax cross-entropy over the choices' length-normalised log-likelihoods
                  beta(x, y) = (1 / |y|) sum_t log p(y_t | x, y_<t)
    loss = objective.lm * lm + objective.unlikelihood * unlikelihood + objective.length_norm * length_norm

Evaluation picks the choice with the highest beta (accuracy).
"""

from __future__ import annotations

IGNORE = -100


def choice_logprobs(model, batch: dict):
    """Per-token log-probabilities of each choice's labelled tokens: (logp [B, C, L-1], valid [B, C, L-1])."""
    import torch

    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    b, c, length = ids.shape
    logits = model(input_ids=ids.reshape(b * c, length), attention_mask=mask.reshape(b * c, length)).logits
    logits = logits[:, -length:]  # prompt-learning methods prepend virtual tokens
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = labels.reshape(b * c, length)[:, 1:]
    valid = target != IGNORE
    token_logp = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    return token_logp.reshape(b, c, length - 1), valid.reshape(b, c, length - 1)


def length_normalised(token_logp, valid):
    """beta(x, y) for every choice: [B, C]."""
    return token_logp.sum(-1) / valid.sum(-1).clamp(min=1)


def tfew_terms(token_logp, valid, answer) -> dict:
    """The three terms (each a scalar tensor) of a choices batch."""
    import torch

    right = torch.nn.functional.one_hot(answer, token_logp.shape[1]).bool()  # [B, C]
    right_tokens = valid & right.unsqueeze(-1)
    wrong_tokens = valid & ~right.unsqueeze(-1)
    lm = -(token_logp * right_tokens).sum() / right_tokens.sum().clamp(min=1)
    p = token_logp.exp().clamp(max=1 - 1e-6)
    unlikelihood = -(torch.log1p(-p) * wrong_tokens).sum() / wrong_tokens.sum().clamp(min=1)
    length_norm = torch.nn.functional.cross_entropy(length_normalised(token_logp, valid), answer)
    return {"lm": lm, "unlikelihood": unlikelihood, "length_norm": length_norm}


def choices_loss(model, batch: dict, objective):
    """The weighted T-Few loss of a choices batch (`objective`: a TrainSpec.objective block)."""
    token_logp, valid = choice_logprobs(model, batch)
    terms = tfew_terms(token_logp, valid, batch["answer"])
    return sum(getattr(objective, name) * value for name, value in terms.items() if getattr(objective, name))


def choices_eval(model, batch: dict) -> tuple[float, int, int, int]:
    """(summed NLL of the right choices' tokens, their count, correct picks, examples)."""
    token_logp, valid = choice_logprobs(model, batch)
    answer = batch["answer"]
    right = token_logp[range(len(answer)), answer]
    picked = length_normalised(token_logp, valid).argmax(-1)
    return (
        float(-right.sum()),
        int(valid[range(len(answer)), answer].sum()),
        int((picked == answer).sum()),
        len(answer),
    )
