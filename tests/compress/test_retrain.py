"""Pruning with training on real local Ray, from the session's pretrained tiny Llama: iterative magnitude
pruning with rewinding to the run's initialization (the lottery-ticket procedure), and a one-shot
pruning followed by a recovery training under FSDP. Masks, rewound values and held zeros are checked
against the saved tensors and against transformers' own seeded initialization."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from raylm.spec.loading import validate_dict
from raylm.submit import run_here
from tests.compress.conftest import validate_fails
from tests.compress.test_prune import decoder_weights, generates, prune_spec

SHORT = {"max_steps": 8, "batch_size": 8, "lr": 3e-3, "eval_every": 8, "checkpoint_every": 8, "log_every": 4}
ITERATIVE = {
    "name": "iterative",
    "sparsity": 0.75,
    "rounds": 2,
    "rewind": "init",
    "retrain": {"train": SHORT, "resources": {"num_workers": 1}},
}
RECOVERED = {
    "method": {"name": "magnitude", "sparsity": 0.7},
    "recover": {"train": {**SHORT, "lr": 1e-3}, "resources": {"num_workers": 2}, "strategy": "fsdp"},
}


@pytest.fixture(scope="module")
def iterative(trained, tmp_path_factory):
    output = tmp_path_factory.mktemp("iterative") / "imp"
    return output, run_here(validate_dict(prune_spec(trained, output, ITERATIVE)))


@pytest.fixture(scope="module")
def recovered(trained, tmp_path_factory):
    output = tmp_path_factory.mktemp("recovered") / "rec"
    spec = {**prune_spec(trained, output, RECOVERED["method"]), "recover": RECOVERED["recover"]}
    return output, run_here(validate_dict(spec))


def initialization(trained) -> dict[str, torch.Tensor]:
    """The reference run's first weights, made by transformers from the saved config with the run's seed
    (train.seed 0), as a Ray Train worker made them."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(trained)).state_dict()


def test_iterative_pruning_rewinds_the_survivors_and_holds_the_zeros(iterative, trained):
    output, summary = iterative
    layers = json.loads((trained / "config.json").read_text())["num_hidden_layers"]
    work = output.parent / "imp.work"
    init = initialization(trained)
    previous = decoder_weights(trained, layers)  # round 1 prunes the trained model
    zeros_before = None
    for r, target in ((1, 0.5), (2, 0.75)):
        start = decoder_weights(work / f"round-{r}" / "start", layers)
        trained_round = decoder_weights(work / f"round-{r}" / "run" / "model", layers)
        for name, weight in start.items():
            pruned = weight == 0
            assert pruned.sum().item() == int(weight.numel() * target), (r, name)
            # the pruned ones are the smallest of the previous round's trained weights ...
            assert previous[name][~pruned].abs().min() >= previous[name][pruned].abs().max(), (r, name)
            # ... the earlier rounds' zeros among them, and the survivors are back at their initial values
            if zeros_before is not None:
                assert pruned[zeros_before[name]].all(), (r, name)
            assert torch.equal(weight[~pruned], init[name][~pruned]), (r, name)
            # training moved the survivors and left every pruned weight at zero
            assert torch.equal(trained_round[name] == 0, pruned), (r, name)
            assert not torch.equal(trained_round[name], weight), (r, name)
        saved = load_file(work / f"round-{r}" / "start" / "model.safetensors")
        assert torch.equal(saved["model.embed_tokens.weight"], init["model.embed_tokens.weight"])
        zeros_before = {name: w == 0 for name, w in start.items()}
        previous = trained_round

    final = decoder_weights(output, layers)
    assert all(torch.equal(final[n], previous[n]) for n in final)  # the last round's model, published
    assert summary["sparsity"]["min_layer"] == summary["sparsity"]["max_layer"] == 0.75
    assert [r["sparsity"] for r in summary["rounds"]] == [0.5, 0.75]
    assert all(r["val_ppl"] > 1 for r in summary["rounds"])
    generates(output)


def test_recovery_training_under_fsdp_keeps_the_pruned_zeros_and_lowers_perplexity(recovered, trained):
    output, summary = recovered
    layers = json.loads((trained / "config.json").read_text())["num_hidden_layers"]
    pruned = decoder_weights(output.parent / "rec.work" / "pruned", layers)
    final = decoder_weights(output, layers)
    for name, weight in final.items():
        assert torch.equal(weight == 0, pruned[name] == 0), name  # every zero held, no new ones
        assert not torch.equal(weight, pruned[name]), name  # and the rest trained
    for name, weight in final.items():
        assert (weight == 0).sum().item() == int(weight.numel() * 0.7), name
    assert summary["sparsity"]["min_layer"] == pytest.approx(0.7, abs=1e-3)
    ppl = summary["perplexity"]
    assert ppl["pruned"] < ppl["before_recovery"], ppl
    assert (output.parent / "rec.work" / "recover" / "metrics.jsonl").exists()


def test_retraining_specs_are_refused_before_any_work(tmp_path, trained):
    out = tmp_path / "out"
    lonely = tmp_path / "lonely"  # a model folder outside any raylm run: no recorded init or schedule
    AutoModelForCausalLM.from_pretrained(trained).save_pretrained(lonely)
    spec = {
        **prune_spec(lonely, out, {"name": "iterative"}),
        "data": {"generate": {"documents": 50}, "seq_len": 16},
    }
    message = validate_fails(tmp_path, spec)
    assert "method.rewind" in message and "method.retrain.train" in message
    spec = {**prune_spec(trained, out, ITERATIVE), "recover": RECOVERED["recover"]}
    assert "retrains in every round" in validate_fails(tmp_path, spec)
    spec = {**prune_spec(trained, out, {"name": "magnitude"}), "recover": {"strategy": "deepspeed"}}
    assert "recover.strategy" in validate_fails(tmp_path, spec)
    finetune = {
        "kind": "finetune",
        "model": {"path": str(trained)},
        "method": "lora",
        "data": {"path": "x.jsonl"},
        "train": {"keep_sparsity": True},
        "output": str(out),
    }
    assert "only methods that train the weights" in validate_fails(tmp_path, finetune)
    pretrain = {**finetune, "kind": "pretrain", "strategy": "deepspeed", "data": {"path": "x.txt"}}
    del pretrain["method"]
    assert "ZeRO keeps its own flat copies" in validate_fails(tmp_path, pretrain)
