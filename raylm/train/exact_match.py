"""Generation-based evaluation: a greedy sample, and exact match of greedy answers.

from raylm.train.exact_match import exact_match
accuracy = exact_match(model, tokenizer, [("Q: 2+2=\\nA:", " 4")], max_new_tokens=8)
"""

from __future__ import annotations


def greedy_sample(model, tokenizer, prompt_ids: list[int], new_tokens: int = 48) -> dict:
    """Greedy continuation of `prompt_ids`: a quick look at what was learned."""
    import torch

    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=next(model.parameters()).device)
    model.eval()
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return {"prompt": tokenizer.decode(prompt[0]), "completion": tokenizer.decode(out[0, len(prompt_ids) :])}


def exact_match(
    model, tokenizer, pairs: list[tuple[list[int], str]], max_new_tokens: int, batch: int = 32
) -> dict:
    """Share of prompts (token ids) whose greedy answer, stripped, equals the reference (stripped).

    Prompts are left-padded into batches; generation stops at EOS or `max_new_tokens`.
    """
    if not pairs:
        return {"exact_match": None, "examples": 0}
    answers = greedy_answers(model, tokenizer, [ids for ids, _ in pairs], max_new_tokens, batch)
    correct = sum(a.strip() == ref.strip() for a, (_, ref) in zip(answers, pairs, strict=True))
    shown = [{"answer": a, "reference": ref} for a, (_, ref) in zip(answers[:3], pairs, strict=False)]
    return {"exact_match": correct / len(pairs), "examples": len(pairs), "shown": shown}


def exact_match_share(
    model, tokenizer, pairs: list[tuple[list[int], str]], rank: int, world: int, max_new_tokens: int
) -> tuple[int, int]:
    """(right answers, examples) of this rank's share of `pairs` (every world-th from `rank`), for a
    sum over ranks. Every rank runs the same number of forward passes (its share padded to the
    largest, every answer generated to `max_new_tokens` and cut at EOS afterwards), so a sharded
    model (fsdp, ZeRO-3), whose forward is a collective, answers in lockstep."""
    share = pairs[rank::world]
    size = -(-len(pairs) // world)
    filler = [pairs[0]] * (size - len(share))
    answers = greedy_answers(
        model, tokenizer, [ids for ids, _ in share + filler], max_new_tokens, lockstep=True
    )
    right = sum(a.strip() == ref.strip() for a, (_, ref) in zip(answers, share, strict=False))
    return right, len(share)


def greedy_answers(
    model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch: int = 32, lockstep: bool = False
) -> list[str]:
    """Greedy continuations of `prompts` (token ids), decoded up to EOS. `lockstep`: generate exactly
    `max_new_tokens` for every prompt (no early stop at EOS), then cut at EOS: the same answers."""
    import torch

    device = next(p for p in model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    answers = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        width = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, prompt in enumerate(chunk):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=None if lockstep else eos,
            )
        for row in range(len(chunk)):
            tokens = out[row, width:].tolist()
            if eos is not None and eos in tokens:
                tokens = tokens[: tokens.index(eos)]
            answers.append(tokenizer.decode(tokens, skip_special_tokens=True))
    model.train(was_training)
    return answers
