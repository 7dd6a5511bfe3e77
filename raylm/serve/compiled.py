"""The decoding step through `torch.compile` (`batching.compile: true`): one token per running row over
the key/value cache, the step the continuous-batching loop repeats for every output token.

On a small model the step is mostly Python and operator dispatch, not arithmetic (transformers' Llama
runs ~100 operators a token): compiled, with inductor's C++ wrapper, the quickstart model's step in the
loop takes 0.52 ms instead of 1.10 ms on one CPU core (benchmarks/decode_step.py). Shapes are dynamic
(batch and cache length change every step), so one graph serves every step; torch specializes a batch of
one apart from larger ones, which makes two graphs, both built by `warm_up` when the replica starts
(~10-15 s each on a CPU core) rather than under the first requests. Prefills and a model with LoRA
adapters loaded (PEFT's per-row `adapter_names` hooks) stay uncompiled. torch compiles C++ and needs a
compiler (gcc); where compiling fails the loop decodes uncompiled and says so. A cache of length 1 would
be a third graph: the loop pads a one-token prompt to two columns.
"""

from __future__ import annotations


def compile_step(model, cache_argument: str):
    """`step(ids, mask, positions, cache) -> (last logits in float32, cache)` for `model`, compiled."""
    import torch

    def step(ids, mask, positions, cache):
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
            **{cache_argument: cache},
        )  # fmt: skip
        cache = out.get("cache")
        return out.logits[:, -1, :].float(), cache if cache is not None else out.get("past_key_values")

    compiled = torch.compile(step, dynamic=True, options={"cpp_wrapper": True})

    def call(ids, mask, positions, cache):
        # lengths reached through the cache object would be compiled as constants first, and again as
        # dynamic at the next step: marked dynamic, the first graph is already the general one
        torch._dynamo.maybe_mark_dynamic(mask, 1)
        for layer in cache.layers:
            torch._dynamo.maybe_mark_dynamic(layer.keys, 2)
            torch._dynamo.maybe_mark_dynamic(layer.values, 2)
        return compiled(ids, mask, positions, cache)

    return call


def warm_up(loop, prompt_ids: list[int], controls) -> bool:
    """Decode a few tokens for one row, then for two rows together, through the loop itself, so that
    both graphs exist before the first request. False where no compiled step ran: compiling failed (the
    loop then decodes uncompiled), the model ended at once, or the model is a PEFT model (uncompiled)."""
    from concurrent.futures import Future

    from raylm.serve.engine import Request

    before = loop.compiled_steps
    for rows in (1, 2):
        ended: list[Future] = [Future() for _ in range(rows)]

        def emit(index, delta, reason, tokens, done=ended):
            if reason is not None:
                done[index].set_result(reason)

        loop.submit([Request(prompt_ids, controls.model_copy(update={"n": rows}), emit=emit)])
        for future in ended:
            future.result(timeout=600)
    return loop.compiled_steps > before
