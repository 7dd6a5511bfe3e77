"""Tokenizers: load a Hugging Face fast tokenizer, or train a byte-level BPE / char one on the corpus.

Trained tokenizers are `PreTrainedTokenizerFast` objects with bos/eos/pad/unk set, so they save and
reload with `AutoTokenizer.from_pretrained` like any hub tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int, min_frequency: int = 2):
    """Train a tokenizer of `kind` ("bpe" or "char") on `texts`; returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    if kind == "bpe":
        core = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        core.train_from_iterator(texts, trainer=trainer)
    elif kind == "char":
        alphabet = sorted({ch for text in texts for ch in text})
        vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
        core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
        core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
        core.decoder = decoders.Fuse()
    else:
        raise ValueError(f"unknown tokenizer type {kind!r}: choose bpe or char")
    return PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
