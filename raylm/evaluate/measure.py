"""One model's evaluation, run as a Ray task: load it as `raylm generate` does, then perplexity over
the held-out text (tokenized and packed with the model's own tokenizer, as pretraining packs it) and each
task's score, with every answer kept for inspection.

    row, answers = evaluate_model(spec_dict, index, texts, task_rows)      # on a Ray worker
"""

from __future__ import annotations

import math
from pathlib import Path


def evaluate_model(spec: dict, index: int, texts: list[str], task_rows: list[list[dict]]):
    """(the model's row of the table, its per-example answers)."""
    import torch

    from raylm.compress.measure import cross_entropy
    from raylm.infer.loading import LoadError, load_for_generation
    from raylm.runtime.startup_gc import after_startup
    from raylm.spec.evaluate import EvaluateJob

    after_startup()  # Python's collection thresholds while the model's tensors live
    job = EvaluateJob(**spec)
    entry = job.models[index]
    torch.set_num_threads(max(1, int(job.resources.cpus)))
    device = "cuda" if job.resources.use_gpu else "cpu"
    if entry.endpoint is not None:
        from transformers import AutoTokenizer

        from raylm.evaluate.endpoint import Endpoint, shown
        from raylm.runtime.storage import fetch_artifact, run_artifact

        model = Endpoint(entry.endpoint)
        # this node's copy of the tokenizer (a run folder: its model's), for lm-eval's client too
        entry.endpoint.tokenizer = str(run_artifact(Path(fetch_artifact(entry.endpoint.tokenizer))))
        tokenizer = AutoTokenizer.from_pretrained(entry.endpoint.tokenizer)
        loaded = f"{entry.endpoint.model} at {shown(entry.endpoint.url)}"
    else:
        try:
            model, tokenizer, loaded = load_for_generation(entry.path, entry.base, device, entry.dtype)
        except LoadError as err:
            raise LoadError(f"models.{index} ({entry.label}): {err}") from None
        model.eval()
    remote = entry.endpoint is not None
    row: dict = {"model": entry.label, "loaded": loaded}
    answers: list[dict] = []
    if job.perplexity is not None:
        blocks = text_blocks(texts, tokenizer, job.perplexity)
        if not blocks:
            data = job.perplexity.data
            raise ValueError(
                f"models.{index} ({entry.label}): its tokenizer packs the perplexity text into no "
                f"{job.perplexity.split} block of {data.seq_len} tokens: give more text or a shorter "
                "perplexity.data.seq_len"
            )
        nll, tokens = model.cross_entropy(blocks) if remote else cross_entropy(model, blocks)
        row |= {"perplexity": math.exp(nll), "nll": nll, "ppl_tokens": tokens}
    for task, rows in zip(job.tasks, task_rows, strict=True):
        score, scored = score_task(model, tokenizer, task, rows, remote)
        row[task.name] = score
        answers += [{"model": entry.label, "task": task.name, **a} for a in scored]
    if job.harness is not None:
        from raylm.evaluate.harness import run_harness

        found, scored = run_harness(model, tokenizer, job.harness, entry.endpoint)
        row |= found
        answers += [{"model": entry.label, **a} for a in scored]
    return row, answers


def text_blocks(texts: list[str], tokenizer, spec) -> list[list[int]]:
    """The blocks of `texts` as raylm's pretraining packs them (raylm.data.pipeline.pack_batch, in
    batches of data.pack_batch_docs documents), of the asked split, at most spec.blocks."""
    from raylm.data.pipeline import is_line_format, pack_batch

    data = spec.data
    add_eos = data.add_eos and not is_line_format(data)
    blocks: list[list[int]] = []
    for start in range(0, len(texts), data.pack_batch_docs):
        batch = {"text": texts[start : start + data.pack_batch_docs]}
        for packed in pack_batch(batch, tokenizer, data.seq_len, add_eos, data.val_fraction):
            for ids, val in zip(packed["input_ids"], packed["val"], strict=True):
                if spec.split == "all" or (spec.split == "validation") == bool(val):
                    blocks.append([int(t) for t in ids])
                    if len(blocks) >= spec.blocks:
                        return blocks
    return blocks


def score_task(
    model, tokenizer, task, rows: list[dict], remote: bool = False
) -> tuple[float | None, list[dict]]:
    """(exact match or choice accuracy, each example's prompt, answer, reference and verdict)."""
    from raylm.data.sft import answer_index, choice_texts, prompt_ids, render
    from raylm.train.exact_match import greedy_answers

    if not rows:
        return None, []
    if task.data.format == "choices":
        scored = []
        for row in rows:
            prompt, reference = render(row, task.data, tokenizer)
            options = choice_texts(row, task.data)
            if remote:
                picked = model.pick_choice(tokenizer, prompt, options, task.data)
            else:
                picked = pick_choice(model, tokenizer, prompt, options, task.data)
            right = answer_index(row, task.data, len(options))
            scored.append(
                {
                    "prompt": prompt,
                    "answer": options[picked],
                    "reference": reference,
                    "correct": picked == right,
                }
            )
    else:
        pairs = [render(row, task.data, tokenizer) for row in rows]
        prompts = [prompt_ids(p, tokenizer) for p, _ in pairs]
        if remote:
            generated = model.greedy_answers(tokenizer, prompts, task.max_new_tokens)
        else:
            generated = greedy_answers(model, tokenizer, prompts, task.max_new_tokens)
        scored = [
            {"prompt": p, "answer": a, "reference": r, "correct": a.strip() == r.strip()}
            for (p, r), a in zip(pairs, generated, strict=True)
        ]
    return sum(s["correct"] for s in scored) / len(scored), scored


def pick_choice(model, tokenizer, prompt: str, options: list[str], spec) -> int:
    """The index of the option fine-tuning's choice accuracy picks: each option encoded and collated as
    for training (raylm.data.sft), the largest length-normalised log-probability of its labelled tokens
    (raylm.train.objectives, as choices_eval)."""
    import torch

    from raylm.data.sft import collate, encode
    from raylm.train.objectives import choice_logprobs, length_normalised

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = collate([encode(prompt, option, tokenizer, spec) for option in options], spec.seq_len, pad)
    device = next(model.parameters()).device
    batch = {key: torch.as_tensor(value, device=device).unsqueeze(0) for key, value in encoded.items()}
    with torch.no_grad():
        return int(length_normalised(*choice_logprobs(model, batch))[0].argmax())
