"""T-Few's loss terms and choice accuracy against a hand computation on a two-example batch, and the
multiple-choice rows the data pipeline makes."""

import math

import numpy as np
import pytest
import torch

from raylm.spec.sections import ObjectiveSpec
from raylm.train.objectives import choices_eval, choices_loss, tfew_terms

pytestmark = pytest.mark.quick

IGNORE = -100
V = 5


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are given: what the loss does with them is all that is tested."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None):
        assert input_ids.shape == self.logits.shape[:2]
        return type("Out", (), {"logits": self.logits})()


def batch_and_logits():
    """2 examples x 2 choices x length 4. Labels: prompt token at 0-1, choice tokens after."""
    torch.manual_seed(0)
    ids = torch.randint(0, V, (2, 2, 4))
    labels = torch.full((2, 2, 4), IGNORE)
    labels[0, 0, 2:] = ids[0, 0, 2:]  # example 0, choice 0: 2 tokens
    labels[0, 1, 2:3] = ids[0, 1, 2:3]  # choice 1: 1 token
    labels[1, 0, 1:] = ids[1, 0, 1:]  # example 1, choice 0: 3 tokens
    labels[1, 1, 2:] = ids[1, 1, 2:]  # choice 1: 2 tokens
    mask = torch.ones_like(ids)
    answer = torch.tensor([1, 0])
    logits = torch.randn(4, 4, V)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "answer": answer}, logits


def by_hand(batch, logits):
    """The three terms written out with Python floats, token by token."""
    labels, answer = batch["labels"].tolist(), batch["answer"].tolist()
    rows = logits.tolist()  # [example * 2 + choice][position][vocab]

    def logp(row, t, token):
        z = rows[row][t]
        return z[token] - math.log(sum(math.exp(v) for v in z))

    right_sum = right_n = wrong_sum = wrong_n = ln = 0.0
    for e in range(2):
        betas = []
        for c in range(2):
            lps = [logp(e * 2 + c, t - 1, labels[e][c][t]) for t in range(1, 4) if labels[e][c][t] != IGNORE]
            betas.append(sum(lps) / len(lps))
            if c == answer[e]:
                right_sum -= sum(lps)
                right_n += len(lps)
            else:
                wrong_sum -= sum(math.log(1 - math.exp(lp)) for lp in lps)
                wrong_n += len(lps)
        ln += -(betas[answer[e]] - math.log(sum(math.exp(b) for b in betas)))
    return {"lm": right_sum / right_n, "unlikelihood": wrong_sum / wrong_n, "length_norm": ln / 2}


def test_each_term_equals_the_hand_computation():
    batch, logits = batch_and_logits()
    expected = by_hand(batch, logits)
    from raylm.train.objectives import choice_logprobs

    token_logp, valid = choice_logprobs(FixedLogits(logits), batch)
    terms = tfew_terms(token_logp, valid, batch["answer"])
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5), name
    weighted = choices_loss(FixedLogits(logits), batch, ObjectiveSpec(lm=1, unlikelihood=0.5, length_norm=2))
    assert weighted.item() == pytest.approx(
        expected["lm"] + 0.5 * expected["unlikelihood"] + 2 * expected["length_norm"], rel=1e-5
    )


def test_accuracy_picks_the_highest_length_normalised_choice():
    batch, logits = batch_and_logits()
    expected = by_hand(batch, logits)
    nll, tokens, right, examples = choices_eval(FixedLogits(logits), batch)
    # the right choices: example 0's choice 1 (1 labelled token), example 1's choice 0 (3)
    assert examples == 2 and tokens == 1 + 3
    assert nll / tokens == pytest.approx(expected["lm"], rel=1e-5)
    # by hand: which choice has the higher mean log-likelihood
    labels, rows = batch["labels"].tolist(), logits.tolist()
    picks = []
    for e in range(2):
        betas = []
        for c in range(2):
            lps = [
                rows[e * 2 + c][t - 1][labels[e][c][t]]
                - math.log(sum(math.exp(v) for v in rows[e * 2 + c][t - 1]))
                for t in range(1, 4)
                if labels[e][c][t] != IGNORE
            ]
            betas.append(sum(lps) / len(lps))
        picks.append(int(np.argmax(betas)))
    assert right == sum(p == a for p, a in zip(picks, batch["answer"].tolist(), strict=True))


def test_choice_rows_keep_each_examples_choices_together():
    from raylm.data.sft import tokenize_batch
    from raylm.data.tasks import generate
    from raylm.data.tokenizer import train_tokenizer
    from raylm.spec.sft import SFTDataSpec

    rows = generate("recall", 40, seed=1, choices=4)
    tokenizer = train_tokenizer([r["prompt"] + "".join(r["choices"]) for r in rows], "char", 0)
    spec = SFTDataSpec(generate={"task": "recall"}, format="choices", seq_len=48, val_fraction=0.0)
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    (out,) = list(tokenize_batch(batch, tokenizer, spec))
    assert not out["val"].any()
    assert out["input_ids"].shape == (40, 4, 48) and out["answer"].tolist() == [r["answer"] for r in rows]
    first = rows[0]
    for c, choice in enumerate(first["choices"]):
        labelled = out["labels"][0, c][out["labels"][0, c] != IGNORE]
        assert tokenizer.decode(labelled, skip_special_tokens=True) == choice
