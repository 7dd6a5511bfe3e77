"""The continuous-batching loop without Serve: requests arriving one by one while others decode (their
caches joining the running batch) give exactly the text, finish reasons and token counts that
transformers' `generate` gives each alone — greedy, repetition penalty, stop sequences, different
lengths; beam search and seeded sampling go through `generate` between steps."""

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raylm.serve.compiled import warm_up
from raylm.serve.continuous import DecodeLoop
from raylm.serve.engine import Engine, Request
from raylm.spec.generation import GenerationSpec

PROMPTS = ["the cat", "a", "to be or not", "once upon"]
CONTROLS = [
    GenerationSpec(max_new_tokens=20),
    GenerationSpec(max_new_tokens=7),
    GenerationSpec(max_new_tokens=18, stop=["e"]),
    GenerationSpec(max_new_tokens=15, repetition_penalty=1.3),
    GenerationSpec(max_new_tokens=12, num_beams=3, n=2),
    GenerationSpec(max_new_tokens=10, temperature=0.8, top_k=5, seed=3, n=2),
]


@pytest.fixture(scope="module")
def model(reference_run):
    folder = reference_run[0] / "model"
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def alone(model, tokenizer, prompt: str, controls) -> list[tuple[str, str]]:
    """transformers' generate, one request alone, arguments written out; (text, finish) per choice."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    kwargs = {
        "do_sample": controls.sampling,
        "num_beams": controls.num_beams,
        "num_return_sequences": controls.n,
    }
    if controls.sampling:
        kwargs.update(temperature=controls.temperature, top_k=controls.top_k, top_p=1.0)
        torch.manual_seed(controls.seed)
    if controls.stop:
        kwargs.update(stop_strings=controls.stop, tokenizer=tokenizer)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=controls.max_new_tokens,
                             repetition_penalty=controls.repetition_penalty, pad_token_id=tokenizer.pad_token_id,
                             **kwargs)  # fmt: skip
    choices = []
    for row in out[:, ids.shape[1] :].tolist():
        while row and row[-1] == tokenizer.pad_token_id:
            row = row[:-1]
        finish = "stop" if tokenizer.eos_token_id in row or len(row) < controls.max_new_tokens else "length"
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        text = tokenizer.decode(row, skip_special_tokens=True)
        for stop in controls.stop:
            if stop in text:
                text, finish = text[: text.index(stop)], "stop"
        choices.append((text, finish))
    return choices


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_requests_joining_a_running_batch_decode_as_if_alone(model, compiled):
    """Compiled (batching.compile): the same text, and no graph compiled after the replica's warm-up
    (rows joining, leaving and trimming the cache keep the shapes and strides the graphs expect)."""
    model, tokenizer = model
    loop = DecodeLoop(Engine(model, tokenizer), max_rows=16, compiled=compiled)
    if compiled:
        from torch._dynamo.utils import counters

        before = counters["stats"]["unique_graphs"]
        assert warm_up(loop, tokenizer("Hello")["input_ids"], GenerationSpec(max_new_tokens=4))
        graphs = counters["stats"]["unique_graphs"]
        assert graphs - before == 2  # one row; several rows
    results: dict[int, dict] = {}
    finished = threading.Event()
    requests = []

    def collector(key, n):
        def emit(index, delta, reason, count):
            text, _ = results[key].get(index, ("", None))
            results[key][index] = (text + delta, reason)
            if sum(1 for r in results.values() for _, why in r.values() if why) == total:
                finished.set()

        return emit

    total = sum(c.n for c in CONTROLS) * len(PROMPTS)
    for p in PROMPTS:
        for c in CONTROLS:
            key = len(requests)
            results[key] = {}
            requests.append((p, c, Request(tokenizer(p)["input_ids"], c, collector(key, c.n))))
    for _, _, request in requests:
        loop.submit([request])
        time.sleep(0.002)  # one by one: most join a batch already decoding
    assert finished.wait(120)
    for key, (prompt, controls, _) in enumerate(requests):
        got = [results[key][i] for i in range(controls.n)]
        assert got == alone(model, tokenizer, prompt, controls), (prompt, controls)
    if compiled:  # a one-token prompt decoding alone (a cache of length 1 would need a graph of its own)
        one, ids = Collect(), tokenizer("a")["input_ids"]
        assert len(ids) == 1
        loop.submit([Request(ids, CONTROLS[0], one)])
        assert one.done.wait(120)
        assert (one.texts[0], one.finish[0]) == alone(model, tokenizer, "a", CONTROLS[0])[0]
        assert counters["stats"]["unique_graphs"] == graphs
        assert loop.compiled_steps > 0


class Collect:
    """emit for one request: text per choice, finish reasons, token counts; `done` once all finished."""

    def __init__(self, n=1):
        self.texts, self.finish, self.tokens, self.done = [""] * n, [None] * n, [0] * n, threading.Event()

    def __call__(self, index, delta, reason, count):
        self.texts[index] += delta
        if reason is not None:
            self.finish[index], self.tokens[index] = reason, count
            if all(self.finish):
                self.done.set()


def test_a_failing_prefill_fails_only_its_own_request(model):
    model, tokenizer = model
    loop = DecodeLoop(Engine(model, tokenizer), max_rows=16)
    long, good = GenerationSpec(max_new_tokens=40), GenerationSpec(max_new_tokens=9)
    running = Collect()
    loop.submit([Request(tokenizer("the cat")["input_ids"], long, running)])
    time.sleep(0.05)  # it is decoding when the next two arrive together (one prefill)
    bad_out, good_out = Collect(), Collect()
    vocabulary = model.get_input_embeddings().num_embeddings
    bad = Request(tokenizer("a")["input_ids"] + [vocabulary + 5], good, bad_out)  # an embedding lookup fails
    loop.submit([bad, Request(tokenizer("once upon")["input_ids"], good, good_out)])
    for out in (running, bad_out, good_out):
        assert out.done.wait(60)
    assert bad_out.finish == ["error"] and isinstance(bad.error, IndexError)
    assert [(running.texts[0], running.finish[0])] == alone(model, tokenizer, "the cat", long)
    assert [(good_out.texts[0], good_out.finish[0])] == alone(model, tokenizer, "once upon", good)


def test_every_end_of_sequence_id_of_the_generation_config_stops_a_row(model):
    import copy

    model, tokenizer = model
    ids = tokenizer("to be or not")["input_ids"]
    with torch.no_grad():
        free = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
    second_eos = free[
        4
    ]  # a token greedy decoding reaches: made an end-of-sequence id (Llama-3 lists several)
    stopping = copy.deepcopy(model)
    stopping.generation_config.eos_token_id = [tokenizer.eos_token_id, second_eos]
    with torch.no_grad():
        reference = stopping.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :]
    reference = reference.tolist()[: free.index(second_eos) + 1]  # generate pads after the stop
    assert reference[-1] == second_eos and len(reference) < 12
    engine = Engine(stopping, tokenizer)
    loop = DecodeLoop(engine, max_rows=4)
    out = Collect()
    loop.submit([Request(ids, GenerationSpec(max_new_tokens=12), out)])
    assert out.done.wait(60)
    assert out.finish == ["stop"] and out.tokens == [len(reference)]
    assert out.texts[0] == tokenizer.decode(reference, skip_special_tokens=True)
    from raylm.infer.sampling import complete

    alone_ = complete(stopping, tokenizer, ids, GenerationSpec(max_new_tokens=12))["choices"][0]
    assert (alone_["text"], alone_["finish_reason"], alone_["tokens"]) == (
        out.texts[0],
        "stop",
        len(reference),
    )


def sentencepiece_model(folder):
    """A tiny Llama with a SentencePiece-style tokenizer (Llama 2's: Metaspace pieces with byte
    fallback, whose decoder strips the leading space of what it decodes) trained here on text with
    accents, CJK and emoji; random weights, so sampling reaches byte-fallback pieces of split characters."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = ["the café serves crème brûlée", "東京 と 大阪 の 天気", "naïve señor 🙂 über straße"] * 20
    core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    core.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=special))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=2, bos_token_id=1, pad_token_id=0)  # fmt: skip
    return LlamaForCausalLM(config).eval(), tokenizer


def test_streamed_text_is_the_text_of_the_tokens_with_sentencepiece_and_split_characters(tmp_path):
    from raylm.infer.sampling import complete

    model, tokenizer = sentencepiece_model(tmp_path)
    loop = DecodeLoop(Engine(model, tokenizer), max_rows=8)
    controls = GenerationSpec(max_new_tokens=40, repetition_penalty=1.5)  # greedy, without loops
    prompts = ["the café", "東京 と", "naïve", "über straße 🙂", "crème", "大阪 の 天気", "señor"]
    runs = []
    for prompt in prompts:
        deltas, done = [], Collect()

        def emit(index, delta, reason, count, deltas=deltas, done=done):
            deltas.append(delta)
            done(index, delta, reason, count)

        ids = tokenizer(prompt)["input_ids"]
        runs.append((ids, deltas, done))
        loop.submit([Request(ids, controls, emit)])
    split_characters = leading_spaces = 0
    for ids, deltas, done in runs:
        assert done.done.wait(60)
        with torch.no_grad():  # the reference: transformers' tokens, decoded whole with the prompt
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, repetition_penalty=1.5, max_new_tokens=40,
                                 pad_token_id=0)[0].tolist()  # fmt: skip
        generated = out[len(ids) :]
        if 2 in generated:
            generated = generated[: generated.index(2) + 1]
        whole = tokenizer.decode(ids + generated, skip_special_tokens=True)
        before = tokenizer.decode(ids, skip_special_tokens=True)
        expected = whole[len(before) :]
        assert "".join(deltas) == expected, (tokenizer.decode(ids), deltas, expected)
        assert len([d for d in deltas if d]) > 1  # it did stream
        assert complete(model, tokenizer, ids, controls)["choices"][0]["text"] == expected  # raylm generate
        split_characters += any(3 <= t < 3 + 256 for t in generated)  # byte-fallback pieces
        leading_spaces += expected.startswith(" ")
    assert split_characters and leading_spaces, (split_characters, leading_spaces)  # the cases occurred


def test_the_cache_budget_makes_requests_wait_never_overflow(model):
    model, tokenizer = model
    controls = GenerationSpec(max_new_tokens=10)
    prompts = ["the cat", "a", "to be or not", "once upon", "we", "the end"]
    longest = max(len(tokenizer(p)["input_ids"]) for p in prompts) + 10
    loop = DecodeLoop(Engine(model, tokenizer), max_rows=16, max_cached_tokens=2 * longest)
    widest, step = [0], loop._step

    def watched_step():  # what the loop really holds at each step
        widest[0] = max(widest[0], len(loop.rows))
        step()

    loop._step = watched_step
    outs = [Collect() for _ in prompts]
    for prompt, out in zip(prompts, outs, strict=True):
        loop.submit([Request(tokenizer(prompt)["input_ids"], controls, out)])
    too_big = Collect(3)  # 3 rows as long as the longest never fit where 2 do
    refused = GenerationSpec(max_new_tokens=longest, n=3, temperature=1.0)
    refused_request = Request(tokenizer("a")["input_ids"], refused, too_big)
    loop.submit([refused_request])
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.done.wait(60)
        assert [(out.texts[0], out.finish[0])] == alone(model, tokenizer, prompt, controls)
    assert too_big.done.wait(60) and too_big.finish == ["error"] * 3
    assert "batching.max_cached_tokens" in str(refused_request.error)
    assert widest[0] == 2  # requests waited for rows to finish instead of growing the cache


def test_a_beam_search_takes_turns_with_the_streams_and_seeds_stay_exact(model):
    """A request that runs through `generate` (beams, a seed) runs beside the loop, whose steps go on
    between its steps: a short greedy stream that arrives while a 20-step beam search runs ends before
    it, and a seeded request keeps its text while unseeded rows sample in the loop meanwhile."""
    import copy

    model, tokenizer = model
    endless = copy.deepcopy(model)  # no end-of-sequence id for generate: the beams run all 20 steps
    endless.generation_config.eos_token_id = None
    engine = Engine(endless, tokenizer)
    loop = DecodeLoop(engine, max_rows=8)
    started, arrived, generate = threading.Event(), threading.Event(), engine.generate

    def held(group, between_steps=None):  # its first step waits until the greedy request is submitted
        def first_then_on():
            arrived.wait(30)
            between_steps()

        started.set()
        generate(group, first_then_on)

    engine.generate = held
    finished: list[str] = []  # the order in which the requests' last text arrived

    def recording(name, out):
        def emit(index, delta, reason, count):
            out(index, delta, reason, count)
            if out.done.is_set() and name not in finished:
                finished.append(name)

        return emit

    beams, beam_out = GenerationSpec(max_new_tokens=20, num_beams=4), Collect()
    greedy, greedy_out = GenerationSpec(max_new_tokens=3), Collect()
    loop.submit([Request(tokenizer("the cat")["input_ids"], beams, recording("beams", beam_out))])
    assert started.wait(30)  # generate runs: the greedy request can only decode between its steps
    loop.submit([Request(tokenizer("once upon")["input_ids"], greedy, recording("greedy", greedy_out))])
    arrived.set()
    assert greedy_out.done.wait(60) and beam_out.done.wait(60)
    assert finished == ["greedy", "beams"], "the greedy stream waited for the whole beam search"
    assert [(beam_out.texts[0], beam_out.finish[0])] == alone(endless, tokenizer, "the cat", beams)
    assert [(greedy_out.texts[0], greedy_out.finish[0])] == alone(endless, tokenizer, "once upon", greedy)

    # a seeded request in generate while unseeded rows sample in the loop (with the loop's own generator)
    seeded, seeded_out = GenerationSpec(max_new_tokens=20, temperature=0.9, seed=11, n=2), Collect(2)
    free = [Collect() for _ in range(3)]
    for out in free:
        loop.submit(
            [Request(tokenizer("a")["input_ids"], GenerationSpec(max_new_tokens=20, temperature=1.0), out)]
        )
    loop.submit([Request(tokenizer("to be")["input_ids"], seeded, seeded_out)])
    assert seeded_out.done.wait(60) and all(out.done.wait(60) for out in free)
    assert list(zip(seeded_out.texts, seeded_out.finish, strict=True)) == alone(
        endless, tokenizer, "to be", seeded
    )


def test_a_failed_forward_leaves_no_adapter_hook_behind(model):
    """PEFT removes its `adapter_names` hooks after a call but not when the call raises; a hook left
    behind would choose the adapter of every later forward pass (a generate beside the loop included).
    The loop's forward passes drop what a failed call left."""
    import copy

    from peft import LoraConfig, get_peft_model

    from raylm.serve.engine import hooks_dropped_on_failure

    model, tokenizer = model
    lora = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    ).eval()
    vocabulary = model.get_input_embeddings().num_embeddings
    bad = torch.tensor([[1, vocabulary + 3]])

    def hooks() -> int:
        return sum(len(m._forward_pre_hooks) for m in lora.modules())

    with pytest.raises(IndexError), torch.no_grad():
        lora(input_ids=bad, adapter_names=["default"])
    assert hooks() > 0  # PEFT's own behaviour: the failed call's hooks stayed
    for m in lora.modules():
        m._forward_pre_hooks.clear()
    with pytest.raises(IndexError), torch.no_grad(), hooks_dropped_on_failure(lora):
        lora(input_ids=bad, adapter_names=["default"])
    assert hooks() == 0
    ids = torch.tensor([tokenizer("the cat")["input_ids"]])
    with torch.no_grad():
        base = lora(input_ids=ids, adapter_names=["__base__"]).logits
        with lora.disable_adapter():
            torch.testing.assert_close(base, lora(input_ids=ids).logits)
