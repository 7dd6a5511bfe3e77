"""Continuous batching: one decoding loop per replica that admits requests between steps.

    loop = DecodeLoop(engine, max_rows=16)
    loop.submit(requests)          # from any thread; text arrives through each request's emit
    loop.call(fn).result()         # run fn on the model's thread (adapter loads) between steps

Static batching (a batch runs to its end before the next starts) leaves a request that arrives just
after a batch began waiting for the whole batch. Here a new request is prefilled on its own and its
key/value cache joins the running batch at the next step (left-padded to the batch's length), and a
row leaves as soon as it finishes, so up to `max_rows` sequences decode together at every step.

Greedy and sampled requests decode here with transformers' own logits processors (repetition penalty,
temperature, top-k, top-p, min-p, in `generate`'s order); beam search, seeded requests (their seed must
give `raylm generate`'s text) and prompt-learning adapters run through `generate` itself
(raylm.serve.engine.Engine) on a second thread, one at a time, taking turns with the loop: the two
threads' forward passes alternate (`Turns`), so a long beam search slows the other streams by its own
steps instead of freezing them until it ends. The loop samples with its own random generator, so a
seeded `generate` draws exactly what it would draw alone.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future

from raylm.serve.compiled import compile_step
from raylm.serve.engine import Choice, Engine, Request, hooks_dropped_on_failure

OBSERVE_S = 0.25  # the loop reports its queue and batch size at most this often


def decodes_here(request: Request, model) -> bool:
    """Whether the step loop can decode `request` (else transformers' generate does)."""
    configs = getattr(model, "peft_config", {}) or {}
    if any(getattr(c, "is_prompt_learning", False) for c in configs.values()):
        return False  # prefix / prompt tuning feed their own past key values
    return request.controls.num_beams == 1 and request.controls.seed is None


class Turns:
    """A lock granted in the order it was asked for. The decoding loop holds it for each step and
    `generate` (on its own thread) for each of its steps, handing it over between them (`pass_on`):
    whoever waited gets the model next, so the two alternate step by step."""

    def __init__(self):
        self._changed = threading.Condition()
        self._queue: deque = deque()
        self._held = False

    def __enter__(self):
        me = object()
        with self._changed:
            self._queue.append(me)
            self._changed.wait_for(lambda: not self._held and self._queue[0] is me)
            self._queue.popleft()
            self._held = True
        return self

    def __exit__(self, *exc) -> None:
        with self._changed:
            self._held = False
            self._changed.notify_all()

    def pass_on(self) -> None:
        """Let whoever is waiting take one turn (at once back when nobody waits)."""
        self.__exit__()
        self.__enter__()


class _Row:
    """One decoding sequence: its choice bookkeeping, its token history and its logits processors."""

    def __init__(self, choice: Choice, processors, adapter: str | None):
        self.choice, self.processors, self.adapter = choice, processors, adapter
        self.history: list[int] = list(choice.request.prompt_ids)


def _processors(controls):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    chain = LogitsProcessorList()
    if controls.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(controls.repetition_penalty))
    if controls.sampling:
        if controls.temperature != 1.0:
            chain.append(TemperatureLogitsWarper(controls.temperature))
        if controls.top_k:
            chain.append(TopKLogitsWarper(controls.top_k))
        if controls.top_p is not None and controls.top_p < 1.0:
            chain.append(TopPLogitsWarper(controls.top_p))
        if controls.min_p is not None:
            chain.append(MinPLogitsWarper(controls.min_p))
    return chain


class DecodeLoop:
    def __init__(
        self,
        engine: Engine,
        max_rows: int,
        observe=None,
        max_cached_tokens: int | None = None,
        compiled: bool = False,
    ):
        """`observe(waiting, running)`, if given, hears the queue length and batch size (at most
        every OBSERVE_S); `max_cached_tokens` bounds the key/value cache (see `cache_cost`);
        `compiled`: decoding steps through torch.compile (raylm.serve.compiled)."""
        self.engine, self.max_rows, self.observe = engine, max_rows, observe
        self.compiled_for = engine.model  # the model the compiled step calls (not one PEFT wrapped later)
        self.compiled = compile_step(engine.model, _cache_argument(engine.model)) if compiled else None
        self.compiled_steps = 0  # decoding steps the compiled step ran
        self.max_cached_tokens = max_cached_tokens
        self.observed = (0.0, None)
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: list[Request] = []
        self.rows: list[_Row] = []
        self.cache = None
        self.mask = None  # [rows, length]: 1 where a row has a real token
        self.random = None  # the loop's own generator (made on the model's device at the first draw)
        self.turns = Turns()
        self.beside: Request | None = None  # the request `generate` is running (on the second thread)
        self.beside_inbox: queue.Queue = queue.Queue()
        self.deferred: list = []  # calls that change the model, waiting for `generate` to end
        self.thread = threading.Thread(target=self._run, name="raylm-decode", daemon=True)
        self.thread.start()
        threading.Thread(target=self._run_beside, name="raylm-generate", daemon=True).start()

    # ---- from other threads ------------------------------------------------------------------
    def submit(self, requests: list[Request]) -> None:
        for request in requests:
            self.inbox.put(("request", request, None))

    def call(self, fn, changes_model: bool = False) -> Future:
        """Run fn between steps. `changes_model` (loading or deleting an adapter): also not while a
        `generate` is under way, whose model would change under it."""
        done: Future = Future()
        self.inbox.put(("exclusive" if changes_model else "call", fn, done))
        return done

    # ---- the model's thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._take(block=self._idle())
            with self.turns:
                if self.beside is None and self.deferred:
                    for fn, done in self.deferred:
                        _settle(fn, done)
                    self.deferred = []
                try:
                    self._admit()
                    self._report()
                    if self.rows:
                        self._step()
                except Exception as err:  # a failed step fails its requests, never the loop
                    _fail([row.choice for row in self.rows], err)
                    self.rows, self.cache, self.mask = [], None, None

    def _idle(self) -> bool:
        """Nothing to do until something arrives in the inbox (a request, a call, `generate`'s end):
        with no rows decoding, what the last pass did not admit waits for `generate` to end."""
        if self.rows:
            return False
        return self.beside is not None or not self.waiting and not self.deferred

    def _run_beside(self) -> None:
        """The second thread: one `generate` at a time, taking turns with the loop's steps."""
        while True:
            request = self.beside_inbox.get()
            try:
                with self.turns:
                    try:
                        self.engine.generate([request], between_steps=self.turns.pass_on)
                    except Exception as err:
                        choices = [
                            Choice(request, i, self.engine.tokenizer) for i in range(request.controls.n)
                        ]
                        _fail(choices, err)
            except Exception:  # noqa: BLE001 - even failing to report the failure must free the slot
                logging.getLogger(__name__).exception("generate beside the decoding loop failed")
            finally:
                self.inbox.put(("ended", request, None))

    def _report(self) -> None:
        if self.observe is None:
            return
        now, (last, values) = time.monotonic(), self.observed
        current = (len(self.waiting) + self.inbox.qsize(), len(self.rows))
        if current != values and now - last >= OBSERVE_S or not self.rows and current != values:
            self.observed = (now, current)
            try:
                self.observe(*current)
            except Exception:  # noqa: BLE001 - metrics must never fail the requests decoding
                logging.getLogger(__name__).exception("reporting the decoding loop's load failed; stopped")
                self.observe = None

    def _take(self, block: bool) -> None:
        try:
            item = self.inbox.get(block=block)
        except queue.Empty:
            return
        while True:
            kind, payload, done = item
            if kind == "call" or kind == "exclusive" and self.beside is None:
                with self.turns:
                    _settle(payload, done)
            elif kind == "exclusive":
                self.deferred.append((payload, done))
            elif kind == "ended":
                self.beside = None
            else:
                self.waiting.append(payload)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self) -> None:
        model = self.engine.model
        fresh: list[Request] = []
        for request in list(self.waiting):
            if not decodes_here(request, model):  # beams, seeds, prompt learning: generate itself
                if self.beside is not None or self.deferred:
                    continue  # one at a time, and after the adapter loads waiting for the last one
                if not self._fits([*fresh, request]) and (self.rows or fresh):
                    break  # generate's beams need room beside the running rows: wait for them
                self.waiting.remove(request)
                self.beside = request
                self.beside_inbox.put(request)
                continue
            if len(self.rows) + sum(r.controls.n for r in fresh) + request.controls.n > self.max_rows and (
                self.rows or fresh
            ):
                break
            if not self._fits([*fresh, request]):
                if self.rows or fresh or self.beside is not None:
                    break  # waits for running rows to finish
                self.waiting.remove(request)  # cannot fit even alone (the server refuses these before)
                _fail([Choice(request, i, self.engine.tokenizer) for i in range(request.controls.n)],
                      CacheBudgetError(cache_cost([request]), self.max_cached_tokens))  # fmt: skip
                continue
            self.waiting.remove(request)
            fresh.append(request)
        if fresh:
            self._prefill(fresh)

    def _fits(self, fresh: list[Request]) -> bool:
        """Whether the running rows and `fresh` stay within the key/value-cache budget."""
        if self.max_cached_tokens is None:
            return True
        beside = [self.beside] if self.beside is not None else []  # generate's rows hold cache too
        requests = [row.choice.request for row in self.rows] + beside + fresh
        return cache_cost(requests, rows_given=len(self.rows)) <= self.max_cached_tokens

    def _forward(self, ids, mask, positions, cache, adapters):
        import torch

        model = self.engine.model
        if (
            self.compiled is not None
            and cache is not None
            and adapters is None
            and model is self.compiled_for
        ):
            try:
                with torch.no_grad():
                    out = self.compiled(ids, mask, positions, cache)
                self.compiled_steps += 1
                return out
            except Exception:  # compiling failed (no compiler, a full disk ...): this step and the later ones
                # decode uncompiled (a failed graph changes no cache: its updates apply when it returns)
                logging.getLogger(__name__).exception(
                    "batching.compile: the compiled decoding step failed; decoding uncompiled from now on"
                )
                self.compiled = None
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": True}
        kwargs[_cache_argument(model)] = cache
        if adapters is not None:
            kwargs["adapter_names"] = adapters
        with torch.no_grad(), hooks_dropped_on_failure(model):
            out = model(**kwargs)
        cache = out.get("cache")
        return out.logits[:, -1, :].float(), cache if cache is not None else out.get("past_key_values")

    def _adapters(self, rows) -> list[str] | None:
        """Each row's adapter, the served model's rows included: once an adapter is loaded the model is
        a PEFT model whose active adapter would otherwise answer a request for the base."""
        return self.engine.adapter_names([r.adapter for r in rows])

    def _prefill(self, requests: list[Request]) -> None:
        import torch

        tokenizer, device = self.engine.tokenizer, next(self.engine.model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rows = [
            _Row(Choice(r, i, tokenizer, self.engine.eos), _processors(r.controls), r.adapter)
            for r in requests
            for i in range(r.controls.n)
        ]
        try:  # a prefill that fails fails its own requests; the running batch goes on untouched
            # compiled: at least 2 columns (a one-token prompt gets a masked pad), since torch builds a
            # graph of its own for a cache of length 1, which would stall every stream while it compiles
            width = max(2 if self.compiled is not None else 1, *(len(r.history) for r in rows))
            ids = torch.tensor([[pad] * (width - len(r.history)) + r.history for r in rows], device=device)
            mask = torch.tensor(
                [[0] * (width - len(r.history)) + [1] * len(r.history) for r in rows], device=device
            )
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits, cache = self._forward(ids, mask, positions, None, self._adapters(rows))
            self._merge(rows, cache, mask)
        except Exception as err:
            if len(requests) == 1:
                _fail([row.choice for row in rows], err)
            else:  # find the one(s) that failed: the others are prefilled alone
                for request in requests:
                    self._prefill([request])
            return
        self._choose(rows, logits)

    def _merge(self, rows, cache, mask) -> None:
        """Join the new rows' cache to the running batch's, left-padding the shorter in time."""
        import torch
        from transformers import DynamicCache

        if not self.rows:
            self.rows, self.cache, self.mask = rows, cache, mask
            return
        old, new = self.mask.shape[1], mask.shape[1]
        length = max(old, new)

        def left_pad(t, by):
            return t if by == 0 else torch.nn.functional.pad(t, (0, 0, by, 0))

        layers = []
        for a, b in zip(self.cache.layers, cache.layers, strict=True):
            keys = torch.cat([left_pad(a.keys, length - old), left_pad(b.keys, length - new)])
            values = torch.cat([left_pad(a.values, length - old), left_pad(b.values, length - new)])
            layers.append((keys, values))
        self.cache = DynamicCache(layers)
        self.mask = torch.cat(
            [
                torch.nn.functional.pad(self.mask, (length - old, 0)),
                torch.nn.functional.pad(mask, (length - new, 0)),
            ]
        )
        self.rows = self.rows + rows

    def _step(self) -> None:
        import torch

        device = self.mask.device
        last = torch.tensor([[r.history[-1]] for r in self.rows], device=device)
        self.mask = torch.cat(
            [self.mask, torch.ones(len(self.rows), 1, dtype=self.mask.dtype, device=device)], 1
        )
        positions = self.mask.sum(-1, keepdim=True) - 1
        logits, self.cache = self._forward(last, self.mask, positions, self.cache, self._adapters(self.rows))
        self._choose(self.rows, logits)

    def _choose(self, rows, logits) -> None:
        """The next token of every row (greedy: argmax; else sampled after its processors), then
        drop the rows that finished."""
        import torch

        greedy = logits.argmax(-1).tolist()  # plain greedy rows: one operation and one copy for all
        for i, row in enumerate(rows):
            plain = not row.processors and not row.choice.request.controls.sampling
            token = greedy[i] if plain else self._pick(row, logits[i : i + 1])
            row.history.append(token)
            row.choice.add(token)
        keep = [i for i, row in enumerate(self.rows) if row.choice.finish is None]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        self.cache.batch_select_indices(torch.tensor(keep, device=self.mask.device))
        self.mask = self.mask[keep]
        self.rows = [self.rows[i] for i in keep]
        start = int((self.mask.sum(0) > 0).nonzero()[0])  # columns every remaining row pads: drop them
        if start:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
                if self.compiled is not None:  # contiguous, as every other step leaves them: the compiled
                    # graphs assume those strides, and a view would make torch compile another
                    layer.keys, layer.values = layer.keys.contiguous(), layer.values.contiguous()

    def _pick(self, row, scores) -> int:
        """A row's next token after its logits processors: sampled, or their argmax."""
        import torch

        if row.processors:
            scores = row.processors(torch.tensor([row.history], device=scores.device), scores)
        if not row.choice.request.controls.sampling:
            return int(scores.argmax(-1)[0])
        if self.random is None:  # not torch's global generator, which a seeded generate uses
            self.random = torch.Generator(device=scores.device)
            self.random.seed()
        return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=self.random)[0, 0])


class CacheBudgetError(RuntimeError):
    def __init__(self, needed: int, budget: int | None):
        super().__init__(
            f"needs a key/value cache of {needed} tokens (n x (prompt + max_tokens)); this replica holds "
            f"at most {budget} (batching.max_cached_tokens): lower max_tokens or n, or shorten the prompt"
        )


def cache_cost(requests: list[Request], rows_given: int | None = None) -> int:
    """Worst-case tokens the key/value cache holds for these requests decoding together: rows times
    the longest row's prompt + max_tokens (rows are left-padded to one length); beams count as rows.
    `rows_given`: that many of the requests' rows are running rows (one per entry), not requests."""
    rows, longest = 0, 0
    for position, request in enumerate(requests):
        controls = request.controls
        count = 1 if rows_given is not None and position < rows_given else controls.n * controls.num_beams
        rows += count
        longest = max(longest, len(request.prompt_ids) + controls.max_new_tokens)
    return rows * longest


def default_cache_budget(model) -> int:
    """Tokens of key/value cache that fit in 80% of the GPU memory free after loading the model (on
    CPU: half the available RAM): 2 (keys, values) x layers x key/value heads x head size x bytes."""
    import psutil
    import torch

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 64)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    parameter = next(model.parameters())
    element = torch.finfo(parameter.dtype).bits // 8 if parameter.dtype.is_floating_point else 2
    per_token = 2 * layers * kv_heads * head_dim * element
    if parameter.device.type == "cuda":
        free = torch.cuda.mem_get_info(parameter.device)[0] * 0.8
    else:
        free = psutil.virtual_memory().available * 0.5
    return max(int(free // per_token), 1)


def _settle(fn, done: Future) -> None:
    try:
        done.set_result(fn())
    except Exception as err:
        done.set_exception(err)


def _fail(choices, err: Exception) -> None:
    for choice in choices:
        if choice.finish is None:
            choice.finish = "error"
            choice.request.error = err
            choice.request.emit(choice.index, "", "error", len(choice.tokens))


def _cache_argument(model) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
