"""`kind: serve` on a real Ray Serve on loopback, driven by the official `openai` client: completions,
chat, streaming, n > 1, stop sequences, two LoRA adapters by name, API keys; greedy text equal to
transformers' `generate` (batched or not); bad requests, overload (503 at once, bounded queue) and
timeouts (408); an NF4 model serves."""

import asyncio
import json
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from raylm.serve.driver import Serve, deploy
from raylm.spec.loading import validate_dict
from tests.conftest import free_port, ray_actor_pids

KEY = "test-key-not-a-secret"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"  # the tiny model's context is 32
PROMPTS = ["the cat", "a dog", "once upon a", "to be", "it was the", "and so", "we", "the end of"]


def make_adapter(base: str, folder, seed: int) -> None:
    """A LoRA adapter with non-zero B (PEFT's own init would make it the identity)."""
    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def served(object_store, ray_local, reference_run, tmp_path_factory, monkeypatch_module):
    from ray import serve

    from tests.runtime.test_object_store import upload

    base = str(reference_run[0] / "model")
    root = tmp_path_factory.mktemp("serve")
    adapters = {}
    for seed, name in ((1, "poet"), (2, "critic")):
        make_adapter(base, root / name, seed)
        adapters[name] = str(root / name)
    # the critic adapter and the adapter served as a model are read from a bucket (fetched by the
    # replica into its node's cache): every test below that compares them with PEFT covers that path
    bucket = object_store("serve")
    for name in adapters:
        upload(root / name, f"{bucket}/{name}")
    named = {"poet": adapters["poet"], "critic": f"{bucket}/critic"}
    monkeypatch_module.setenv("RAYLM_TEST_KEY", KEY)
    port = free_port()
    common = {"kind": "serve", "model": base, "scaling": {"cpus_per_replica": 0.5}}
    main = validate_dict(
        {
            **common,
            "name": "tiny",
            "adapters": named,
            "max_adapters_per_replica": 1,  # two adapters take turns: loading and unloading are exercised
            "chat_template": CHAT_TEMPLATE,
            "strategies": [{"name": "pal", "timeout_s": 2}],
            "http": {"port": port, "api_key_env": "RAYLM_TEST_KEY"},
            "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
            "scaling": {"cpus_per_replica": 0.5, "max_ongoing_requests": 32, "max_queued_requests": 64},
        }
    )
    # Overload and time limits, made deterministic: a batch waits 2 s for 16 requests, but only 8 are let
    # in (2 more wait, the rest are refused), so every admitted request outlives its 0.5 s limit.
    tight = validate_dict(
        {
            **common,
            "name": "tight",
            "http": {"port": port, "route_prefix": "/tight", "request_timeout_s": 0.5},
            "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 2.0, "max_cached_tokens": 200},
            "scaling": {"cpus_per_replica": 0.5, "max_ongoing_requests": 8, "max_queued_requests": 2},
        }
    )
    nf4 = validate_dict(
        {
            **common,
            "name": "tiny-nf4",
            "model": str(nf4_folder(base, root)),
            "http": {"port": port, "route_prefix": "/nf4"},
        }
    )
    # a LoRA adapter folder served as the model itself: it answers with the adapter
    poet = validate_dict(
        {
            **common,
            "name": "poet-alone",
            "model": f"{bucket}/poet",
            "http": {"port": port, "route_prefix": "/poet"},
        }
    )
    # the decoding step through torch.compile: its graphs are built while the replica starts; and an
    # adapter whose weights cannot be read (PEFT injects its layers before it reads them)
    broken = root / "broken"
    shutil.copytree(root / "poet", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    compiled = validate_dict(
        {
            **common,
            "name": "tiny-compiled",
            "adapters": {"broken": str(broken)},
            "http": {"port": port, "route_prefix": "/compiled"},
            "batching": {"max_batch_size": 8, "compile": True},
        }
    )
    for job in (main, tight, nf4, poet, compiled):
        assert Serve().preflight(job) == []
    deploy(main, tight, nf4, poet, compiled)  # at once: the replicas load side by side
    yield {"url": f"http://127.0.0.1:{port}", "base": base, "adapters": adapters, "nf4": nf4.model.path}
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def client(served, key=KEY, prefix=""):
    return openai.OpenAI(base_url=f"{served['url']}{prefix}/v1", api_key=key, max_retries=0)


def reference_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    row = out[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in row:
        row = row[: row.index(tokenizer.eos_token_id)]
    return tokenizer.decode(row, skip_special_tokens=True)


def test_greedy_through_the_server_equals_generate_batched_or_not(served):
    base = served["base"]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    expected = [reference_greedy(model, tokenizer, p, 16) for p in PROMPTS]
    api = client(served)
    alone = api.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0)
    assert alone.choices[0].text == expected[0]
    assert alone.usage.prompt_tokens == len(tokenizer(PROMPTS[0])["input_ids"])

    async def together():
        api = openai.AsyncOpenAI(base_url=f"{served['url']}/v1", api_key=KEY, max_retries=0)
        return await asyncio.gather(
            *[api.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0) for p in PROMPTS]
        )

    answers = asyncio.run(together())
    assert [a.choices[0].text for a in answers] == expected
    # one request with several prompts: OpenAI's choice order (prompt by prompt)
    many = api.completions.create(model="tiny", prompt=PROMPTS[:3], max_tokens=16)
    assert [c.text for c in many.choices] == expected[:3] and [c.index for c in many.choices] == [0, 1, 2]

    # the adapters by name, each equal to PEFT's own generate over the base
    for name, folder in served["adapters"].items():
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
        want = reference_greedy(peft_model, tokenizer, PROMPTS[1], 16)
        got = api.completions.create(model=name, prompt=PROMPTS[1], max_tokens=16)
        assert got.choices[0].text == want and want != expected[1], name
    assert [m.id for m in api.models.list().data] == ["tiny", "poet", "critic"]

    # after the adapters were used the replica's model is a PEFT model with an active adapter: the base's
    # requests, alone and in one batch with an adapter's, still decode without any adapter
    again = api.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0)
    assert again.choices[0].text == expected[1]
    last = list(served["adapters"])[-1]  # the one loaded now (one adapter per replica)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), served["adapters"][last]
    )

    async def mixed():
        api = openai.AsyncOpenAI(base_url=f"{served['url']}/v1", api_key=KEY, max_retries=0)
        return await asyncio.gather(
            *[
                api.completions.create(model=m, prompt=PROMPTS[2], max_tokens=16)
                for m in ("tiny", last, "tiny")
            ]
        )

    base_text, adapted, base_again = (a.choices[0].text for a in asyncio.run(mixed()))
    assert base_text == base_again == expected[2]
    assert adapted == reference_greedy(peft_model, tokenizer, PROMPTS[2], 16)

    # both adapters and the base at once on a replica that keeps one adapter: loading the second evicts
    # the first from Serve's multiplexer while requests for it are admitted, waiting or decoding; it
    # stays loaded until its last request ends, and every answer equals PEFT's for its adapter alone
    want = {"tiny": expected[3]}
    for name, folder in served["adapters"].items():
        alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
        want[name] = reference_greedy(alone, tokenizer, PROMPTS[3], 16)
    names = ["poet", "critic", "tiny", "critic", "poet", "tiny", "poet", "critic"]

    async def crowd():
        api = openai.AsyncOpenAI(base_url=f"{served['url']}/v1", api_key=KEY, max_retries=0)
        return await asyncio.gather(
            *[api.completions.create(model=m, prompt=PROMPTS[3], max_tokens=16) for m in names]
        )

    assert [a.choices[0].text for a in asyncio.run(crowd())] == [want[m] for m in names]


def test_a_compiled_decoding_step_answers_as_generate(served):
    """batching.compile: greedy text alone, streamed, and in one batch equals transformers' generate."""
    base = served["base"]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    expected = [reference_greedy(model, tokenizer, p, 16) for p in PROMPTS]
    api = client(served, prefix="/compiled")
    alone = api.completions.create(model="tiny-compiled", prompt=PROMPTS[0], max_tokens=16, temperature=0)
    assert alone.choices[0].text == expected[0]
    stream = api.completions.create(model="tiny-compiled", prompt=PROMPTS[1], max_tokens=16, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected[1]

    async def together():
        api = openai.AsyncOpenAI(base_url=f"{served['url']}/compiled/v1", api_key=KEY, max_retries=0)
        return await asyncio.gather(
            *[api.completions.create(model="tiny-compiled", prompt=p, max_tokens=16) for p in PROMPTS]
        )

    assert [a.choices[0].text for a in asyncio.run(together())] == expected
    # the compiled step is what answered (a failed compile would fall back to the same text uncompiled)
    health = httpx.get(f"{served['url']}/compiled/health").json()
    assert health["compiled_steps"] > 0


def test_an_adapter_that_fails_to_load_leaves_the_base_model_as_it_was(served):
    """The first adapter of a replica fails to load after PEFT injected its layers (initialised
    non-zero): its request fails, and the base model answers as itself, not through those layers."""
    base = served["base"]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    api = client(served, prefix="/compiled")
    with pytest.raises(openai.InternalServerError, match="adapter 'broken' could not be loaded"):
        api.completions.create(model="broken", prompt=PROMPTS[2], max_tokens=16)
    after = api.completions.create(model="tiny-compiled", prompt=PROMPTS[2], max_tokens=16)
    assert after.choices[0].text == reference_greedy(model, tokenizer, PROMPTS[2], 16)
    # greedy text can survive small changes: the prompt's log-probabilities are the base model's own
    ids = tokenizer(PROMPTS[2])["input_ids"]
    table = forward_logprobs(model, ids)
    scored = api.completions.create(
        model="tiny-compiled", prompt=PROMPTS[2], max_tokens=0, echo=True, logprobs=0
    )
    want = [float(table[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)


def test_an_adapter_served_as_the_model_answers_with_the_adapter(served):
    tokenizer = AutoTokenizer.from_pretrained(served["base"])
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(served["base"]), served["adapters"]["poet"]
    )
    got = client(served, prefix="/poet").completions.create(
        model="poet-alone", prompt=PROMPTS[0], max_tokens=16
    )
    assert got.choices[0].text == reference_greedy(peft_model, tokenizer, PROMPTS[0], 16)


def test_applications_deployed_together_share_one_proxy(tmp_path):
    """One HTTP proxy serves them all: a second spec's host (and with it the API-key rule), port or
    limits cannot differ, and names and route prefixes must be distinct; refused before anything starts."""
    model = str(tmp_path)
    first = validate_dict({"kind": "serve", "name": "a", "model": model, "http": {"route_prefix": "/a"}})
    other_host = validate_dict(
        {"kind": "serve", "name": "b", "model": model, "http": {"host": "0.0.0.0", "route_prefix": "/b"}}
    )
    same_prefix = validate_dict(
        {"kind": "serve", "name": "c", "model": model, "http": {"route_prefix": "/a"}}
    )
    with pytest.raises(ValueError, match="share one HTTP proxy"):
        deploy(first, other_host)
    with pytest.raises(ValueError, match="distinct http.route_prefixs"):
        deploy(first, same_prefix)


def test_chat_streaming_n_and_stop(served):
    api = client(served)
    chat = api.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "the cat"}], max_tokens=12
    )
    assert chat.choices[0].message.role == "assistant" and chat.object == "chat.completion"
    assert chat.usage.completion_tokens <= 12 and chat.choices[0].finish_reason in ("stop", "length")

    whole = api.completions.create(model="tiny", prompt="the cat", max_tokens=20)
    pieces, finish, usage = [], None, None
    for chunk in api.completions.create(
        model="tiny", prompt="the cat", max_tokens=20, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == whole.choices[0].text and pieces  # pieces arrive per flush (FLUSH_S)
    raw = httpx.post(
        f"{served['url']}/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "tiny", "prompt": "the cat", "max_tokens": 20, "stream": True,
              "stream_options": {"include_usage": True}},
    ).text  # fmt: skip
    events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    assert raw.rstrip().endswith("data: [DONE]")
    assert all(e["usage"] is None for e in events[:-1]) and events[-1]["usage"]["completion_tokens"] > 0
    assert events[-1]["choices"] == []  # OpenAI's shape: usage in a chunk of its own, after the last
    last = events[-2]["choices"][0]  # the finish reason in a chunk of its own, with empty text
    assert (
        last["finish_reason"]
        and last["text"] == ""
        and all(e["choices"][0]["finish_reason"] is None for e in events[:-2])
    )
    assert (
        finish == whole.choices[0].finish_reason and usage.completion_tokens == whole.usage.completion_tokens
    )

    deltas = [
        c.choices[0].delta.content or ""
        for c in api.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "the cat"}], max_tokens=12, stream=True
        )
        if c.choices
    ]
    assert "".join(deltas) == chat.choices[0].message.content

    sampled = api.completions.create(model="tiny", prompt="the", max_tokens=12, n=3, temperature=1.0, seed=5)
    assert len(sampled.choices) == 3 and len({c.text for c in sampled.choices}) > 1
    again = api.completions.create(model="tiny", prompt="the", max_tokens=12, n=3, temperature=1.0, seed=5)
    assert [c.text for c in again.choices] == [c.text for c in sampled.choices]

    text = whole.choices[0].text
    stop = text[3:5]
    cut = api.completions.create(model="tiny", prompt="the cat", max_tokens=20, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in api.completions.create(
            model="tiny", prompt="the cat", max_tokens=20, stop=[stop], stream=True
        )
        if c.choices
    )
    assert streamed == cut.choices[0].text

    pal = api.completions.create(
        model="tiny", prompt="what is 2 + 2?", max_tokens=8, extra_body={"strategy": "pal"}
    )
    outcome = pal.model_extra["strategy"]
    assert outcome["name"] == "pal" and (outcome["answer"] is not None or outcome["error"])


def test_keys(served):
    for key, message in ((None, "missing API key"), ("wrong", "incorrect API key")):
        if key is None:
            status = httpx.post(f"{served['url']}/v1/completions", json={"model": "tiny", "prompt": "a"})
            assert status.status_code == 401 and message in status.json()["error"]["message"]
            continue
        with pytest.raises(openai.AuthenticationError, match=message):
            client(served, key).completions.create(model="tiny", prompt="a", max_tokens=2)
    assert httpx.get(f"{served['url']}/health").status_code == 200


def test_bad_requests_get_openai_errors(served):
    url, headers = f"{served['url']}/v1/completions", {"Authorization": f"Bearer {KEY}"}
    cases = [
        ({"prompt": "a"}, 400, "model"),
        ({"model": "tiny"}, 400, "prompt"),
        ({"model": "tiny", "prompt": "a", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "a", "max_tokens": 10**9}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "a", "max_tokens": 1000}, 400, "context"),
        ({"model": "tiny", "prompt": "a", "temperature": -1}, 400, "temperature"),
        ({"model": "tiny", "prompt": "a", "top_p": 1.5, "temperature": 1}, 400, "top_p"),
        ({"model": "tiny", "prompt": "a", "bogus": 1}, 400, "bogus"),
        ({"model": "gpt-4", "prompt": "a"}, 404, "gpt-4"),
        # OpenAI fields this server cannot honour are refused by name, never ignored
        ({"model": "tiny", "prompt": "a", "suffix": "b"}, 400, "suffix"),
        ({"model": "tiny", "prompt": "a", "best_of": 3}, 400, "best_of"),
        ({"model": "tiny", "prompt": [1, 2, 10**6]}, 400, "outside this model's vocabulary"),
        ({"model": "tiny", "prompt": [1, -1]}, 400, "token id -1"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "tools": []}, 400, "tools"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "response_format": {}},
            400,
            "response_format",
        ),
    ]
    for body, status, word in cases:
        route = url.replace("/completions", "/chat/completions") if "messages" in body else url
        answer = httpx.post(route, json=body, headers=headers)
        assert answer.status_code == status, (body, answer.text)
        error = answer.json()["error"]
        assert word in error["message"] and error["type"], (body, error)
    broken = httpx.post(url, content=b"{not json", headers={**headers, "Content-Type": "application/json"})
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client(served).completions.create(model="nobody", prompt="a")


def test_overload_is_refused_at_once_and_slow_requests_time_out(served):
    url = f"{served['url']}/tight/v1/completions"

    async def burst():
        async with httpx.AsyncClient(timeout=30) as http:

            async def one():
                start = time.monotonic()
                answer = await http.post(url, json={"model": "tight", "prompt": "a", "max_tokens": 4})
                return answer.status_code, time.monotonic() - start

            return await asyncio.gather(*[one() for _ in range(24)])

    results = asyncio.run(burst())
    codes = sorted(code for code, _ in results)
    assert codes.count(503) >= 10 and set(codes) <= {408, 503}, results
    # refused before any work: well under the batch's 2 s wait
    assert all(seconds < 1.5 for code, seconds in results if code == 503), results
    late = httpx.post(url, json={"model": "tight", "prompt": "a", "max_tokens": 4}, timeout=30)
    assert late.status_code == 408 and late.json()["error"]["type"] == "timeout_error"
    # a request that could never fit in the key/value-cache budget is refused at once, naming it
    huge = httpx.post(
        url, json={"model": "tight", "prompt": "a", "max_tokens": 30, "n": 8, "temperature": 1}, timeout=30
    )
    assert huge.status_code == 400 and "max_cached_tokens" in huge.json()["error"]["message"]
    # a stream that times out ends with an error event and [DONE], which the client raises. Serve's
    # batch window (2 s) opened by the burst is still counting: a request joining it late is answered
    # when it closes, inside 0.5 s. Let it close, so the two streams below share a fresh window.
    time.sleep(2.5)
    stream = httpx.post(
        url, json={"model": "tight", "prompt": "a", "max_tokens": 4, "stream": True}, timeout=30
    )
    assert '"type": "timeout_error"' in stream.text and stream.text.rstrip().endswith("data: [DONE]")
    tight = openai.OpenAI(base_url=f"{served['url']}/tight/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIError, match="no answer within"):
        list(tight.completions.create(model="tight", prompt="a", max_tokens=4, stream=True))


def nf4_folder(base: str, root: Path) -> Path:
    """The base quantized to NF4 by bitsandbytes (raylm's quantize writer)."""
    from raylm.compress import bnb
    from raylm.spec.compress import QuantizeJob

    method = QuantizeJob.model_validate(
        {"kind": "quantize", "model": {"path": base}, "method": {"name": "nf4"}, "output": str(root / "x")}
    ).method
    keep = bnb.kept_in_full_precision(Path(base), method, "cpu")
    return bnb.write(Path(base), root / "nf4", method, "cpu", keep)


def test_nf4_model_serves(served):
    from raylm.compress import bnb

    folder = served["nf4"]
    model, tokenizer = bnb.load(folder, "cpu"), AutoTokenizer.from_pretrained(folder)
    assert "Linear4bit" in {type(m).__name__ for m in model.modules()}
    answer = client(served, prefix="/nf4").completions.create(
        model="tiny-nf4", prompt="the cat", max_tokens=12
    )
    assert answer.choices[0].text == reference_greedy(model, tokenizer, "the cat", 12)


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """The reference: log_softmax of one forward pass; row t predicts ids[t + 1]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def test_logprobs_and_echo_equal_a_forward_pass(served):
    base = served["base"]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    api = client(served)
    ids = tokenizer("the cat")["input_ids"]
    got = api.completions.create(model="tiny", prompt="the cat", max_tokens=6, logprobs=3, temperature=0)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    generated = out[0, len(ids) :].tolist()
    if tokenizer.eos_token_id in generated:
        generated = generated[: generated.index(tokenizer.eos_token_id) + 1]
    table = forward_logprobs(model, ids + generated)
    logprobs = got.choices[0].logprobs
    assert logprobs.tokens == [tokenizer.decode([t]) for t in generated]
    want = [float(table[len(ids) + i - 1, t]) for i, t in enumerate(generated)]
    assert logprobs.token_logprobs == pytest.approx(want, abs=1e-4)
    for i, alternatives in enumerate(logprobs.top_logprobs):
        best = torch.topk(table[len(ids) + i - 1], 3).values.tolist()
        assert sorted(alternatives.values(), reverse=True) == pytest.approx(best, abs=1e-4)
    assert logprobs.text_offset[0] == 0 and len(logprobs.text_offset) == len(generated)

    # lm-evaluation-harness's log-likelihood request: the prompt scored, nothing generated
    text = "the cat sat on"
    scored_ids = tokenizer(text)["input_ids"]
    table = forward_logprobs(model, scored_ids)
    scored = api.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=1)
    choice = scored.choices[0]
    assert (
        choice.text == tokenizer.decode(scored_ids, skip_special_tokens=True)
        and scored.usage.completion_tokens == 0
    )
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    want = [float(table[i - 1, scored_ids[i]]) for i in range(1, len(scored_ids))]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)

    # under an adapter: PEFT's forward pass over the base with that adapter
    poet = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), served["adapters"]["poet"])
    table = forward_logprobs(poet, scored_ids)
    adapted = api.completions.create(model="poet", prompt=text, max_tokens=0, echo=True, logprobs=0)
    want = [float(table[i - 1, scored_ids[i]]) for i in range(1, len(scored_ids))]
    assert adapted.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)

    # chat: logprobs + top_logprobs, OpenAI's per-token objects
    messages = [{"role": "user", "content": "the cat"}]
    chat = api.chat.completions.create(
        model="tiny", messages=messages, max_tokens=4, logprobs=True, top_logprobs=2
    )
    prompt_ids = tokenizer(
        tokenizer.apply_chat_template(
            messages, chat_template=CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False
        ),
        add_special_tokens=False,
    )["input_ids"]
    content = chat.choices[0].logprobs.content
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    completion = out[0, len(prompt_ids) :].tolist()
    if tokenizer.eos_token_id in completion:
        completion = completion[: completion.index(tokenizer.eos_token_id) + 1]
    table = forward_logprobs(model, prompt_ids + completion)
    assert [c.token for c in content] == [tokenizer.decode([t]) for t in completion]
    want = [float(table[len(prompt_ids) + i - 1, t]) for i, t in enumerate(completion)]
    assert [c.logprob for c in content] == pytest.approx(want, abs=1e-4)
    assert all(len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode()) for c in content)

    url, headers = f"{served['url']}/v1/completions", {"Authorization": f"Bearer {KEY}"}
    for body, word in [
        ({"model": "tiny", "prompt": "a", "max_tokens": 0}, "echo"),
        ({"model": "tiny", "prompt": "a", "logprobs": 50}, "logprobs"),
        ({"model": "tiny", "prompt": "a", "logprobs": 1, "stream": True}, "stream"),
    ]:
        answer = httpx.post(url, json=body, headers=headers)
        assert answer.status_code == 400 and word in answer.json()["error"]["message"], answer.text


def test_metrics_reach_rays_prometheus_endpoint(served):
    import re

    import ray

    api = client(served)
    for _ in range(3):
        api.completions.create(model="tiny", prompt="the cat", max_tokens=6)
    list(api.completions.create(model="tiny", prompt="a dog", max_tokens=6, stream=True))
    httpx.post(
        f"{served['url']}/v1/completions", json={"model": "tiny"}, headers={"Authorization": f"Bearer {KEY}"}
    )
    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = {
        "requests_ok": r'ray_raylm_requests_total\{[^}]*model="tiny"[^}]*status="200"[^}]*\} (\d+(?:\.\d+)?)',
        "requests_400": r'ray_raylm_requests_total\{[^}]*model="tiny"[^}]*status="400"',
        "completion_tokens": r'ray_raylm_completion_tokens_total\{[^}]*model="tiny"',
        "prompt_tokens": r'ray_raylm_prompt_tokens_total\{[^}]*model="tiny"',
        "first_token": r'ray_raylm_time_to_first_token_seconds_bucket\{[^}]*model="tiny"',
        "per_token": r'ray_raylm_time_per_output_token_seconds_count\{[^}]*model="tiny"',
        "queue": r'ray_raylm_queue_length\{[^}]*model="tiny"',
        "batch": r'ray_raylm_running_batch_size\{[^}]*model="tiny"',
    }
    deadline, found = time.monotonic() + 90, {}
    while time.monotonic() < deadline:  # Ray's agent exports what replicas record every few seconds
        page = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        found = {name: re.search(pattern, page) for name, pattern in wanted.items()}
        if all(found.values()) and float(found["requests_ok"].group(1)) >= 4:
            break
        time.sleep(2)
    assert all(found.values()), [name for name, match in found.items() if not match]
    assert float(found["requests_ok"].group(1)) >= 4  # three answers and one stream at least
    assert 'application="tiny"' in found["requests_ok"].group(0)  # Serve's own tags come with them


def test_an_endpoint_evaluates_as_the_same_model_here(served, tmp_path):
    """`kind: evaluate` with the served model as an endpoint and the same folder loaded here: perplexity
    (the endpoint's prompt logprobs over the same token blocks), exact match (greedy through the server)
    and choice accuracy agree; lm-evaluation-harness through the endpoint equals lm-eval's own
    `local-completions` client run directly against the same server."""
    import lm_eval
    import pyarrow.parquet as pq
    from click.testing import CliRunner
    from lm_eval.tasks import TaskManager

    from raylm.cli import main
    from raylm.data.tasks import generate
    from raylm.submit import run_here
    from tests.evaluate.test_evaluate import TEXTS, write, write_harness_tasks

    corpus = tmp_path / "heldout.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    qa, mc = tmp_path / "qa.jsonl", tmp_path / "mc.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in generate("arithmetic", 4, seed=3)))
    mc.write_text("".join(json.dumps(r) + "\n" for r in generate("arithmetic", 5, seed=4, choices=3)))
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    tasks = write_harness_tasks(tmp_path / "tasks")
    endpoint = {
        "url": f"{served['url']}/v1",
        "model": "tiny",
        "tokenizer": served["base"],
        "api_key_file": str(key_file),
    }
    spec = {
        "kind": "evaluate",
        "models": [{"name": "here", "path": served["base"]}, {"name": "served", "endpoint": endpoint}],
        "perplexity": {"data": {"path": str(corpus), "seq_len": 16}},
        "tasks": [
            {"name": "qa", "data": {"path": str(qa), "seq_len": 24}, "max_new_tokens": 4},
            {"name": "mc", "data": {"path": str(mc), "format": "choices", "num_choices": 3, "seq_len": 24}},
        ],
        "harness": {"tasks": ["arith_mc"], "include_path": str(tasks), "limit": 8},
        "output": str(tmp_path / "eval"),
    }
    summary = run_here(validate_dict(spec))
    here, remote = summary["models"]
    assert remote["perplexity"] == pytest.approx(here["perplexity"], rel=1e-4)
    assert remote["ppl_tokens"] == here["ppl_tokens"]
    assert remote["qa"] == here["qa"] and remote["mc"] == here["mc"]
    answers = pq.read_table(tmp_path / "eval" / "answers.parquet").to_pylist()
    for task in ("qa", "mc"):
        mine = [a["answer"] for a in answers if a["model"] == "here" and a["task"] == task]
        theirs = [a["answer"] for a in answers if a["model"] == "served" and a["task"] == task]
        assert mine == theirs and len(mine) in (4, 5)
    # lm-eval's own client against the same server: the reference for the harness column
    import os

    before = os.getcwd()
    os.chdir(tasks)
    try:
        direct = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "base_url": f"{served['url']}/v1/completions",
                "model": "tiny",
                "tokenizer": served["base"],
                "tokenizer_backend": "huggingface",
                "tokenized_requests": True,
                "header": {"Authorization": f"Bearer {KEY}"},
            },
            tasks=["arith_mc"],
            limit=8,
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
            bootstrap_iters=0,
        )
    finally:
        os.chdir(before)
    assert remote["arith_mc.acc"] == direct["results"]["arith_mc"]["acc,none"]
    # a wrong key or model name is found before anything is evaluated
    key_file.write_text("wrong")
    result = CliRunner().invoke(main, ["validate", write(tmp_path, {**spec, "output": str(tmp_path / "e2")})])
    assert (
        result.exit_code == 2
        and "models.1.endpoint: " in result.output
        and "refused the key" in result.output
    )
    key_file.write_text(KEY)
    spec["models"][1]["endpoint"]["model"] = "nope"
    result = CliRunner().invoke(main, ["validate", write(tmp_path, {**spec, "output": str(tmp_path / "e2")})])
    assert (
        result.exit_code == 2 and "models.1.endpoint.model" in result.output and "not 'nope'" in result.output
    )


def test_a_replica_whose_model_process_dies_answers_503_then_is_replaced(served):
    """SIGKILL the poet-alone replica's model process (raylm/serve/worker.py): its requests, text and
    scoring alike, get 503 (a status the OpenAI client retries) saying why, and Serve's health check replaces the replica, whose
    new model process answers again."""
    import psutil

    replicas = [psutil.Process(pid) for pid in ray_actor_pids("ServeReplica:poet-alone")]  # this session's
    (model,) = [c for r in replicas for c in r.children() if "raylm.serve.worker" in " ".join(c.cmdline())]
    model.kill()
    model.wait(timeout=30)
    url, body = (
        f"{served['url']}/poet/v1/completions",
        {"model": "poet-alone", "prompt": "The", "max_tokens": 4},
    )
    first = httpx.post(url, json=body, timeout=60)
    assert first.status_code == 503 and "the model's process ended" in first.json()["error"]["message"]
    # so do a call into the model's process (scoring the prompt) and the health route, not 500
    scored = httpx.post(url, json={**body, "max_tokens": 0, "echo": True, "logprobs": 1}, timeout=60)
    health = httpx.get(f"{served['url']}/poet/health", timeout=60)
    for failed in (scored, health):
        assert failed.status_code == 503 and "the model's process ended" in failed.json()["error"]["message"]
    deadline = time.monotonic() + 120
    while (answer := httpx.post(url, json=body, timeout=60)).status_code != 200:
        assert answer.status_code == 503 and time.monotonic() < deadline, answer.text
        time.sleep(1)
    assert answer.json()["usage"]["completion_tokens"] > 0
