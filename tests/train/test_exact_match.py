"""Exact match, alone and split across ranks in lockstep, against transformers' own `generate`."""

import torch


def test_ranks_answering_in_lockstep_count_what_generate_answers(sft_base):
    """Ten prompts; the reference answers are transformers' greedy continuations (one prompt at a time,
    stopping at EOS) for the even ones and a wrong string for the odd ones. Split over 3 ranks (shares of
    4, 3 and 3, the short ones padded, every answer generated to full length and cut at EOS), the ranks'
    right answers add up to 5 of 10; the single-process exact match says 0.5."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm.data.corpus import stories
    from raylm.train.exact_match import exact_match, exact_match_share

    tokenizer = AutoTokenizer.from_pretrained(sft_base)
    model = AutoModelForCausalLM.from_pretrained(sft_base).eval()
    texts = list(stories(10, seed=3))
    prompts = [
        [tokenizer.bos_token_id, *tokenizer(t[: 12 + i], add_special_tokens=False)["input_ids"]]
        for i, t in enumerate(texts)
    ]
    pairs = []
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        answer = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
        pairs.append((ids, answer if i % 2 == 0 else answer + "#wrong"))
    assert any(p[1].strip() for p in pairs[::2])  # the model says something: the count is not trivial

    shares = [exact_match_share(model, tokenizer, pairs, rank, 3, 6) for rank in range(3)]
    assert [n for _, n in shares] == [4, 3, 3]
    assert sum(right for right, _ in shares) == 5
    assert exact_match(model, tokenizer, pairs, 6)["exact_match"] == 0.5
