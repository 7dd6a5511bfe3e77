"""Generation controls against transformers' own `generate` called directly (greedy, sampling with
every control and a seed, beam search), stop sequences and finish reasons, and `raylm generate` on
what raylm writes: a run folder, a PEFT adapter folder, a GGUF file; bad flags refused."""

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from raylm import cli
from raylm.infer.sampling import complete
from raylm.spec.generation import GenerationSpec

PROMPT = "the cat"


@pytest.fixture(scope="module")
def trained(reference_run):
    folder = reference_run[0] / "model"
    return folder, AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def reference(model, tokenizer, seed=None, **kwargs) -> list[str]:
    """transformers' generate with the arguments written out here, each row cut at EOS."""
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), pad_token_id=tokenizer.pad_token_id, **kwargs
        )
    texts = []
    for row in out[:, ids.shape[1] :].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def texts(result) -> list[str]:
    return [c["text"] for c in result["choices"]]


def test_each_decoding_equals_transformers_generate(trained):
    _, model, tokenizer = trained
    greedy = complete(model, tokenizer, PROMPT, GenerationSpec(max_new_tokens=12))
    assert texts(greedy) == reference(model, tokenizer, max_new_tokens=12, do_sample=False)
    assert greedy["usage"] == {"prompt_tokens": len(tokenizer(PROMPT)["input_ids"]), "completion_tokens": 12}

    controls = GenerationSpec(
        max_new_tokens=12,
        temperature=0.8,
        top_k=5,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.3,
        seed=7,
        n=3,
    )
    sampled = complete(model, tokenizer, PROMPT, controls)
    expected = reference(
        model,
        tokenizer,
        seed=7,
        max_new_tokens=12,
        do_sample=True,
        temperature=0.8,
        top_k=5,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.3,
        num_return_sequences=3,
    )
    assert texts(sampled) == expected
    assert texts(complete(model, tokenizer, PROMPT, controls)) == expected  # the same seed, the same text
    assert len(set(expected)) > 1  # three different samples, not one text three times

    # no top_k given means none: transformers' default of 50 must not apply; the reference says
    # top_k=0 (no filtering) outright
    unfiltered = complete(
        model, tokenizer, PROMPT, GenerationSpec(max_new_tokens=12, temperature=1.5, seed=1, n=4)
    )
    assert texts(unfiltered) == reference(
        model,
        tokenizer,
        seed=1,
        max_new_tokens=12,
        do_sample=True,
        temperature=1.5,
        top_k=0,
        num_return_sequences=4,
    )

    beams = complete(
        model, tokenizer, PROMPT, GenerationSpec(max_new_tokens=10, num_beams=4, n=2, length_penalty=0.5)
    )
    assert texts(beams) == reference(
        model,
        tokenizer,
        max_new_tokens=10,
        do_sample=False,
        num_beams=4,
        num_return_sequences=2,
        length_penalty=0.5,
    )


def test_stop_sequences_end_the_text_before_them(trained):
    _, model, tokenizer = trained
    full = complete(model, tokenizer, PROMPT, GenerationSpec(max_new_tokens=20))["choices"][0]
    stop = full["text"].strip()[2:4]  # two characters that occur in the greedy text
    assert full["finish_reason"] == "length"
    cut = complete(model, tokenizer, PROMPT, GenerationSpec(max_new_tokens=20, stop=[stop]))["choices"][0]
    assert full["text"].startswith(cut["text"] + stop) and stop not in cut["text"]
    assert cut["finish_reason"] == "stop" and cut["tokens"] < full["tokens"]


def test_raylm_generate_loads_runs_adapters_and_gguf(trained, tmp_path):
    from peft import LoraConfig, get_peft_model

    from raylm.compress.gguf import write

    folder, model, tokenizer = trained
    runner = CliRunner()

    def generate(*args) -> dict:
        result = runner.invoke(
            cli.main, ["generate", *map(str, args), "--prompt", PROMPT, "--json", "--max-new-tokens", "10"]
        )
        assert result.exit_code == 0, result.output
        (line,) = [line for line in result.stdout.splitlines() if line.startswith('{"prompt"')]
        return json.loads(line)

    greedy = reference(model, tokenizer, max_new_tokens=10, do_sample=False)
    assert texts(generate(folder.parent)) == greedy  # the run folder: its model/

    gguf = tmp_path / "gguf" / "model-f32.gguf"
    gguf.parent.mkdir()
    write(folder, gguf, "f32")
    tokenizer.save_pretrained(gguf.parent)  # transformers' reading of the GGUF's own adds a space
    assert texts(generate(gguf)) == greedy  # float32 GGUF: the same weights

    torch.manual_seed(0)
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(folder),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    lora.save_pretrained(tmp_path / "adapter")
    with_adapter = reference(lora, tokenizer, max_new_tokens=10, do_sample=False)
    assert with_adapter != greedy  # the adapter changes the model (non-identity init)
    assert texts(generate(tmp_path / "adapter", "--base", folder)) == with_adapter


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "1.5"], "--top-p"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--n", "2"], "greedy choices would all be the same"),
        (["--top-k", "5"], "temperature 0 is greedy"),
        (["--length-penalty", "2"], "set num_beams > 1"),
        (["--max-new-tokens", "100000"], "exceed the model's context"),
    ],
)
def test_bad_generation_flags_are_refused(trained, flags, message):
    result = CliRunner().invoke(cli.main, ["generate", str(trained[0]), "--prompt", PROMPT, *flags])
    assert result.exit_code == 2 and message in result.output, result.output


def test_weights_load_in_the_checkpoints_dtype_or_the_one_asked(trained, tmp_path):
    import shutil

    from raylm.infer.loading import load_for_generation

    folder = trained[0]
    as_bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(folder).to(torch.bfloat16).save_pretrained(as_bf16)
    for file in folder.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(file, as_bf16 / file.name)
    # a bf16 checkpoint stays bf16 (on a GPU, fp32 would take twice the memory); dtype overrides either way
    assert load_for_generation(str(as_bf16))[0].dtype == torch.bfloat16
    assert load_for_generation(str(as_bf16), dtype="float32")[0].dtype == torch.float32
    assert load_for_generation(str(folder), dtype="bfloat16")[0].dtype == torch.bfloat16
    assert load_for_generation(str(folder))[0].dtype == torch.float32
