"""The server's requests and their text: a `Request` per prompt, a `Choice` per output row that turns
tokens into text deltas (stopped at its own limit, stop sequence or end-of-sequence), and `Engine`,
which holds the model and runs what the continuous-batching loop (raylm/serve/continuous.py) does not
decode itself through transformers' `generate`, streamed through the same bookkeeping:

    engine = Engine(model, tokenizer)
    engine.generate([Request(prompt_ids, controls, emit=print)])      # blocking; beams, seeded sampling

`emit(index, delta, finish_reason, tokens)` is called for every piece of text of choice `index`;
finish_reason is set once, on the last call for that choice ("stop" or "length"; "error" when
generation failed, with the exception in `request.error`), with the tokens that choice generated.
LoRA adapters loaded into a PEFT model serve mixed batches (`adapter_names`, one per row).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

from raylm.infer.sampling import eos_ids

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
CONTEXT_TOKENS = 5  # prompt tokens the first decoding window starts with


@dataclass
class Request:
    prompt_ids: list[int]
    controls: object  # raylm.spec.generation.GenerationSpec
    emit: Callable[[int, str, str | None, int], None]
    adapter: str | None = None
    cancelled: bool = False  # set by the server when the caller gave up (timeout, disconnect)
    error: Exception | None = None  # set with finish reason "error" when generation failed
    token_ids: dict = field(default_factory=dict)  # choice index -> its tokens, set as it finishes
    engine_id: int | None = None  # its number between the replica and the model's process


class Choice:
    """One output row: its tokens, its text, what was emitted, whether and why it finished.

    Text is decoded incrementally (the technique of vLLM's and TGI's detokenizers): each step decodes
    a window of the last few tokens twice, without and with the new token, and appends the
    difference once it ends in a whole character. Decoding the window, not the new token alone, keeps
    what a token means in context (SentencePiece's leading space, multi-byte characters split over
    byte-fallback tokens); a step costs the window, not the whole completion. The first window starts
    in the prompt's last tokens, so a completion that begins a new word keeps its leading space
    (" Paris" after "The capital is", as OpenAI's API and vLLM give it)."""

    def __init__(self, request: Request, index: int, tokenizer, eos: frozenset[int] | None = None):
        self.request, self.index, self.tokenizer = request, index, tokenizer
        self.eos = eos if eos is not None else frozenset({tokenizer.eos_token_id}) - {None}
        self.tokens: list[int] = []
        self.ids = list(request.prompt_ids[-CONTEXT_TOKENS:])  # the prompt's tail, then the tokens
        self.text = ""  # the text of ids[:read] after the prompt's tail
        self.prefix, self.read = 0, len(self.ids)  # the decoding window's start; ids decoded so far
        self.sent = 0
        self.finish: str | None = None

    def add(self, token: int) -> None:
        if self.finish is not None:
            return
        controls = self.request.controls
        self.tokens.append(token)
        self.ids.append(token)
        searched = max(len(self.text) - max((len(s) for s in controls.stop), default=0), 0)
        self._decode()
        text = self.text
        cuts = [text.find(s, searched) for s in controls.stop if s in text[searched:]]
        if cuts:
            text, self.finish = text[: min(cuts)], "stop"
        elif token in self.eos:
            self.finish = "stop"
        elif len(self.tokens) >= controls.max_new_tokens or self.request.cancelled:
            self.finish = "length"
        if self.finish and not cuts:
            text = self.text = self.text + self._pending()  # an unfinished character ends as U+FFFD
        end = len(text) if self.finish else self._safe_end(text)
        if self.finish:
            self.request.token_ids[self.index] = list(self.tokens)
        if end > self.sent or self.finish:
            self.request.emit(self.index, text[self.sent : end], self.finish, len(self.tokens))
            self.sent = max(self.sent, end)

    def _decode(self) -> None:
        new = self._pending()
        if new and not new.endswith("\ufffd"):  # else wait: the character continues in the next token
            self.text += new
            self.prefix, self.read = self.read, len(self.ids)

    def _pending(self) -> str:
        """Text the tokens after `read` add, decoded in the context of the window before them."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix :], skip_special_tokens=True)
        return after[len(before) :] if len(after) > len(before) else ""

    def _safe_end(self, text: str) -> int:
        """Hold back a tail that may be the start of a stop sequence."""
        end = len(text)
        for stop in self.request.controls.stop:
            for k in range(min(len(stop) - 1, end - self.sent), 0, -1):
                if text[:end].endswith(stop[:k]):
                    end = min(end, len(text[:end]) - k)
                    break
        return end


class _Tracker:
    """transformers streamer + stopping criterion over all rows of one `generate` call."""

    def __init__(self, rows: list[Choice]):
        self.rows = rows
        self.prompt_seen = False

    # streamer protocol
    def put(self, value) -> None:
        if not self.prompt_seen:  # generate first hands over the prompts
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.view(-1).tolist(), strict=True):
            row.add(token)

    def end(self) -> None:
        for row in self.rows:  # generate stopped (its own max_new_tokens): close what is open
            if row.finish is None:
                row.finish = "length"
                row.request.token_ids[row.index] = list(row.tokens)
                row.request.emit(row.index, "", "length", len(row.tokens))

    # stopping-criterion protocol: a bool per row, True when that row is done
    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.tensor([row.finish is not None for row in self.rows], device=input_ids.device)


@contextmanager
def hooks_dropped_on_failure(model):
    """PEFT's `adapter_names` registers forward pre-hooks for the length of a call and removes them
    after it, but not when the call raises. A hook left behind would pass its adapters to every later
    forward pass, a `generate` running beside the loop included: on failure, remove the hooks the
    call registered (hook ids only grow, and no other thread registers one during a turn)."""
    from torch.utils.hooks import RemovableHandle

    first = RemovableHandle.next_id
    try:
        yield
    except BaseException:
        for module in model.modules():
            for key in [k for k in module._forward_pre_hooks if k >= first]:
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
        raise


class _Pause:
    """A stopping criterion called once per step of `generate`, where another thread may take its turn
    with the model; it stops the rows only once every caller of the group has gone."""

    def __init__(self, between_steps: Callable[[], None], group: list[Request]):
        self.between_steps, self.group = between_steps, group

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.between_steps()
        gone = all(request.cancelled for request in self.group)  # every caller left: stop, free the slot
        return torch.full((input_ids.shape[0],), gone, dtype=torch.bool, device=input_ids.device)


class Engine:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.model.eval()
        # What a request for the served model (not one of the server's adapters) decodes with: the base,
        # or the adapter itself where the served model is a LoRA adapter (a PEFT model as loaded).
        self.own_adapter = model.active_adapter if hasattr(model, "peft_config") else BASE
        self.eos = eos_ids(model, tokenizer)

    def adapter_names(self, adapters: list[str | None]) -> list[str] | None:
        """PEFT's adapter name for each row (None: the served model's own), so that no row decodes with
        whichever adapter PEFT has active; None where the model holds no LoRA adapters to choose from
        (a plain model, or prompt learning and IA3 served as the model, which run as loaded)."""
        configs = getattr(self.model, "peft_config", {})
        if not configs or any(str(c.peft_type.value) != "LORA" for c in configs.values()):
            return None
        return [name or self.own_adapter for name in adapters]

    def generate(self, group: list[Request], between_steps: Callable[[], None] | None = None) -> None:
        """One `generate` call for requests with the same controls (but max_new_tokens and stop);
        `between_steps()` is called after each decoding step (the server's loop takes its turn there)."""
        import torch
        from transformers import StoppingCriteriaList

        from raylm.infer.sampling import generate_kwargs

        controls = group[0].controls
        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        width = max(len(r.prompt_ids) for r in group)
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in group])
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in group])
        rows = [Choice(r, i, self.tokenizer, self.eos) for r in group for i in range(controls.n)]
        tracker = _Tracker(rows)
        kwargs = generate_kwargs(controls.model_copy(update={"stop": []}), self.tokenizer)
        kwargs["max_new_tokens"] = max(r.controls.max_new_tokens for r in group)
        beams = controls.num_beams > 1
        criteria = StoppingCriteriaList([_Pause(between_steps, group)] if between_steps else [])
        if not beams:  # transformers streams greedy and sampled decoding only; beams are replayed after
            kwargs["streamer"] = tracker
            criteria.append(tracker)
        if criteria:
            kwargs["stopping_criteria"] = criteria
        names = self.adapter_names([r.adapter for r in group for _ in range(controls.n)])
        if names is not None:
            kwargs["adapter_names"] = names
        device = next(self.model.parameters()).device
        if controls.seed is not None:
            torch.manual_seed(controls.seed)
        with torch.no_grad():
            out = self.model.generate(ids.to(device), attention_mask=mask.to(device), **kwargs)
        if beams:  # replay the finished beams through the same bookkeeping
            tracker.prompt_seen = True
            for step in range(width, out.shape[1]):
                tracker.put(out[:, step].cpu())
        tracker.end()
