"""CUDA paths of fine-tuning (bitsandbytes' CUDA kernels, bf16), on one GPU: skipped without one.

python -m pytest -n 0 -m gpu tests/gpu -q -s
"""

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def arithmetic_batches(tokenizer, n, size=16, seed=1):
    from raylm.data.sft import collate, encode
    from raylm.data.tasks import generate
    from raylm.spec.sft import SFTDataSpec

    spec = SFTDataSpec(generate={}, seq_len=32)
    rows = [encode(e["prompt"], e["completion"], tokenizer, spec) for e in generate("arithmetic", 400, seed)]
    for b in range(n):
        chunk = [rows[(b * size + i) % len(rows)] for i in range(size)]
        rows32 = collate(chunk, 32, tokenizer.pad_token_id)
        yield {k: torch.from_numpy(v).cuda() for k, v in rows32.items()}


@pytest.mark.parametrize("compute_dtype", ["bf16", "fp32"])
def test_qlora_trains_on_cuda_and_merges(sft_base, compute_dtype):
    import bitsandbytes as bnb
    from pydantic import TypeAdapter
    from transformers import AutoTokenizer

    from raylm import methods
    from raylm.methods import MethodSpec

    method = TypeAdapter(MethodSpec).validate_python(
        {"name": "qlora", "r": 4, "compute_dtype": compute_dtype}
    )
    tokenizer = AutoTokenizer.from_pretrained(sft_base)
    qlora = methods.module("qlora")
    model = methods.apply(qlora.load_base(str(sft_base), method, "cuda:0"), method, tokenizer)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and four_bit[0].weight.device.type == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = qlora.optimizer(params, 3e-2, (0.9, 0.99), method)
    assert type(optimizer).__name__ == "PagedAdamW8bit"
    losses = []
    for batch in arithmetic_batches(tokenizer, 40):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])

    model.eval()
    batch = next(arithmetic_batches(tokenizer, 1, seed=7))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        merged = qlora.merge(model).cuda().eval()
        folded = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    if compute_dtype == "fp32":
        torch.testing.assert_close(folded, logits, atol=1e-3, rtol=0)
    else:  # bf16 matmuls against the merged fp32 model: the predictions agree
        assert (folded.argmax(-1) == logits.argmax(-1)).float().mean() > 0.98
