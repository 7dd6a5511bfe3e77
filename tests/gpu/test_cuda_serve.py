"""The serving loop's compiled decoding step (`batching.compile`) on CUDA: skipped without a GPU.

python -m pytest -n 0 -m gpu tests/gpu/test_cuda_serve.py -q -s
"""

import threading

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PROMPTS = ["2 + 3 =", "7 + 1 =", "the cat", "a"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_compiled_step_on_cuda_decodes_as_generate(sft_base, dtype):
    """Requests joining a running batch, greedy, compiled on the GPU: the graphs are built at warm-up
    only, and the texts equal transformers' generate on the same model (bf16: at least 3 of 4, a
    near-tie may resolve the other way in kernels that sum in another order)."""
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm.serve.compiled import warm_up
    from raylm.serve.continuous import DecodeLoop
    from raylm.serve.engine import Engine, Request
    from raylm.spec.generation import GenerationSpec

    model = AutoModelForCausalLM.from_pretrained(sft_base, dtype=dtype).cuda().eval()
    tokenizer = AutoTokenizer.from_pretrained(sft_base)
    loop = DecodeLoop(Engine(model, tokenizer), max_rows=8, compiled=True)
    before = counters["stats"]["unique_graphs"]
    assert warm_up(loop, tokenizer("2 +")["input_ids"], GenerationSpec(max_new_tokens=4))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs - before == 2

    texts, done = {}, [threading.Event() for _ in PROMPTS]
    for i, prompt in enumerate(PROMPTS):

        def emit(index, delta, reason, count, i=i):
            texts[i] = texts.get(i, "") + delta
            if reason is not None:
                done[i].set()

        loop.submit([Request(tokenizer(prompt)["input_ids"], GenerationSpec(max_new_tokens=12), emit)])
    assert all(event.wait(300) for event in done)
    assert counters["stats"]["unique_graphs"] == graphs and loop.compiled_steps > 0

    expected = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].cuda()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        row = out[0, ids.shape[1] :].tolist()
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        expected.append(tokenizer.decode(row, skip_special_tokens=True))
    same = sum(texts[i] == expected[i] for i in range(len(PROMPTS)))
    assert same == len(PROMPTS) if dtype == torch.float32 else same >= len(PROMPTS) - 1
