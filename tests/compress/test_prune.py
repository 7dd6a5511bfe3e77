"""`kind: prune` on real local Ray from the session's pretrained tiny Llama: sparsity counted from the
saved tensors, N:M in every group, Wanda's masks against the paper's formula computed here from
transformers' own forward pass, structured pruning that shrinks the model, and bad inputs."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from raylm.spec.loading import validate_dict
from raylm.submit import run_here
from tests.compress.conftest import validate_fails

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj") + (
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
RUNS = {
    "magnitude": {"name": "magnitude", "sparsity": 0.5},
    "wanda-2-4": {"name": "wanda", "pattern": "2:4", "calibration_blocks": 16},
    "structured": {"name": "structured", "heads": 0.5, "channels": 0.25},
}


def prune_spec(model, output, method) -> dict:
    return {
        "kind": "prune",
        "model": {"path": str(model)},
        "method": method,
        "measure": {"perplexity_blocks": 16, "prompts": 4},
        "output": str(output),
    }


@pytest.fixture(scope="module")
def pruned(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("pruned")
    return {
        label: (root / label, run_here(validate_dict(prune_spec(trained, root / label, method))))
        for label, method in RUNS.items()
    }


def decoder_weights(folder, layers: int) -> dict[str, torch.Tensor]:
    saved = load_file(folder / "model.safetensors")
    return {
        f"model.layers.{i}.{p}.weight": saved[f"model.layers.{i}.{p}.weight"]
        for i in range(layers)
        for p in LINEARS
    }


def generates(folder) -> None:
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8


def test_magnitude_reaches_the_target_in_every_layer(pruned, trained):
    output, summary = pruned["magnitude"]
    config = json.loads((trained / "config.json").read_text())
    weights = decoder_weights(output, config["num_hidden_layers"])
    original = load_file(trained / "model.safetensors")
    for name, weight in weights.items():
        zeros = (weight == 0).sum().item()
        assert zeros == int(weight.numel() * 0.5), name  # exactly the share asked for, layer by layer
        survivors = original[name][weight != 0].abs()
        assert survivors.min() >= original[name][weight == 0].abs().max(), name  # the smallest went
    saved = load_file(output / "model.safetensors")
    assert torch.equal(saved["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    assert summary["sparsity"]["min_layer"] == summary["sparsity"]["max_layer"] == 0.5
    assert summary["perplexity"]["pruned"] > 0
    generates(output)


def test_wanda_two_four_holds_in_every_group_and_follows_the_formula(pruned, trained):
    """Every 4 consecutive weights of a row keep at most 2; in layers 0 and 1 the pruned weights are
    the 2 of each 4 with the smallest |W| x ||X_j|| over the calibration tokens, X taken from
    transformers' own forward pass of the model whose earlier layers are already pruned."""
    output, summary = pruned["wanda-2-4"]
    config = json.loads((trained / "config.json").read_text())
    weights = decoder_weights(output, config["num_hidden_layers"])
    for name, weight in weights.items():
        rows, cols = weight.shape
        assert ((weight.reshape(rows, cols // 4, 4) != 0).sum(-1) <= 2).all(), name
        assert (weight == 0).sum().item() == weight.numel() // 2, name
    assert summary["sparsity"]["pruned_layers"] == 0.5

    calibration = torch.tensor(_calibration_blocks(trained, 16))
    model = AutoModelForCausalLM.from_pretrained(trained).eval()
    for layer in range(2):
        with torch.no_grad():
            hidden = model(input_ids=calibration, output_hidden_states=True).hidden_states[layer]
            x = model.model.layers[layer].input_layernorm(hidden).reshape(-1, config["hidden_size"]).double()
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        w = model.state_dict()[name].double()
        score = w.abs() * x.norm(dim=0).unsqueeze(0)
        groups = score.reshape(w.shape[0], -1, 4)
        expected = torch.zeros_like(groups, dtype=torch.bool).scatter_(
            -1, groups.topk(2, -1, largest=False).indices, True
        )
        assert torch.equal(weights[name] == 0, expected.reshape(w.shape)), name
        # the next layer's inputs come through this layer as pruned
        model.load_state_dict(
            {k: v for k, v in weights.items() if k.startswith(f"model.layers.{layer}.")}, strict=False
        )


def _calibration_blocks(trained, count):
    """The calibration blocks the job used: the run's training split, as raylm packs it (the job's
    own reader, whose packing the data tests check)."""
    from raylm.compress.inputs import packed

    job = validate_dict(prune_spec(trained, trained.parent / "unused", RUNS["wanda-2-4"]))
    return packed(job, False, count)


def test_structured_pruning_removes_heads_and_channels(pruned, trained):
    output, summary = pruned["structured"]
    before = json.loads((trained / "config.json").read_text())
    after = json.loads((output / "config.json").read_text())
    assert after["num_key_value_heads"] == before["num_key_value_heads"] // 2
    assert after["num_attention_heads"] == before["num_attention_heads"] // 2
    assert after["intermediate_size"] == before["intermediate_size"] - before["intermediate_size"] // 4
    model = AutoModelForCausalLM.from_pretrained(output)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == summary["parameters"]["pruned"] < summary["parameters"]["original"]
    assert summary["weights_bytes"]["pruned"] < summary["weights_bytes"]["original"]
    original = load_file(trained / "model.safetensors")
    saved = load_file(output / "model.safetensors")
    down, kept_down = (
        original["model.layers.0.mlp.down_proj.weight"],
        saved["model.layers.0.mlp.down_proj.weight"],
    )
    columns = {tuple(down[:, j].tolist()) for j in range(down.shape[1])}
    assert all(
        tuple(kept_down[:, j].tolist()) in columns for j in range(kept_down.shape[1])
    )  # slices, not new weights
    generates(output)


def test_bad_pruning_inputs_are_refused(tmp_path, trained):
    from transformers import GPT2Config

    out = tmp_path / "out"
    assert "less than 1" in validate_fails(
        tmp_path, prune_spec(trained, out, {"name": "magnitude", "sparsity": 1.0})
    )
    assert "0 < N < M" in validate_fails(
        tmp_path, prune_spec(trained, out, {"name": "wanda", "pattern": "4:2"})
    )
    message = validate_fails(
        tmp_path, prune_spec(trained, out, {"name": "magnitude", "pattern": "2:4", "sparsity": 0.7})
    )
    assert "contradicts" in message
    assert "multiples of 7" in validate_fails(
        tmp_path, prune_spec(trained, out, {"name": "magnitude", "pattern": "3:7"})
    )
    gpt2 = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2)).save_pretrained(gpt2)
    spec = {
        **prune_spec(gpt2, out, {"name": "structured"}),
        "data": {"generate": {"documents": 50}, "seq_len": 16},
    }
    assert "structured pruning covers Llama-style decoders" in validate_fails(tmp_path, spec)
    # a bucket output takes the one-shot methods; retraining keeps its runs beside a local output
    iterative = {"name": "iterative", "sparsity": 0.75, "rounds": 2}
    assert "give a local or shared output path" in validate_fails(
        tmp_path, prune_spec(trained, "s3://bucket/pruned", iterative)
    )


def test_too_little_calibration_text_stops_before_pruning(tmp_path, trained, ray_local):
    from raylm.spec.reading import SpecError

    output = tmp_path / "out"
    spec = prune_spec(trained, output, {"name": "wanda", "calibration_blocks": 100000})
    with pytest.raises(SpecError, match="calibration_blocks"):
        run_here(validate_dict(spec))
    assert not output.exists()
