"""The preference objectives against TRL's own code on the same logits: DPO, IPO, hinge, robust DPO
and DPO + NLL through DPOTrainer's loss, ORPO through ORPOTrainer's odds-ratio loss and its NLL, SimPO
through CPOTrainer's loss, KTO through KTOTrainer's; loss and gradients (fp32, atol 1e-5). Then the
reference of an adapter method (the base's own forward), and the preference rows the data makes."""

import json
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from raylm.spec.preference import PreferenceSpec
from raylm.train.preference import Preference

pytestmark = pytest.mark.quick

IGNORE = -100
B, L, V = 4, 9, 13


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are given: [B * 2, L, V] for the rows [example 0 chosen, example 0
    rejected, example 1 chosen, ...]."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.logits)


def pairs_batch(seed: int = 0) -> dict:
    """4 examples x 2 answers, prompts of 2-4 tokens, answers of 1-5 tokens, right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, 2, L), generator=g)
    labels = torch.full((B, 2, L), IGNORE)
    mask = torch.zeros((B, 2, L), dtype=torch.long)
    for e in range(B):
        prompt = 2 + e % 3
        for c in range(2):
            end = min(L, prompt + 1 + (e + 2 * c) % 5)
            labels[e, c, prompt:end] = ids[e, c, prompt:end]
            mask[e, c, :end] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def trl_token_logps(logits, labels):
    """TRL's per-token log-probabilities of the labelled tokens (0 elsewhere), [rows, L - 1]."""
    from trl.trainer.utils import selective_log_softmax

    target = labels[:, 1:]
    return selective_log_softmax(logits[:, :-1], target.clamp(min=0)) * (target != IGNORE)


def as_trl_rows(x):
    """[B, 2, ...] -> TRL's concatenated [chosen rows; rejected rows]."""
    return torch.cat([x[:, 0], x[:, 1]])


def from_trl_rows(x):
    return torch.stack([x[:B], x[B:]], dim=1)


def our_loss(spec, logits, batch, reference=None):
    objective = Preference(spec, (lambda model, batch: reference) if reference is not None else None)
    return objective.terms(FixedLogits(logits), batch)[0]


def trl_accelerator():
    return SimpleNamespace(
        device=torch.device("cpu"),
        gather=lambda t: t,
        gather_for_metrics=lambda t: t,
        unwrap_model=lambda m: m,
    )


def trl_dpo_loss(logits_rows, batch, reference, loss_types, weights, beta, label_smoothing=0.0):
    """DPOTrainer._compute_loss on the same tokens: its model answers with TRL's own per-token
    log-probabilities of the logits, its reference log-probabilities are the precomputed ones."""
    from trl import DPOTrainer

    labels = as_trl_rows(batch["labels"])
    completion = (labels != IGNORE).long()
    per_token = trl_token_logps(logits_rows, labels)

    def model(**kwargs):
        return SimpleNamespace(
            log_probs=per_token,
            entropy=torch.zeros_like(per_token),
            mean_logits=torch.zeros_like(per_token),
            is_top1=torch.zeros_like(per_token, dtype=torch.bool),
        )

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=trl_accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=weights,
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": as_trl_rows(batch["input_ids"]),
        "attention_mask": as_trl_rows(batch["attention_mask"]),
        "completion_mask": completion,
        "ref_chosen_logps": reference[:, 0],
        "ref_rejected_logps": reference[:, 1],
    }
    return DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)


def reference_sums(batch, seed=1):
    """A reference model's summed log-probabilities of the answers (from other logits)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B * 2, L, V, generator=g)
    labels = batch["labels"].reshape(B * 2, L)
    return trl_token_logps(logits, labels).sum(-1).reshape(B, 2)


def compare(ours_fn, trl_fn):
    """Loss and gradient w.r.t. the same logits, ours and TRL's."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(B * 2, L, V, generator=g) * 2
    ours_logits = base.clone().requires_grad_(True)  # rows in raylm's order (example-major)
    trl_logits = as_trl_rows(base.reshape(B, 2, L, V)).clone().requires_grad_(True)
    ours, theirs = ours_fn(ours_logits), trl_fn(trl_logits)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    ours_grad = ours_logits.grad.reshape(B, 2, L, V)
    torch.testing.assert_close(ours_grad, from_trl_rows(trl_logits.grad), atol=1e-5, rtol=0)
    assert ours_grad.abs().sum() > 0
    return ours.item()


@pytest.mark.parametrize(
    "objective, trl_types, extra",
    [
        ("dpo", ["sigmoid"], {}),
        ("ipo", ["ipo"], {}),
        ("hinge", ["hinge"], {}),
        ("robust", ["robust"], {"label_smoothing": 0.2}),
        ("dpo", ["sigmoid", "sft"], {"sft_weight": 0.7}),  # RPO
    ],
)
def test_pairwise_objectives_equal_trls_dpo_trainer(objective, trl_types, extra):
    batch = pairs_batch()
    reference = reference_sums(batch)
    spec = PreferenceSpec(objective=objective, beta=0.3, **extra)
    weights = [1.0, extra.get("sft_weight", 0.0)][: len(trl_types)]
    compare(
        lambda logits: our_loss(spec, logits, batch, reference),
        lambda logits: trl_dpo_loss(
            logits, batch, reference, trl_types, weights, 0.3, extra.get("label_smoothing", 0.0)
        ),
    )


def trl_answer_logps(trainer_class, logits, batch, average: bool):
    labels = as_trl_rows(batch["labels"])
    return trainer_class.get_batch_logps(logits, labels, average_log_prob=average, is_encoder_decoder=False)


def trl_chosen_nll(logits, batch):
    """TRL's cross_entropy_loss of the chosen rows (CPO's, and ORPO's on the answer tokens)."""
    labels = batch["labels"][:, 0]
    return torch.nn.functional.cross_entropy(logits[:B, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))


def test_orpo_equals_trls_odds_ratio_loss_plus_the_chosen_nll():
    from trl.experimental.orpo import ORPOTrainer

    batch = pairs_batch()
    spec = PreferenceSpec(objective="orpo", beta=0.25)
    trainer = SimpleNamespace(beta=0.25, accelerator=trl_accelerator())

    def theirs(logits):
        logps = trl_answer_logps(ORPOTrainer, logits, batch, average=True)
        losses, *_ = ORPOTrainer.odds_ratio_loss(trainer, logps[:B], logps[B:])
        return trl_chosen_nll(logits, batch) - losses.mean()  # ORPOTrainer's "full ORPO loss"

    compare(lambda logits: our_loss(spec, logits, batch), theirs)


@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_simpo_equals_trls_cpo_trainer(sft_weight):
    from trl.experimental.cpo import CPOTrainer

    batch = pairs_batch()
    spec = PreferenceSpec(objective="simpo", beta=2.0, gamma=0.6, sft_weight=sft_weight)
    trainer = SimpleNamespace(
        beta=2.0,
        simpo_gamma=0.6,
        label_smoothing=0.0,
        loss_type="simpo",
        alpha=0.0,
        accelerator=trl_accelerator(),
    )

    def theirs(logits):
        logps = trl_answer_logps(CPOTrainer, logits, batch, average=True)
        losses, *_ = CPOTrainer.cpo_loss(trainer, logps[:B], logps[B:])
        return losses.mean() + sft_weight * trl_chosen_nll(logits, batch)  # get_batch_loss_metrics

    compare(lambda logits: our_loss(spec, logits, batch), theirs)


def test_kto_equals_trls_kto_trainer():
    """Row 0 of each example is its completion, row 1 the KL estimate's mismatched one; examples 0
    and 3 are desirable."""
    from trl import KTOTrainer

    batch = pairs_batch()
    batch["desirable"] = torch.tensor([1, 0, 0, 1])
    reference = reference_sums(batch)
    spec = PreferenceSpec(objective="kto", beta=0.4, desirable_weight=1.3, undesirable_weight=0.8)

    def theirs(logits):
        logits = from_trl_rows(logits)  # TRL reads the completions and the KL rows from two inputs
        main = {k: v[:, 0] for k, v in batch.items() if k != "desirable"}
        kl = {k: v[:, 1] for k, v in batch.items() if k != "desirable"}
        per_token = {id(main["input_ids"]): trl_token_logps(logits[:, 0], main["labels"])}
        per_token[id(kl["input_ids"])] = trl_token_logps(logits[:, 1], kl["labels"])

        def model(input_ids, **kwargs):
            rows = per_token[id(input_ids)]
            zeros = torch.zeros_like(rows)
            return SimpleNamespace(log_probs=rows, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

        trainer = SimpleNamespace(
            model=SimpleNamespace(training=True),
            accelerator=trl_accelerator(),
            aux_loss_enabled=False,
            precompute_ref_logps=True,
            calculate_KL=True,
            loss_type="kto",
            beta=0.4,
            desirable_weight=1.3,
            undesirable_weight=0.8,
            _metrics={"train": defaultdict(list)},
            _total_train_tokens=0,
            _tp_size=1,
        )
        trainer._compute_kl_logps = lambda model_, batch_: KTOTrainer._compute_kl_logps(
            trainer, model_, batch_
        )
        inputs = {
            "input_ids": main["input_ids"],
            "attention_mask": main["attention_mask"],
            "completion_mask": (main["labels"] != IGNORE).long(),
            "KL_input_ids": kl["input_ids"],
            "KL_attention_mask": kl["attention_mask"],
            "KL_completion_mask": (kl["labels"] != IGNORE).long(),
            "label": batch["desirable"].bool(),
            "ref_logps": reference[:, 0],
            "ref_KL_logps": reference[:, 1],
        }
        return KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)

    compare(lambda logits: our_loss(spec, logits.reshape(B * 2, L, V), batch, reference), theirs)


@pytest.mark.parametrize(
    "method",
    [
        {"name": "lora", "r": 4},
        {"name": "ia3"},
        {"name": "prompt", "num_virtual_tokens": 3},
        {"name": "adapter", "bottleneck": 8},
    ],
    ids=lambda m: m["name"],
)
def test_an_adapter_methods_reference_is_the_base_model(sft_base, method):
    """An adapter method with a non-identity update: the reference's log-probabilities (its adapters
    switched off) equal the base model's own forward, the policy's do not, and the policy is back in
    training mode with its adapters on."""
    from pydantic import TypeAdapter
    from transformers import AutoModelForCausalLM

    from raylm import methods
    from raylm.train.preference import adapters_off, answer_logps

    batch = pairs_batch()
    batch["input_ids"] = batch["input_ids"] % 20
    batch["labels"] = torch.where(batch["labels"] == IGNORE, IGNORE, batch["input_ids"])
    base = AutoModelForCausalLM.from_pretrained(sft_base).eval()
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"].reshape(B * 2, L)).logits
    expected = trl_token_logps(logits, batch["labels"].reshape(B * 2, L)).sum(-1).reshape(B, 2)

    spec = TypeAdapter(methods.MethodSpec).validate_python(method)
    policy = methods.apply(AutoModelForCausalLM.from_pretrained(sft_base), spec)
    torch.manual_seed(0)
    for param in policy.parameters():
        if param.requires_grad:  # away from the identity (LoRA's B and the adapters' up start at 0)
            param.data.normal_(std=0.5)
    policy.train()
    reference = adapters_off(methods.reference(method["name"]))(policy, batch)
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=0)
    assert not reference.requires_grad and policy.training
    trained, _, _ = answer_logps(policy, batch)
    assert (trained - expected).abs().max() > 1e-2  # the adapters are on again


# ---- the rows ----------------------------------------------------------------------------------


def test_preference_rows_score_the_answers_and_refuse_what_cannot_train(sft_base, tmp_path):
    from transformers import AutoTokenizer

    from raylm.data.preference import generated, preference_rows
    from raylm.data.sft import check_sft_data
    from raylm.data.tasks import generate
    from raylm.spec.sft import SFTDataSpec

    tokenizer = AutoTokenizer.from_pretrained(sft_base)
    spec = SFTDataSpec(generate={"task": "copy"}, format="preference", seq_len=32, val_fraction=0.0)
    rows = generated(generate("copy", 6, 0, 2), spec)
    assert all(r["chosen"] == " " + r["prompt"].split("Say: ")[1].split("\n")[0] for r in rows)

    def tokenized(rows, spec):
        batch = {k: np.asarray([r[k] for r in rows], dtype=object) for k in rows[0]}
        return list(preference_rows(batch, tokenizer, spec))

    (out,) = tokenized(rows, spec)
    assert out["input_ids"].shape == (6, 2, 32) and out["pair"].tolist() == [1] * 6
    for row, ids, labels in zip(rows, out["input_ids"], out["labels"], strict=True):
        for answer, lab in zip((row["chosen"], row["rejected"]), labels, strict=True):
            scored = [t for t in lab.tolist() if t != IGNORE]
            assert tokenizer.decode(scored[:-1]) == answer and scored[-1] == tokenizer.eos_token_id
        assert (ids[0][labels[0] == IGNORE][:3] == ids[1][labels[1] == IGNORE][:3]).all()  # one prompt

    # chat messages: the prompt through the chat template, the answer's last assistant message
    chat = [
        {
            "prompt": [{"role": "user", "content": "Say kite"}],
            "chosen": [{"role": "assistant", "content": "kite"}],
            "rejected": [{"role": "assistant", "content": "box"}],
        }
    ]
    template = "{% for m in messages %}{{ m.role[0] }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}a:{% endif %}"
    chat_spec = SFTDataSpec(path=str(tmp_path), format="preference", seq_len=40, chat_template=template)
    (out,) = tokenized(chat, chat_spec)
    ids, labels, mask = out["input_ids"][0, 0], out["labels"][0, 0], out["attention_mask"][0, 0]
    assert tokenizer.decode(ids[1:][(labels[1:] == IGNORE) & (mask[1:] == 1)]) == "u: Say kite\na:"
    assert tokenizer.decode(labels[labels != IGNORE][:-1]) == "kite"

    # what cannot train: named, as a row the driver raises
    def problem(row, **changes):
        bad_spec = spec.model_copy(update=changes)
        (out,) = tokenized([row], bad_spec)
        return str(out["bad"][0])

    assert "its rejected answer is empty" in problem(
        {"prompt": "Say: x\nA:", "chosen": " x", "rejected": " "}
    )
    assert "prompt fills data.seq_len (8 tokens)" in problem(
        {"prompt": "Say: a long prompt\nA:", "chosen": " x", "rejected": " y"}, seq_len=8
    )
    assert "'Say: x\\nA:'" in problem({"prompt": "Say: x\nA:", "chosen": " x", "rejected": ""})
    assert "no rejected answer (found None)" in problem({"prompt": "p", "chosen": " a", "rejected": None})
    bad_prompt = {"prompt": [{"x": 1}], "chosen": " a", "rejected": " b"}
    assert "neither text nor {role, content} messages" in problem(bad_prompt)
    same = [{"prompt": "p", "chosen": " same", "rejected": " same"}]
    assert tokenized(same, spec) == []  # nothing to learn
    kto = spec.model_copy(update={"format": "kto"})
    assert "label 'yes' is not true or false" in problem(
        {"prompt": "p", "completion": " a", "label": "yes"}, format="kto"
    )
    (out,) = tokenized(generated(generate("copy", 4, 0, 2), kto), kto)
    assert out["desirable"].tolist() == [1, 0, 1, 0]
    # the KL row: each prompt with the previous example's completion
    assert (out["labels"][1, 1] == out["labels"][0, 0]).sum() > 0

    # a file without the rejected field: found before anything runs, with the fix
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "p", "chosen": " a"}) + "\n")
    file_spec = SFTDataSpec(path=str(tmp_path / "pairs.jsonl"), format="preference")
    ((field, message),) = check_sft_data(file_spec)
    assert field == "data.path" and "no field 'rejected'" in message and "data.rejected_field" in message
