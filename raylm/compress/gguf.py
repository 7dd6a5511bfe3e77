"""GGUF export of a Llama-family Hugging Face folder, following llama.cpp's converter (convert_hf_to_gguf.py).

    from raylm.compress.gguf import problems, write
    write("runs/tiny/model", "runs/tiny-q8/model-q8_0.gguf", "q8_0")

Tensor names are llama.cpp's (token_embd, blk.N.attn_q, ..., output_norm, output); the rows of q_proj and
k_proj are permuted from the Hugging Face rotary layout to llama.cpp's (transformers' GGUF loader undoes
it). 2-D weights take the chosen type when their rows divide into its blocks (else F16, as llama.cpp
falls back); norms stay F32. A byte-level BPE tokenizer goes in as llama.cpp's `gpt2` model (vocabulary,
merges, the GPT-2 pre-tokenizer); raylm's char tokenizer as its `llama` (sentencepiece) model with
single-character pieces and no space prefix, which cuts text the same way. What GGUF cannot express here
(another architecture, another tokenizer, rope scaling, biases) is refused by `problems` before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

# The block formats and plain types the `gguf` package writes, with llama.cpp's file type ids.
TYPES = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9}
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def problems(folder: Path) -> list[str]:
    """Why this folder cannot become a GGUF file here ([] when it can)."""
    config = json.loads((folder / "config.json").read_text())
    out = []
    if config.get("model_type") != "llama":
        out.append(
            f"GGUF export covers the llama architecture; this model is {config.get('model_type')!r} "
            "(use llama.cpp's convert_hf_to_gguf.py for others)"
        )
    if config.get("rope_scaling"):
        out.append("GGUF export does not write rope scaling; this model sets config.rope_scaling")
    if config.get("attention_bias") or config.get("mlp_bias"):
        out.append("GGUF export writes Llama without biases; this model has attention_bias or mlp_bias")
    try:
        _vocabulary(folder)
    except ValueError as err:
        out.append(str(err))
    return out


def write(folder: Path, target: Path, type_name: str) -> None:
    """`folder` (a Llama HF folder with a fast tokenizer) as one GGUF file of `type_name` at `target`."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))

    writer = gguf.GGUFWriter(str(target), "llama")
    writer.add_name(folder.name if folder.name != "model" else folder.parent.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(TYPES[type_name])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, folder, config)

    for hf_name, array in tensors.items():
        name = _gguf_name(hf_name)
        if name is None:
            raise ValueError(f"{hf_name}: no GGUF name for this tensor (not a Llama weight)")
        array = array.astype(np.float32)
        if hf_name.endswith("q_proj.weight"):
            array = _permute(array, heads)
        elif hf_name.endswith("k_proj.weight"):
            array = _permute(array, kv_heads)
        data, qtype = _encode(array, type_name)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def load(target: Path):
    """The GGUF file through transformers' loader (weights de-quantized to float32)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(target.parent), gguf_file=target.name)


def _rope_theta(config: dict) -> float:
    parameters = config.get("rope_parameters") or {}
    return parameters.get("rope_theta") or config.get("rope_theta") or 10000.0


def _gguf_name(hf_name: str) -> str | None:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    parts = hf_name.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in LAYER_TO_GGUF:
        return f"blk.{parts[2]}.{LAYER_TO_GGUF[parts[3]]}"
    return None


def _permute(weight, heads: int):
    """Hugging Face's rotary layout (halves) to llama.cpp's (interleaved pairs), per head."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _encode(array, type_name: str):
    """(bytes or values, GGML type) of one tensor: 1-D tensors stay F32; a 2-D weight whose rows do not
    divide into the type's blocks falls back to F16."""
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[type_name.upper()]
    if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return array, gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if array.shape[-1] % block:
        qtype = gguf.GGMLQuantizationType.F16
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16), qtype
    return gguf.quants.quantize(array, qtype), qtype


def _vocabulary(folder: Path) -> tuple[str, list[str], list[str], str | None]:
    """(llama.cpp tokenizer model, tokens by id, merges, pre-tokenizer name) of the folder's
    tokenizer.json; ValueError with the reason when GGUF cannot express it here."""
    file = folder / "tokenizer.json"
    if not file.exists():
        raise ValueError("GGUF export needs a fast tokenizer (tokenizer.json) in the model folder")
    spec = json.loads(file.read_text())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    by_id = {i: t for t, i in (model.get("vocab") or {}).items()}
    by_id.update({a["id"]: a["content"] for a in spec.get("added_tokens") or []})
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(max(by_id, default=-1) + 1)]
    if model.get("type") == "BPE" and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        return "gpt2", tokens, merges, "gpt-2"
    if model.get("type") == "WordLevel" and _splits_characters(pre):
        # One token per character: llama.cpp's sentencepiece tokenizer with no multi-character
        # pieces and no space prefix cuts text the same way (spaces are spelled U+2581).
        return "llama", [t.replace(" ", "\u2581") for t in tokens], [], None
    raise ValueError(
        f"GGUF export writes byte-level BPE tokenizers and raylm's char tokenizer; this one is "
        f"{model.get('type')} with a {pre.get('type')} pre-tokenizer"
    )


def _splits_characters(pre: dict) -> bool:
    return pre.get("type") == "Split" and (pre.get("pattern") or {}).get("String") == ""


def _add_tokenizer(writer, folder: Path, config: dict) -> None:
    import gguf
    from transformers import AutoTokenizer

    model, tokens, merges, pre = _vocabulary(folder)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), config["vocab_size"])]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    specials = set(tokenizer.all_special_ids)
    types = [
        gguf.TokenType.CONTROL
        if i in specials
        else gguf.TokenType.UNUSED
        if i >= len(tokenizer)
        else gguf.TokenType.NORMAL
        for i in range(len(tokens))
    ]
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if model == "gpt2":
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges(merges)
    else:
        writer.add_token_scores([0.0] * len(tokens))
        writer.add_add_space_prefix(False)
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    probe = tokenizer("a")["input_ids"]  # what the tokenizer adds around a text, said as llama.cpp's flags
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
