"""Generation-based evaluation: a greedy sample, and exact match of greedy answers.

from raylm.evaluate import exact_match
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
    import torch

    if not pairs:
        return {"exact_match": None, "examples": 0}
    device = next(p for p in model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    correct, shown = 0, []
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (prompt, _) in enumerate(chunk):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
        for row, (_, reference) in enumerate(chunk):
            answer = tokenizer.decode(out[row, width:], skip_special_tokens=True)
            correct += answer.strip() == reference.strip()
            if len(shown) < 3:
                shown.append({"answer": answer, "reference": reference})
    model.train(was_training)
    return {"exact_match": correct / len(pairs), "examples": len(pairs), "shown": shown}
