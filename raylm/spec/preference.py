"""The `preference:` section of a finetune job: train on a preferred and a rejected answer.

    kind: finetune
    data: {path: pairs.jsonl, format: preference}      # prompt, chosen, rejected
    preference: {objective: dpo, beta: 0.1}

Objectives (the same formulas as TRL's trainers; log-probabilities are summed over the answer's
tokens, SimPO and IPO average them):

    dpo      -log sigmoid(beta * margin)                              Rafailov et al. 2023
    ipo      (margin / |y| - 1 / (2 beta))^2                          Azar et al. 2023
    hinge    relu(1 - beta * margin)                                  SLiC, Zhao et al. 2023
    robust   DPO with label_smoothing: the share of flipped labels    Chowdhury et al. 2024
    orpo     NLL(chosen) - beta * log sigmoid(log odds ratio)         Hong et al. 2024 (no reference)
    simpo    -log sigmoid(beta * (mean logp_w - mean logp_l) - gamma) Meng et al. 2024 (no reference)
    kto      unpaired (data.format: kto): 1 - sigmoid(beta * (log ratio - KL)) per example
             (desirable) or 1 - sigmoid(beta * (KL - log ratio)) (undesirable)  Ethayarajh et al. 2024

with margin = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)). The reference
model is the starting model: for adapter methods the same model with its adapters switched off, for
full and freeze fine-tuning a frozen copy (sharded like the policy under fsdp).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raylm.spec.sections import Section

WITHOUT_REFERENCE = ("orpo", "simpo")
# the usual beta of each objective (SimPO's reward scale is ~20x DPO's; ORPO's is the weight lambda)
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "hinge": 0.1, "robust": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1}


class PreferenceSpec(Section):
    """Preference optimisation: the objective and its settings."""

    objective: Literal["dpo", "ipo", "hinge", "robust", "orpo", "simpo", "kto"] | None = Field(
        None,
        description="dpo (sigmoid), ipo, hinge, robust (DPO with label smoothing), orpo and simpo (no "
        "reference model), kto (unpaired, data.format: kto). Default: dpo, for kto data kto.",
    )
    beta: float | None = Field(
        None,
        gt=0,
        description="dpo / ipo / hinge / robust / kto: how far from the reference the policy may move "
        "(larger: closer); simpo: the reward scale; orpo: the odds-ratio term's weight (lambda). "
        "Default: 0.1, for simpo 2.0.",
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="robust: the assumed share of pairs whose labels are flipped."
    )
    gamma: float = Field(0.5, ge=0.0, description="simpo: the target reward margin.")
    sft_weight: float = Field(
        0.0,
        ge=0.0,
        description="Weight of the chosen answers' mean token NLL added to a pairwise loss: keeps the "
        "chosen answers likely while the margin grows (DPO + NLL is RPO, TRL's loss_type [sigmoid, "
        "sft]; for simpo TRL's cpo_alpha). orpo has its own NLL term; not for kto.",
    )
    precompute_reference: bool = Field(
        False,
        description="Compute the reference's log-probabilities once before training (stored beside the "
        "tokenized data) instead of at every step: training then holds one model and runs one forward "
        "pass per batch.",
    )
    disable_dropout: bool = Field(
        True,
        description="Dropout off in the policy and the reference (as TRL): their log-probabilities are "
        "then deterministic and equal at the start.",
    )
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the desirable examples' loss.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the undesirable examples' loss.")

    @property
    def scale(self) -> float:
        """beta, or the objective's usual one."""
        return self.beta if self.beta is not None else DEFAULT_BETA[self.objective]

    @property
    def uses_reference(self) -> bool:
        return self.objective not in WITHOUT_REFERENCE

    def problems(self) -> list[tuple[str, str]]:
        """Settings that do nothing for the objective (which the job resolves from its data first):
        (field, message with the fix)."""
        objective = self.objective
        found = []
        if self.sft_weight and objective in ("orpo", "kto"):
            why = (
                "has its own NLL term (weight 1)" if objective == "orpo" else "learns from unpaired examples"
            )
            found.append(("sft_weight", f"adds an NLL term to a pairwise loss; {objective} {why}: remove it"))
        if self.precompute_reference and objective in WITHOUT_REFERENCE:
            found.append(("precompute_reference", f"{objective} has no reference model: remove it"))
        only = {
            "label_smoothing": "robust",
            "gamma": "simpo",
            "desirable_weight": "kto",
            "undesirable_weight": "kto",
        }
        for field, owner in only.items():
            # away from its default (a spec written back from a dump carries every default)
            if getattr(self, field) != type(self).model_fields[field].default and objective != owner:
                found.append(
                    (
                        field,
                        f"is {owner}'s setting, the objective is {objective}: set objective: {owner} or remove it",
                    )
                )
        return found
