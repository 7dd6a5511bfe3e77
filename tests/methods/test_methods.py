"""Every fine-tuning method on a tiny Llama, in-process: it trains, the loss falls, the trainable
parameter count equals the method's analytic count, and the artifact round-trips through its loader
(PEFT's own for PEFT methods) and, where the method merges, through the merge, to the same logits."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from raylm import methods
from raylm.data.sft import collate, encode
from raylm.data.tasks import generate
from raylm.methods import MethodSpec
from raylm.spec.sft import SFTDataSpec
from tests.conftest import SFT_BASE as SHAPE

pytestmark = pytest.mark.quick

H, LAYERS, HEADS, KV_HEADS, FFN = (
    SHAPE[k] for k in ("hidden", "layers", "heads", "kv_heads", "intermediate")
)
KV = H // HEADS * KV_HEADS


@pytest.fixture(scope="module")
def base_dir(sft_base):
    return sft_base


def tokenizer_of(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def load_base(folder, method):
    from transformers import AutoModelForCausalLM

    if method.name == "qlora":
        return methods.module("qlora").load_base(str(folder), method, "cpu")
    return AutoModelForCausalLM.from_pretrained(folder)


def batches(tokenizer, n_batches=40, size=16, seed=1):
    spec = SFTDataSpec(generate={}, seq_len=32)
    rows = [encode(e["prompt"], e["completion"], tokenizer, spec) for e in generate("arithmetic", 400, seed)]
    for b in range(n_batches):
        chunk = [rows[(b * size + i) % len(rows)] for i in range(size)]
        rows32 = collate(chunk, 32, tokenizer.pad_token_id)
        yield {k: torch.from_numpy(v) for k, v in rows32.items()}


def method_of(data: dict):
    from pydantic import TypeAdapter

    return TypeAdapter(MethodSpec).validate_python(data)


def counts(model) -> tuple[int, int]:
    return (
        sum(p.numel() for p in model.parameters() if p.requires_grad),
        sum(p.numel() for p in model.parameters()),
    )


def block_params() -> int:
    return 2 * H * H + 2 * H * KV + 3 * H * FFN + 2 * H


def lora_params(r, dora=False):
    shapes = [(H, H), (H, KV), (H, KV), (H, H), (H, FFN), (H, FFN), (FFN, H)]  # q k v o gate up down
    return LAYERS * sum(r * (i + o) + (o if dora else 0) for i, o in shapes)


# method spec -> analytic trainable count (vocab V known only at run time: a function of it)
MATRIX = {
    "full": ({"name": "full"}, lambda V: 2 * V * H + LAYERS * block_params() + H),
    "freeze": ({"name": "freeze", "layers": 1}, lambda V: V * H + block_params() + H),
    "adapter": ({"name": "adapter", "bottleneck": 8}, lambda V: LAYERS * 2 * (2 * H * 8 + 8 + H)),
    "lora": ({"name": "lora", "r": 4, "dropout": 0.0}, lambda V: lora_params(4)),
    "lora-dora": ({"name": "lora", "r": 4, "dropout": 0.0, "use_dora": True}, lambda V: lora_params(4, True)),
    "qlora": (
        {"name": "qlora", "r": 4, "dropout": 0.0, "compute_dtype": "fp32"},
        lambda V: lora_params(4),
    ),
    "ia3": ({"name": "ia3"}, lambda V: LAYERS * (2 * KV + FFN)),
    "ptuning-mlp": (
        {"name": "ptuning", "num_virtual_tokens": 5, "encoder_hidden_size": 32},
        lambda V: 5 * H + (H * 32 + 32) + (32 * 32 + 32) + (32 * H + H),
    ),
    "prefix": ({"name": "prefix", "num_virtual_tokens": 5}, lambda V: 5 * LAYERS * 2 * KV),
    "prompt": ({"name": "prompt", "num_virtual_tokens": 5, "init_text": "Q: 1+1="}, lambda V: 5 * H),
}


@pytest.mark.parametrize("case", MATRIX, ids=MATRIX)
def test_method_trains_with_its_analytic_trainable_count(case, base_dir):
    spec, expected = MATRIX[case]
    method = method_of(spec)
    tokenizer = tokenizer_of(base_dir)
    torch.manual_seed(0)
    model = methods.apply(load_base(base_dir, method), method, tokenizer)
    trainable, _ = counts(model)
    assert trainable == expected(len(tokenizer))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (
        methods.module("qlora").optimizer(params, 1e-2, (0.9, 0.99), method)
        if method.name == "qlora"
        # LoRA's update is B @ A: at 3e-2 both factors grow together and the loss spikes late in the run
        # (seen on one CPU's rounding and not another's), so LoRA takes the rate full fine-tuning does
        else torch.optim.AdamW(params, lr=1e-2 if method.name in ("full", "freeze", "lora") else 3e-2)
    )
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    losses = []
    for batch in batches(tokenizer):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    after = dict(model.named_parameters())
    assert all(torch.equal(frozen_before[n], after[n]) for n in frozen_before)  # the base did not move


def test_qlora_base_is_bitsandbytes_4bit_and_only_lora_trains(base_dir):
    import bitsandbytes as bnb

    method = method_of({"name": "qlora", "r": 4})
    model = methods.apply(load_base(base_dir, method), method, tokenizer_of(base_dir))
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == LAYERS * 7  # q k v o gate up down in each block
    assert four_bit[0].weight.quant_type == "nf4" and four_bit[0].weight.quant_state.nested  # double quant
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


ROUND_TRIP = ["adapter", "lora", "lora-dora", "qlora", "ia3", "ptuning-mlp", "prefix", "prompt"]


@pytest.mark.parametrize("case", ROUND_TRIP, ids=ROUND_TRIP)
def test_saved_artifact_reloads_and_merges_to_the_same_logits(case, base_dir, tmp_path):
    method = method_of(MATRIX[case][0])
    tokenizer = tokenizer_of(base_dir)
    torch.manual_seed(0)
    model = methods.apply(load_base(base_dir, method), method, tokenizer)
    with torch.no_grad():  # away from the identity init (LoRA's B = 0, IA3's ones, zero up-projection)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    batch = next(batches(tokenizer, 1))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        base_logits = load_base(base_dir, method).eval()(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(logits[:, -32:], base_logits, atol=1e-3)  # the test cannot pass trivially

    module = methods.module(method.name)
    module.save(model, tmp_path / "artifact")
    reloaded = module.load(load_base(base_dir, method), tmp_path / "artifact").eval()
    with torch.no_grad():
        again = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(again, logits, atol=1e-4, rtol=0)

    if hasattr(module, "merge"):
        merged = module.merge(reloaded).eval()
        assert "Peft" not in type(merged).__name__
        with torch.no_grad():
            folded = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(folded, logits, atol=1e-4, rtol=0)


def test_lora_wraps_and_a_model_saves_without_importing_gptqmodel_or_deepspeed(tmp_path):
    """PEFT's LoRA imports gptqmodel (installed with the gptq extra) to look for GPTQ layers, and
    transformers' save_pretrained imports DeepSpeed (through accelerate) to look for a DeepSpeed engine:
    seconds of CPU in each process, a banner and a rewritten environment (gptqmodel), DeepSpeed's
    accelerator line. Through raylm neither is imported, nothing is printed, the environment stays as it
    was, PEFT's check is its own again afterwards, and the saved folder equals transformers' own save
    (which does import DeepSpeed: the check this spares is real)."""
    program = (
        "import importlib.util, os, sys\n"
        "assert importlib.util.find_spec('gptqmodel'), 'the gptq extra is not installed: nothing to spare'\n"
        "before = dict(os.environ)\n"
        "import peft.import_utils\n"
        "from transformers import AutoModelForCausalLM, LlamaConfig\n"
        "from raylm.methods.lora import LoraMethod, apply\n"
        "from raylm.methods.unimported import save_pretrained\n"
        "original = peft.import_utils.is_gptqmodel_available\n"
        "config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,"
        " vocab_size=64)\n"
        "model = apply(AutoModelForCausalLM.from_config(config), LoraMethod(name='lora', r=4))\n"
        "base = model.get_base_model()\n"
        "save_pretrained(base, sys.argv[1], safe_serialization=True)\n"
        # torch's compiler records its cache folder for itself
        "changed = sorted(k for k in set(before) | set(os.environ)"
        " if before.get(k) != os.environ.get(k) and k != 'TORCHINDUCTOR_CACHE_DIR')\n"
        "print('gptqmodel' in sys.modules, 'deepspeed' in sys.modules,"
        " peft.import_utils.is_gptqmodel_available is original, changed, flush=True)\n"
        "base.save_pretrained(sys.argv[2], safe_serialization=True)\n"
        "print('deepspeed' in sys.modules, flush=True)\n"
    )
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTORCH_ALLOC", "CUDA_", "HF_", "KMP_"))}
    out = subprocess.run(
        [sys.executable, "-c", program, str(ours), str(theirs)], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    # neither imported, PEFT's check its own again, the environment as it was; then transformers' save
    assert [lines[0], lines[-1]] == ["False False True []", "True"], out.stdout + out.stderr[-3000:]
    ours_weights, theirs_weights = (
        load_file(ours / "model.safetensors"),
        load_file(theirs / "model.safetensors"),
    )
    assert ours_weights.keys() == theirs_weights.keys() and len(ours_weights) > 0
    for name, tensor in ours_weights.items():
        assert torch.equal(tensor, theirs_weights[name]), name
    assert json.loads((ours / "config.json").read_text()) == json.loads((theirs / "config.json").read_text())
    printed = [line for line in out.stderr.splitlines() if line.strip()]
    # DeepSpeed's lines come from transformers' own save, after raylm's; torch's _pytree notices and, on
    # a CPU with AVX512-BF16, bitsandbytes' notice that its optional hub kernel (kernels-community) is
    # not to be had offline may remain
    others = ("torchao", "_pytree", "kernels-community", "real_accelerator", "Writing model shards")
    assert [line for line in printed if not any(o in line for o in others)] == [], printed
