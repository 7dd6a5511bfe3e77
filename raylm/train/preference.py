"""Preference objectives on the training loop: DPO, IPO, hinge, robust DPO, ORPO, SimPO and KTO
(formulas in raylm/spec/preference.py; each equals TRL's implementation, tests/train/test_preference.py).

A preference batch (raylm/data/preference.py) holds two sequences per example, [batch, 2, length]:
the chosen and the rejected answer (`pair`), or for KTO the completion and the KL estimate's
mismatched one (`desirable`). Their log-probabilities are summed over the answer's tokens. The
reference's come from the same model with its adapters switched off (adapter methods: no second copy
in memory), or from a frozen copy of the starting model (full and freeze fine-tuning), evaluated
without dropout and without gradients.

The loop's convention: a training loss is the batch's own (TRL's, for one batch) times its examples
over `items`, the global batch's examples per rank, so that summing over micro-batches and averaging
over ranks gives the global batch's mean.
"""

from __future__ import annotations

import contextlib


def is_preference(batch: dict) -> bool:
    return "pair" in batch or "desirable" in batch


def answer_logps(model, batch: dict):
    """(summed log-probabilities [B, 2], answer token counts [B, 2], the chosen answers' mean token
    NLL over the batch) of both sequences of every example."""
    from raylm.train.objectives import choice_logprobs

    token_logp, valid = choice_logprobs(model, batch)
    counts = valid.sum(-1)
    nll = -(token_logp[:, 0]).sum() / counts[:, 0].sum().clamp(min=1)
    return token_logp.sum(-1), counts, nll


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (ORPO's odds)."""
    import torch

    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_terms(spec, policy, reference, counts, nll):
    """(loss of the batch, chosen rewards, rejected rewards) of a batch of pairs. `policy` /
    `reference`: summed log-probabilities [B, 2] (reference None for orpo and simpo); `counts`: the
    answers' token counts [B, 2]; `nll`: the chosen answers' mean token NLL."""
    import torch.nn.functional as F

    beta, objective = spec.scale, spec.objective
    if objective in ("orpo", "simpo"):
        mean = policy / counts.clamp(min=1)  # both average over the answer's tokens
        chosen, rejected = mean[:, 0], mean[:, 1]
        if objective == "orpo":
            log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
            loss = nll - (beta * F.logsigmoid(log_odds)).mean()
        else:
            loss = -F.logsigmoid(beta * (chosen - rejected) - spec.gamma).mean() + spec.sft_weight * nll
        return loss, beta * chosen.detach(), beta * rejected.detach()
    ratios = policy - reference
    delta = ratios[:, 0] - ratios[:, 1]
    if objective == "dpo":
        losses = -F.logsigmoid(beta * delta)
    elif objective == "hinge":
        losses = F.relu(1 - beta * delta)
    elif objective == "ipo":  # per-token ratios (TRL's normalisation, confirmed with IPO's authors)
        per_token = ratios / counts.clamp(min=1)
        losses = (per_token[:, 0] - per_token[:, 1] - 1 / (2 * beta)) ** 2
    else:  # robust
        eps = spec.label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    loss = losses.mean() + spec.sft_weight * nll if spec.sft_weight else losses.mean()
    return loss, beta * ratios[:, 0].detach(), beta * ratios[:, 1].detach()


def kto_terms(spec, policy, reference, desirable, kl):
    """(loss of the batch, desirable rewards, undesirable rewards) of a KTO batch: column 0 the
    examples' completions, `desirable` [B] bool, `kl` the (detached) KL estimate."""
    import torch

    ratio = policy[:, 0] - reference[:, 0]
    beta = spec.scale
    good, bad = ratio[desirable], ratio[~desirable]
    losses = torch.cat(
        [
            spec.desirable_weight * (1 - torch.sigmoid(beta * (good - kl))),
            spec.undesirable_weight * (1 - torch.sigmoid(beta * (kl - bad))),
        ]
    )
    return losses.mean(), beta * good.detach(), beta * bad.detach()


def kl_estimate(policy, reference):
    """KTO's KL term: the mismatched pairs' mean log ratio over every rank's batch, at least 0."""
    import torch.distributed as dist

    kl = (policy[:, 1] - reference[:, 1]).mean().detach()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(kl)
        kl = kl / dist.get_world_size()
    return kl.clamp(min=0)


class Preference:
    """The objective of a preference run: `objective(model, batch, items)` for training steps and
    `evaluate(model, batch)` for held-out batches. `reference(model, batch)` gives the reference's
    summed log-probabilities [B, 2] (None for orpo and simpo, and where the batches carry them:
    `reference`, precomputed)."""

    def __init__(self, spec, reference):
        self.spec = spec
        self.reference = reference if spec.uses_reference else None

    def terms(self, model, batch: dict):
        """(loss of the batch, chosen / desirable rewards, rejected / undesirable rewards)."""
        policy, counts, nll = answer_logps(model, batch)
        if "reference" in batch:  # precomputed (preference.precompute_reference)
            reference = batch["reference"].to(policy.dtype)
        else:
            reference = self.reference(model, batch) if self.reference is not None else None
        if "desirable" in batch:
            return kto_terms(
                self.spec, policy, reference, batch["desirable"].bool(), kl_estimate(policy, reference)
            )
        return pair_terms(self.spec, policy, reference, counts, nll)

    def __call__(self, model, batch: dict, items=None):
        loss, _, _ = self.terms(model, batch)
        return loss if items is None else loss * len(batch["input_ids"]) / items

    def evaluate(self, model, batch: dict) -> list[float]:
        """Sums over the batch: [loss x examples, examples, chosen rewards, chosen count, rejected
        rewards, rejected count, right]. Right: a pair whose chosen answer has the higher reward; for
        KTO an example whose reward has its label's sign; a tie counts half (before training every
        reward is 0: accuracy 0.5)."""
        loss, chosen, rejected = self.terms(model, batch)
        n = len(batch["input_ids"])
        if "desirable" in batch:
            right = _wins(chosen, 0.0) + _wins(0.0, rejected)
        else:
            right = _wins(chosen, rejected)
        return [
            float(loss) * n,
            n,
            float(chosen.sum()),
            len(chosen),
            float(rejected.sum()),
            len(rejected),
            right,
        ]


def _wins(higher, lower) -> float:
    """How many of `higher` exceed `lower`, ties counted half."""
    import torch

    higher, lower = torch.as_tensor(higher), torch.as_tensor(lower)
    return float((higher > lower).sum()) + 0.5 * float((higher == lower).sum())


def preference_row(sums: list[float]) -> dict:
    """The logged evaluation of preference data from Preference.evaluate's sums over every batch and
    rank: val_loss (the objective's), rewards of the chosen and the rejected answers, their margin
    and the reward accuracy."""
    loss, n, chosen, n_chosen, rejected, n_rejected, right = sums
    row = {"val_loss": loss / n, "reward_accuracy": right / n}
    if n_chosen:
        row["rewards_chosen"] = chosen / n_chosen
    if n_rejected:
        row["rewards_rejected"] = rejected / n_rejected
    if n_chosen and n_rejected:
        row["reward_margin"] = row["rewards_chosen"] - row["rewards_rejected"]
    return row


def unwrapped(model):
    """The model inside a compile / DDP / DeepSpeed wrapper (FSDP2 shards the model in place)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


@contextlib.contextmanager
def evaluating(model):
    """No gradients and no dropout for a reference pass; the model's mode is restored after."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def adapters_off(switch):
    """The reference of an adapter method: the policy with its adapters switched off (`switch`: the
    method's `reference(model)` context)."""

    def reference(model, batch: dict):
        inner = unwrapped(model)
        with evaluating(inner), switch(inner):
            return answer_logps(inner, batch)[0]

    return reference


def frozen_copy(copy):
    """The reference of full and freeze fine-tuning: `copy`, a frozen model of the starting weights."""

    def reference(model, batch: dict):
        with evaluating(copy):
            return answer_logps(copy, batch)[0]

    return reference


def without_dropout(model) -> None:
    """Every dropout probability to 0 (as TRL's `disable_dropout`): the policy's and the reference's
    log-probabilities are then deterministic, and equal at the start."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # Llama-style attention
            module.attention_dropout = 0.0
