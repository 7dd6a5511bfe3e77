"""`kind: quantize` on real local Ray, from the session's pretrained tiny Llama (a raylm run, so the
held-out text defaults to its own validation split). Each artifact is reloaded by its own library and
compared with the original through transformers: greedy continuations, bits per parameter against the
formats' definitions, GGUF logits against the `gguf` package's own quantize / de-quantize of the
original weights, GPTQ's layer error against plain rounding to the same grid."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from raylm.spec.loading import validate_dict
from raylm.submit import run_here
from tests.compress.conftest import validate_fails

# Share of greedy tokens (20 prompts x 16 tokens, free-running) equal to the original model's. The
# 4-bit formats change the weights most; a difference early in a continuation changes the rest of it.
AGREEMENT = {"nf4": 0.6, "fp4": 0.5, "int8": 0.85, "gptq": 0.6, "f32": 1.0, "q8_0": 0.85, "q4_0": 0.5}
GPTQ = {"name": "gptq", "bits": 4, "group_size": 32, "calibration_blocks": 16}

RUNS = {
    "nf4": {"name": "nf4", "double_quant": True},
    "fp4": {"name": "fp4", "double_quant": False},
    "int8": {"name": "int8"},
    "gptq": GPTQ,
    "f32": {"name": "gguf", "type": "f32"},
    "q8_0": {"name": "gguf", "type": "q8_0"},
    "q4_0": {"name": "gguf", "type": "q4_0"},
}


def quantize_spec(model, output, method) -> dict:
    return {
        "kind": "quantize",
        "model": {"path": str(model)},
        "method": method,
        "measure": {"perplexity_blocks": 16, "prompts": 4},
        "output": str(output),
    }


@pytest.fixture(scope="module")
def specs(trained, object_store, tmp_path_factory):
    """Every method's spec: label -> spec. int8 reads the model from a bucket (moto's S3 server); q4_0
    writes its output to the bucket."""
    from tests.runtime.test_object_store import upload

    root = tmp_path_factory.mktemp("quantized")
    bucket = object_store("quantize")
    upload(trained, f"{bucket}/model")
    specs = {label: quantize_spec(trained, root / label, method) for label, method in RUNS.items()}
    # a fetched folder is not inside its run: the held-out text is given
    specs["int8"] |= {
        "model": {"path": f"{bucket}/model"},
        "data": {"generate": {"documents": 400}, "seq_len": 32},
    }
    specs["q4_0"]["output"] = f"{bucket}/q4_0"
    return specs


@pytest.fixture(scope="module")
def quantized(specs):
    """Every method once: label -> (output folder, summary). For int8 the driver and the task each
    fetch the model from the bucket on their node; the summary and spec.yaml keep its URI. q4_0's output
    is uploaded to the bucket when complete (summary.json last): the tests read a copy fetched back."""
    from raylm.runtime import storage
    from tests.runtime.test_object_store import bucket_files

    runs = {label: (spec["output"], run_here(validate_dict(spec))) for label, spec in specs.items()}
    assert runs["int8"][1]["model"] == specs["int8"]["model"]["path"]
    uri, summary = runs["q4_0"]
    assert summary["artifact"].startswith(uri + "/") and summary["artifact"].endswith(".gguf")
    assert {"spec.yaml", "summary.json", summary["artifact"][len(uri) + 1 :]} == set(bucket_files(uri))
    runs["q4_0"] = (storage.localize(uri), summary)
    return {label: (Path(output), summary) for label, (output, summary) in runs.items()}


@pytest.fixture(scope="module")
def prompts(trained):
    """20 prompts the model did not train on: the starts of stories from another seed."""
    from raylm.data.corpus import stories

    tokenizer = AutoTokenizer.from_pretrained(trained)
    return [tokenizer(text, add_special_tokens=False)["input_ids"][:12] for text in stories(20, seed=99)]


def greedy(model, prompts, new_tokens=16) -> list[list[int]]:
    model.eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            tokens = model.generate(
                ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
            )
            out.append(tokens[0, len(prompt) :].tolist())
    return out


def share_equal(a, b) -> float:
    pairs = [(x, y) for ca, cb in zip(a, b, strict=True) for x, y in zip(ca, cb, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


@pytest.fixture(scope="module")
def original_greedy(trained, prompts):
    return greedy(AutoModelForCausalLM.from_pretrained(trained), prompts)


def reload(output, summary):
    if summary["method"]["name"] == "gguf":
        artifact = output / (json.loads((output / "summary.json").read_text())["artifact"].rsplit("/", 1)[-1])
        return AutoModelForCausalLM.from_pretrained(output, gguf_file=artifact.name)
    return AutoModelForCausalLM.from_pretrained(output, device_map={"": "cpu"})


@pytest.mark.parametrize("label", list(RUNS))
def test_artifact_reloads_and_generates_like_the_original(label, quantized, prompts, original_greedy):
    output, summary = quantized[label]
    model = reload(output, summary)
    if label in ("nf4", "fp4", "int8"):
        import bitsandbytes as bnb

        layer = model.model.layers[0].self_attn.q_proj
        assert isinstance(layer, bnb.nn.Linear8bitLt if label == "int8" else bnb.nn.Linear4bit)
        saved = json.loads((output / "config.json").read_text())["quantization_config"]
        assert saved["quant_method"] == "bitsandbytes"
    if label == "gptq":
        from gptqmodel.nn_modules.qlinear import BaseQuantLinear

        assert isinstance(model.model.layers[0].self_attn.q_proj, BaseQuantLinear)
        saved = json.loads((output / "config.json").read_text())["quantization_config"]
        assert (saved["quant_method"], saved["bits"], saved["group_size"]) == ("gptq", 4, 32)
    agreement = share_equal(greedy(model, prompts), original_greedy)
    assert agreement >= AGREEMENT[label], agreement
    assert summary["weights_bytes"]["quantized"] < summary["weights_bytes"]["original"] or label == "f32"
    ppl = summary["perplexity"]
    assert ppl["blocks"] == 16 and ppl["original"] > 1
    if label == "f32":  # the same weights: the same greedy tokens, by the job's own measure too
        assert summary["greedy_agreement"] == 1.0
    if label in ("int8", "q8_0", "f32"):  # 8 bits and up barely move held-out perplexity
        assert abs(ppl["quantized"] / ppl["original"] - 1) < 0.02, ppl
    assert summary["tokens_per_s"]["original"] > 0 and summary["tokens_per_s"]["quantized"] > 0


def test_four_bit_storage_costs_what_the_format_says(quantized):
    """NF4 / FP4 store 4 bits per weight plus one scale per block of 64: a float32 scale (32/64 = 0.5
    bits) or, with double quantization, an 8-bit scale plus a float32 one per 256 blocks."""
    assert quantized["fp4"][1]["bits_per_parameter"]["quantized_weights"] == pytest.approx(
        4 + 32 / 64, abs=0.01
    )
    double = 4 + 8 / 64 + 32 / (64 * 256)  # 4.127
    assert quantized["nf4"][1]["bits_per_parameter"]["quantized_weights"] == pytest.approx(double, abs=0.01)


def test_gptq_reloads_with_gptqmodel_and_beats_rounding_to_the_same_grid(quantized, trained):
    """GPTQ stores 4-bit codes with an fp16 scale and a 4-bit zero point per group of 32 inputs (4 + 20 /
    32 bits); the folder loads with gptqmodel itself as it does with transformers; and on layer 0's
    q / k / v (whose inputs the quantized model computes exactly as the original) its weights
    reproduce the layer's outputs on the calibration text better than rounding each weight to the
    nearest point of the same symmetric grid (GPTQ's whole point: each rounding error compensated by
    the weights not yet rounded)."""
    from gptqmodel import GPTQModel

    output, summary = quantized["gptq"]
    assert summary["bits_per_parameter"]["quantized_weights"] == pytest.approx(4 + (16 + 4) / 32, abs=1e-3)
    by_gptqmodel = GPTQModel.load(str(output), device="cpu")  # in bfloat16, its CPU default
    by_transformers = reload(output, summary)
    ids = torch.tensor([_calibration_blocks(trained, 1)[0]])
    with torch.no_grad():
        assert torch.allclose(by_gptqmodel.model(ids).logits.float(), by_transformers(ids).logits, atol=0.05)

    original = AutoModelForCausalLM.from_pretrained(trained)
    inputs = []
    hook = original.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda module, args, out: inputs.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        original(torch.tensor(_calibration_blocks(trained, GPTQ["calibration_blocks"])))
    hook.remove()
    x = inputs[0]
    saved = load_file(output / "model.safetensors")
    for name in ("q_proj", "k_proj", "v_proj"):
        w = getattr(original.model.layers[0].self_attn, name).weight.detach().double()
        gptq = _unpack_gptq(saved, f"model.layers.0.self_attn.{name}", bits=4)
        with torch.no_grad():  # the kernel (multiplying in bfloat16 on CPU) uses these weights
            layer = getattr(by_transformers.model.layers[0].self_attn, name)
            expected = x[:64].double() @ gptq.T
            assert (layer(x[:64]).double() - expected).norm() < 0.01 * expected.norm()
        groups = w.reshape(w.shape[0], -1, 32)  # symmetric 4-bit grid: scale = 2 max|w| / 15, zero 8
        scale = 2 * groups.abs().amax(-1, keepdim=True) / 15
        rounded = ((torch.round(groups / scale) + 8).clamp(0, 15) - 8) * scale
        error_gptq = ((gptq - w) @ x.double().T).norm()
        error_rounding = ((rounded.reshape(w.shape) - w) @ x.double().T).norm()
        assert error_gptq < 0.9 * error_rounding, (name, error_gptq, error_rounding)


def _unpack_gptq(saved, prefix, bits) -> torch.Tensor:
    """A [out, in] float64 weight from the GPTQ checkpoint format itself: `qweight` packs 32 / bits
    codes per int32 along the inputs (lowest bits first), `qzeros` packs the zero points along the
    outputs, stored minus one; `scales` is [groups, out]; `g_idx` gives each input's group."""
    per = 32 // bits
    mask = (1 << bits) - 1
    shifts = torch.arange(per) * bits

    def unpack(packed, dim):
        values = (
            packed.unsqueeze(dim + 1) >> shifts.view(*([1] * (dim + 1)), per, *([1] * (1 - dim)))
        ) & mask
        return values.flatten(dim, dim + 1) if dim == 0 else values.reshape(packed.shape[0], -1)

    codes = unpack(saved[f"{prefix}.qweight"].long(), 0)  # [in, out]
    zeros = unpack(saved[f"{prefix}.qzeros"].long(), 1) + 1  # [groups, out]
    groups = saved[f"{prefix}.g_idx"].long()
    scales = saved[f"{prefix}.scales"].double()
    return (scales[groups] * (codes - zeros[groups])).T


def _calibration_blocks(trained, count):
    """The training-split blocks the job calibrated on, as raylm packs them (the job's own reader,
    whose packing the data tests check)."""
    from raylm.compress.inputs import packed

    job = validate_dict(quantize_spec(trained, trained.parent / "unused", GPTQ))
    return packed(job, False, count)


def _gguf_reference(trained, qtype: str) -> dict[str, torch.Tensor]:
    """The original weights as the GGUF format stores them, by the `gguf` package itself: each 2-D
    weight quantized and de-quantized (1-D norms stay float32)."""
    import gguf
    from safetensors.torch import load_file

    kind = gguf.GGMLQuantizationType[qtype.upper()]
    weights = load_file(trained / "model.safetensors")
    out = {}
    for name, tensor in weights.items():
        array = tensor.float().numpy()
        if array.ndim == 2 and kind != gguf.GGMLQuantizationType.F32:
            array = gguf.quants.dequantize(gguf.quants.quantize(array, kind), kind)
        out[name] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return out


@pytest.mark.parametrize("label", ["f32", "q8_0", "q4_0"])
def test_gguf_file_reads_back_and_loads_with_the_formats_error(label, quantized, trained):
    import gguf

    output, summary = quantized[label]
    (file,) = output.glob("*.gguf")
    reader = gguf.GGUFReader(str(file))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    config = json.loads((trained / "config.json").read_text())
    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == config["num_hidden_layers"]
    assert field("llama.attention.head_count") == config["num_attention_heads"]
    assert field("llama.embedding_length") == config["hidden_size"]
    tokenizer = AutoTokenizer.from_pretrained(trained)
    assert field("tokenizer.ggml.tokens") == [
        tokenizer.convert_ids_to_tokens(i).replace(" ", "\u2581") for i in range(len(tokenizer))
    ]
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    tensors = {t.name: t for t in reader.tensors}
    layers = config["num_hidden_layers"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{part}.weight"
        for i in range(layers)
        for part in (
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        )
    }
    assert set(tensors) == expected
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == label.upper()
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert list(tensors["blk.0.ffn_up.weight"].shape) == [config["hidden_size"], config["intermediate_size"]]

    loaded = AutoModelForCausalLM.from_pretrained(output, gguf_file=file.name).eval()
    reference = AutoModelForCausalLM.from_pretrained(trained).eval()
    reference.load_state_dict(_gguf_reference(trained, label), strict=False)
    ids = torch.tensor([list(range(3, 30))])
    with torch.no_grad():
        got, want = loaded(ids).logits, reference(ids).logits
    if label == "f32":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.quick
def test_a_byte_level_bpe_tokenizer_survives_the_gguf_file(tmp_path):
    """transformers rebuilds the same tokenizer from the file's vocabulary and merges."""
    from raylm.compress.gguf import write
    from raylm.data.corpus import stories
    from raylm.data.tokenizer import train_tokenizer
    from raylm.planning.models import architecture_config
    from raylm.spec.sections import Architecture

    texts = stories(200, seed=1)
    tokenizer = train_tokenizer(texts, "bpe", 300)
    config = architecture_config(
        Architecture(layers=1, heads=2, hidden=64, context=64), len(tokenizer), tokenizer
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    write(tmp_path / "model", tmp_path / "model.gguf", "f16")
    rebuilt = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    for text in stories(5, seed=2):
        assert rebuilt(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_the_same_spec_again_returns_the_recorded_summary(quantized, specs):
    from tests.runtime.test_object_store import bucket_files

    output, summary = quantized["int8"]  # its model is a bucket URI, recorded as such
    before = {p.name: p.stat().st_mtime_ns for p in output.iterdir()}
    again = run_here(validate_dict(specs["int8"]))
    assert again == summary
    assert {p.name: p.stat().st_mtime_ns for p in output.iterdir()} == before
    in_bucket = bucket_files(specs["q4_0"]["output"])  # an output in the bucket, read from there
    assert run_here(validate_dict(specs["q4_0"])) == quantized["q4_0"][1]
    assert bucket_files(specs["q4_0"]["output"]) == in_bucket


def test_bad_inputs_are_refused_before_any_work(tmp_path, trained, quantized):
    from transformers import GPT2Config, T5Config

    out = tmp_path / "out"
    assert "is not a folder here" in validate_fails(tmp_path, quantize_spec(tmp_path / "nowhere", out, "nf4"))
    # a finished run folder reads what it produced (its model/); an unfinished one is named with the fix
    from raylm.kinds import preflight

    job = validate_dict(quantize_spec(trained.parent, out, "nf4"))
    assert preflight(job) == [] and job.model.path == str(trained)
    (tmp_path / "unfinished" / "model").mkdir(parents=True)
    assert "use its model/" in validate_fails(tmp_path, quantize_spec(tmp_path / "unfinished", out, "nf4"))
    t5 = tmp_path / "t5"
    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=32).save_pretrained(t5)
    assert "not a causal language model" in validate_fails(tmp_path, quantize_spec(t5, out, "nf4"))
    gpt2 = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2)).save_pretrained(gpt2)
    AutoTokenizer.from_pretrained(trained).save_pretrained(gpt2)
    message = validate_fails(tmp_path, quantize_spec(gpt2, out, {"name": "gguf"}))
    assert "covers the llama architecture" in message and "give held-out text" in message
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert "already holds other files" in validate_fails(tmp_path, quantize_spec(trained, taken, "nf4"))
    assert (taken / "notes.txt").read_text() == "mine"
    assert "already quantized" in validate_fails(tmp_path, quantize_spec(quantized["nf4"][0], out, "int8"))
    assert "method.type" in validate_fails(
        tmp_path, quantize_spec(trained, out, {"name": "gguf", "type": "q3_k"})
    )
    assert "method.bits" in validate_fails(tmp_path, quantize_spec(trained, out, {"name": "gptq", "bits": 5}))
    assert "method.group_size" in validate_fails(
        tmp_path, quantize_spec(trained, out, {"name": "gptq", "group_size": 100})
    )
