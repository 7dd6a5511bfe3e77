"""Measurements of a model before and after compression, taken the same way on both: size on disk,
bits per parameter counted from the saved tensors, held-out perplexity, greedy agreement and speed.

    from raylm.compress import measure
    measure.perplexity(model, blocks)            # exp(mean token cross-entropy) over [n, seq_len] blocks
"""

from __future__ import annotations

import math
import time
from pathlib import Path

WEIGHT_FILES = ("*.safetensors", "*.gguf", "*.bin")
COMPANIONS = (".SCB", ".qweight", ".qzeros", ".scales", ".g_idx")  # int8's row scales; GPTQ's tensors
TABLES = ("quant_map", ".g_idx")


def weights_bytes(path: Path) -> int:
    """Bytes of the weight files of a model folder (or of one weight file)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for pattern in WEIGHT_FILES for f in path.glob(pattern))


def saved_tensors(path: Path) -> dict[str, tuple[str, int, int]]:
    """name -> (dtype or GGML type, elements, bytes) of every tensor a folder's safetensors files or a
    GGUF file hold, read from their headers."""
    if path.suffix == ".gguf":
        import gguf

        reader = gguf.GGUFReader(str(path))
        return {t.name: (t.tensor_type.name, int(t.n_elements), int(t.n_bytes)) for t in reader.tensors}
    from safetensors import safe_open

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                numel = math.prod(piece.get_shape())
                out[name] = (piece.get_dtype(), numel, numel * _dtype_bytes(piece.get_dtype()))
    return out


def _dtype_bytes(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(dtype, 1)


def bits_per_parameter(original: dict, compressed: dict, gguf_file: bool) -> dict:
    """Bits per parameter of the whole saved model (against the original's element count), and of its
    quantized weights alone: their codes and per-block scales, as a format's bit width counts them. In
    a safetensors folder a quantized weight `X.weight` is stored with its companions (`X.weight.absmax`,
    `X.weight.nested_absmax` for 4-bit, `X.SCB` for int8; GPTQ replaces it by `X.qweight`, `X.scales`,
    `X.qzeros`) and with per-tensor tables (code books, bitsandbytes' quant-state record, GPTQ's column
    order `X.g_idx`), whose bytes do not grow with the layer's rows: `tables_bytes`."""
    params = sum(numel for _, numel, _ in original.values())
    total = sum(size for _, _, size in compressed.values())
    tables = 0
    if gguf_file:
        quantized = [(numel, size) for kind, numel, size in compressed.values() if kind != "F32"]
    else:
        quantized = []
        for name, (dtype, numel, _) in original.items():
            saved = compressed.get(name)
            if saved is not None and saved[0] == dtype:
                continue
            owner = name.rsplit(".", 1)[0]
            group = [
                (key, size)
                for key, (_, _, size) in compressed.items()
                if key == name or key.startswith(name + ".") or key in {owner + c for c in COMPANIONS}
            ]
            if not group:
                continue
            table = sum(size for key, size in group if key.endswith(TABLES) or ".quant_state." in key)
            tables += table
            quantized.append((numel, sum(size for _, size in group) - table))
    part = sum(n for n, _ in quantized)
    return {
        "all": round(8 * total / params, 4),
        "quantized_weights": round(8 * sum(s for _, s in quantized) / part, 4) if part else None,
        "quantized_share": round(part / params, 4),
        "tables_bytes": tables,
    }


def perplexity(model, blocks) -> float:
    """exp of the mean next-token cross-entropy over `blocks` ([n, seq_len] token ids)."""
    return math.exp(cross_entropy(model, blocks)[0])


def cross_entropy(model, blocks) -> tuple[float, int]:
    """(mean next-token cross-entropy over every predicted token of `blocks`, how many tokens), in
    batches of up to 8 whose fp32 logits stay under ~512 MiB (a 128k vocabulary makes 0.5 MiB a token)."""
    import torch

    device = _device(model)
    vocab = model.get_output_embeddings().out_features  # a packed 4-bit weight's shape is not
    batch = max(1, min(8, 2**27 // (len(blocks[0]) * vocab)))
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(blocks), batch):
            ids = torch.as_tensor(blocks[start : start + batch], dtype=torch.long, device=device)
            logits = model(input_ids=ids).logits[:, -ids.shape[1] :].float()  # no prompt-learning tokens
            total += torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += ids[:, 1:].numel()
    return total / count, count


def greedy(model, prompts, new_tokens: int) -> tuple[list[list[int]], float]:
    """Greedy continuations of `new_tokens` tokens (EOS does not stop them), one prompt at a time, and
    the tokens per second of that generation (after one warm-up prompt)."""
    import torch

    device = _device(model)
    model.eval()

    def run(prompt):
        ids = torch.as_tensor([prompt], dtype=torch.long, device=device)
        out = model.generate(
            ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.config.pad_token_id or 0,
        )
        return out[0, len(prompt) :].tolist()

    with torch.no_grad():
        run(prompts[0])
        start = time.perf_counter()
        continuations = [run(p) for p in prompts]
        seconds = time.perf_counter() - start
    return continuations, len(prompts) * new_tokens / seconds


def agreement(model, prompts, continuations) -> float:
    """Share of positions where `model`'s greedy next token, given the reference's prompt and
    continuation so far, is the reference's token (teacher forcing: one early difference does not
    count against every later position). EOS is ruled out, as it was when the continuations were
    generated to their full length."""
    import torch

    device = _device(model)
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    same = total = 0
    model.eval()
    with torch.no_grad():
        for prompt, continuation in zip(prompts, continuations, strict=True):
            ids = torch.as_tensor([prompt + continuation], dtype=torch.long, device=device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
            logits[:, eos] = float("-inf")
            picks = logits.argmax(-1).tolist()
            same += sum(a == b for a, b in zip(picks, continuation, strict=True))
            total += len(continuation)
    return same / total


def _device(model):
    return next(model.parameters()).device


def new_tokens(model, prompts, wanted: int) -> int:
    """`wanted` new tokens, within the model's context after the longest prompt."""
    room = model.config.max_position_embeddings - max(len(p) for p in prompts)
    return max(1, min(wanted, room))


def model_measures(model, blocks, prompts, wanted_tokens: int, reference=None) -> dict:
    """Perplexity, greedy speed and continuations, and (given the original's continuations) the
    greedy agreement with them: one model's side of a before / after comparison."""
    continuations, speed = greedy(model, prompts, new_tokens(model, prompts, wanted_tokens))
    out = {"perplexity": round(perplexity(model, blocks), 4), "tokens_per_s": round(speed, 2)}
    if reference is None:
        out["continuations"] = continuations
    else:
        out["agreement"] = round(agreement(model, prompts, reference), 4)
    return out
