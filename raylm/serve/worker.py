"""The model's own process: a replica runs its model, the continuous-batching loop and `generate` in a
child process, and keeps HTTP, validation, tokenizing prompts and streaming in its own.

    engine = EngineProcess(job_dict, observe=metrics_fn)   # starts the child; returns once the model loaded
    engine.submit([Request(ids, controls, emit=fn)])       # text arrives through emit, on a reader thread
    engine.cancel(request)                                 # the caller left: its rows stop at the next step
    await asyncio.wrap_future(engine.call("score", tokens, start, top, adapter))   # between steps
    engine.close()

Why a process: a Python interpreter runs one thread at a time. In the replica's process the decoding
loop shared it with Ray Serve's event loop and request threads, and under load each step (a few
hundred small tensor operations, each releasing and re-taking the interpreter lock) spent more time
waiting for it than computing (6.1 ms a step against 2.8 ms of CPU at 16 streams on the quickstart
model, in one instrumented run); with the model in its own process batching serves more requests/s
(benchmarks/serve_load.py, BENCHMARKS.md). vLLM runs its engine in a process of its own for the same
reason.

The two talk through a socket pair (multiprocessing's Connection: pickled messages). Parent to child:
`submit`, `cancel`, `call` (an operation between steps: load an adapter, score tokens, read a count).
Child to parent: `ready` (after loading: the tokenizer and the model's limits) or `failed`, `emit` (the
text deltas of the rows that moved since the last message; a choice's first and last text go at once,
the text between waits up to GATHER_S), `result` (of a call), `load` (queue length and batch size, for
the metrics). The child watches its end of the socket: when the replica goes, however it goes and
whatever the child is doing, the model's process ends with it.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
from concurrent.futures import Future

from raylm.serve.engine import Request

GATHER_S = 0.02  # the longest a text event in the middle of a request waits in the model's process


class EngineError(RuntimeError):
    """The model's process could not be started, or ended."""


class EngineProcess:
    """The replica's side: starts the child, forwards requests, hands their text to each request's
    emit and the calls' results to their futures."""

    def __init__(self, spec: dict, observe=None):
        from multiprocessing import Pipe

        self.observe = observe
        self.conn, child = Pipe()
        code = (  # fewer collections while it imports (raylm.runtime.startup_gc)
            "from raylm.runtime.startup_gc import during_startup; during_startup(); "
            "from raylm.serve.worker import main; main()"
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "RAYLM_ENGINE_FD": str(child.fileno())}  # fmt: skip
        # a session of its own: a Ctrl-C at the terminal stops the replica, whose end closes the socket
        self.process = subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            pass_fds=(child.fileno(),),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
        child.close()
        self.conn.send(spec)
        kind = None
        while kind not in ("ready", "failed"):  # (a compiling warm-up reports its load meanwhile)
            try:
                kind, payload = self.conn.recv()[:2]
            except (EOFError, OSError):
                code = self.process.wait()
                raise EngineError(
                    f"the model's process ended while loading the model (exit code {code})"
                ) from None
        if kind == "failed":
            self._reap(timeout=60)  # it exits once it has reported
            raise payload
        self.tokenizer = payload["tokenizer"]
        self.context, self.vocabulary = payload["context"], payload["vocabulary"]
        self.cache_budget, self.warning = payload["cache_budget"], payload["warning"]
        self.ids = itertools.count()
        self.requests: dict[int, tuple[Request, set[int]]] = {}  # id -> (request, its open choices)
        self.calls: dict[int, Future] = {}
        self.lock = threading.Lock()  # the tables above (never held while sending)
        self.send_lock = threading.Lock()  # one writer at a time
        self.ended: str | None = None  # why the child is gone
        self.closing = False
        self.reader = threading.Thread(target=self._read, name="raylm-engine-reader", daemon=True)
        self.reader.start()

    # ---- from the replica ---------------------------------------------------------------------
    def submit(self, requests: list[Request]) -> None:
        sent = []
        with self.lock:
            if self.ended is None:
                for request in requests:
                    number = next(self.ids)
                    request.engine_id = number
                    self.requests[number] = (request, set(range(request.controls.n)))
                    sent.append((number, request.prompt_ids, request.controls, request.adapter))
        if sent:
            self._send(("submit", sent))
        else:
            for request in requests:
                _fail(request, set(range(request.controls.n)), EngineError(self.ended))

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        with self.lock:
            wanted = request.engine_id in self.requests and self.ended is None
        if wanted:
            self._send(("cancel", request.engine_id))

    def call(self, operation: str, *args) -> Future:
        """Run `operation` (see _Model.operation) in the child between two decoding steps."""
        done: Future = Future()
        with self.lock:
            if self.ended is not None:
                done.set_exception(EngineError(self.ended))
                return done
            number = next(self.ids)
            self.calls[number] = done
        self._send(("call", number, operation, args))
        return done

    def alive(self) -> bool:
        return self.ended is None and self.process.poll() is None and self.reader.is_alive()

    def close(self) -> None:
        """End the child: shut the socket down (closing it would leave the reader thread's pending
        read holding it open), as the replica's own end does."""
        self.closing = True
        try:
            with socket.socket(fileno=os.dup(self.conn.fileno())) as end:
                end.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reap(timeout=10)
        self.reader.join(timeout=10)
        self.conn.close()

    def _reap(self, timeout: float) -> None:
        """Wait for the child to exit, killing it past `timeout` s (a stuck exit never hides why)."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _send(self, message) -> None:
        with self.send_lock:
            try:
                self.conn.send(message)
            except OSError:  # the child is gone: the reader fails what is open
                pass

    # ---- the reader thread ------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                self._gone()
                return
            try:
                self._handle(message)
            except Exception:  # noqa: BLE001 - one message must not stop every other request's text
                logging.getLogger(__name__).exception("handling a message of the model's process failed")

    def _handle(self, message) -> None:
        kind = message[0]
        if kind == "emit":
            for number, index, delta, reason, count, tokens, error in message[1]:
                with self.lock:
                    entry = self.requests.get(number)
                    if entry is None:
                        continue
                    request, open_choices = entry
                    if reason is not None:
                        open_choices.discard(index)
                        if not open_choices:
                            del self.requests[number]
                if tokens is not None:
                    request.token_ids[index] = tokens
                if error is not None:
                    request.error = error
                request.emit(index, delta, reason, count)
        elif kind == "result":
            _, number, ok, value = message
            with self.lock:
                done = self.calls.pop(number, None)
            _settle(done, ok, value)
        elif kind == "load" and self.observe is not None:
            try:
                self.observe(*message[1:])
            except Exception:  # noqa: BLE001 - metrics must never stop the text
                logging.getLogger(__name__).exception("reporting the decoding loop's load failed; stopped")
                self.observe = None

    def _gone(self) -> None:
        code = self.process.wait()
        with self.lock:
            self.ended = (
                "the replica is shutting down"
                if self.closing
                else f"the model's process ended (exit code {code}); the replica is restarted"
            )
            requests, self.requests = list(self.requests.values()), {}
            calls, self.calls = list(self.calls.values()), {}
        if not self.closing:
            logging.getLogger(__name__).error(self.ended)
        for request, open_choices in requests:
            try:
                _fail(request, open_choices, EngineError(self.ended))
            except Exception:  # noqa: BLE001 - the replica's event loop may be closed already
                pass
        for done in calls:
            _settle(done, False, EngineError(self.ended))


def _settle(done: Future | None, ok: bool, value) -> None:
    """A call's result, unless its caller gave up on it (a cancelled future takes none)."""
    if done is None or not done.set_running_or_notify_cancel():
        return
    if ok:
        done.set_result(value)
    else:
        done.set_exception(value)


def _fail(request: Request, choices, err: Exception) -> None:
    request.error = err
    for index in sorted(choices):
        request.emit(index, "", "error", 0)


def _portable(err: BaseException) -> BaseException:
    """`err` itself where it survives pickling, else a RuntimeError naming it."""
    try:
        return pickle.loads(pickle.dumps(err))
    except Exception:  # noqa: BLE001 - exceptions whose __init__ takes other arguments than their args
        return RuntimeError(f"{type(err).__name__}: {err}")


# ---- the child ------------------------------------------------------------------------------
def main() -> None:
    """The child's entry: the socket from RAYLM_ENGINE_FD, the spec first."""
    from multiprocessing.connection import Connection

    from raylm.methods.hf_peft import silence_peft
    from raylm.runtime import startup_gc

    silence_peft()  # adapters load on the decoding thread while another thread generates
    conn = Connection(int(os.environ.pop("RAYLM_ENGINE_FD")))
    threading.Thread(
        target=_exit_with_replica, args=(conn.fileno(),), name="raylm-watchdog", daemon=True
    ).start()
    try:
        model = _Model(conn.recv(), conn)
    except BaseException as err:  # noqa: BLE001 - the replica reports it
        logging.getLogger(__name__).exception("loading the served model failed")
        conn.send(("failed", _portable(err)))
        return
    startup_gc.after_startup()  # loaded: Python's collection thresholds while requests are served
    model.serve()


def _exit_with_replica(fd: int) -> None:
    """End this process once the replica's end of the socket is gone, whatever the process is doing
    (loading a model for minutes, compiling): an orphan would hold memory the replica's successor needs."""
    import select

    watch = select.poll()
    watch.register(fd, select.POLLRDHUP)  # (hang-ups and errors are reported whatever is asked)
    while True:
        for _, events in watch.poll():
            if events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL):
                os._exit(0)


class _Model:
    """The child's side: the model, its decoding loop, and the requests it decodes."""

    def __init__(self, spec: dict, conn):
        import torch

        from raylm.infer.loading import load_for_generation
        from raylm.infer.sampling import context_length
        from raylm.serve.compiled import warm_up
        from raylm.serve.continuous import DecodeLoop, default_cache_budget
        from raylm.serve.engine import Engine
        from raylm.spec.generation import GenerationSpec
        from raylm.spec.serve import ServeJob

        job = ServeJob.model_validate(spec)
        device = "cuda" if job.scaling.gpus_per_replica > 0 and torch.cuda.is_available() else "cpu"
        model, tokenizer, _ = load_for_generation(job.model.path, job.model.base, device, job.model.dtype)
        self.conn = conn
        self.engine = Engine(model, tokenizer)
        self.requests: dict[int, tuple[Request, set[int]]] = {}  # id -> (request, its open choices)
        self.outgoing: list = []  # messages not yet sent (text events and everything else, in order)
        self.outgoing_lock, self.wake = threading.Lock(), threading.Event()
        self.urgent = threading.Event()  # something queued must go now
        threading.Thread(target=self._flush, name="raylm-engine-sender", daemon=True).start()
        budget = job.batching.max_cached_tokens or default_cache_budget(model)
        self.decoder = DecodeLoop(
            self.engine,
            max_rows=job.batching.max_batch_size,
            observe=lambda waiting, running: self._send(("load", waiting, running), urgent=False),
            max_cached_tokens=budget,
            compiled=job.batching.compile,
        )
        warning = None
        if job.batching.compile:  # build the compiled graphs now, not under the first requests
            prompt = tokenizer("Hello")["input_ids"] or [0]
            if not warm_up(self.decoder, prompt, GenerationSpec(max_new_tokens=4)):
                warning = "batching.compile: no compiled step ran while the replica started (%s)" % (
                    "compiling failed: decoding uncompiled" if self.decoder.compiled is None
                    else "a model with adapters decodes uncompiled" if hasattr(model, "peft_config")
                    else "the warm-up ended at once: the graphs are built under the first requests"
                )  # fmt: skip
        self._send(
            (
                "ready",
                {
                    "tokenizer": tokenizer,
                    "context": context_length(model),
                    "vocabulary": model.get_input_embeddings().num_embeddings,
                    "cache_budget": budget,
                    "warning": warning,
                },
            )
        )

    def serve(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the replica is gone
                os._exit(0)
            try:
                self._handle(message)
            except Exception as err:  # noqa: BLE001 - one bad message fails its own call, not the process
                logging.getLogger(__name__).exception("a message from the replica could not be handled")
                if message[0] == "call":
                    self._send(("result", message[1], False, _portable(err)))

    def _handle(self, message) -> None:
        kind = message[0]
        if kind == "submit":
            batch = []
            for number, prompt_ids, controls, adapter in message[1]:
                request = Request(prompt_ids, controls, emit=self._emitter(number), adapter=adapter)
                self.requests[number] = (request, set(range(controls.n)))
                batch.append(request)
            self.decoder.submit(batch)
        elif kind == "cancel":
            entry = self.requests.get(message[1])
            if entry is not None:
                entry[0].cancelled = True
        elif kind == "call":
            _, number, operation, args = message
            fn, changes_model = self.operation(operation, args)
            done = self.decoder.call(fn, changes_model=changes_model)
            done.add_done_callback(lambda d, number=number: self._answer(number, d))

    def operation(self, name: str, args: tuple):
        """(function run between steps on the model's thread, whether it changes the model)."""
        if name == "attach":
            return (lambda: self._attach(*args)), True
        if name == "score":
            return (lambda: self._score(*args)), False
        if name == "compiled_steps":
            return (lambda: self.decoder.compiled_steps), False
        raise ValueError(f"unknown operation {name!r}")

    def _attach(self, name: str, path: str, retired: list[str]) -> list[str]:
        """Load adapter `name` (from folder `path`) unless it is loaded, after deleting those of the
        `retired` ones (unloaded by the replica's multiplexer) that no request here names, waiting,
        decoding or just cancelled (its row leaves at the next step); PEFT keeps at least one. Runs on
        the loop's thread between steps. Returns the adapters deleted."""
        from peft import PeftModel

        from raylm.methods.unimported import unimported_as_absent

        model = self.engine.model
        loaded = list(getattr(model, "peft_config", {}))
        named = {request.adapter for request, _ in list(self.requests.values())}
        deleted = []
        for old in retired:
            if old in loaded and old != name and old not in named and len(loaded) > 1:
                model.delete_adapter(old)
                loaded.remove(old)
                deleted.append(old)
        if name not in loaded:
            with unimported_as_absent("gptqmodel"):  # LoRA's injection asks for GPTQ layers
                if hasattr(model, "peft_config"):
                    model.load_adapter(path, adapter_name=name)
                else:
                    try:
                        self.engine.model = PeftModel.from_pretrained(model, path, adapter_name=name)
                    except Exception:
                        _strip_adapter_layers(model)
                        raise
            self.engine.model.eval()
        return deleted

    def _score(self, tokens: list[int], start: int, top: int, adapter: str | None):
        """Token log-probabilities of `tokens` from `start` (and the `top` alternatives), under `adapter`."""
        from raylm.infer.scoring import token_logprobs
        from raylm.serve.engine import hooks_dropped_on_failure

        (name,) = self.engine.adapter_names([adapter]) or [None]
        with hooks_dropped_on_failure(self.engine.model):
            return token_logprobs(self.engine.model, self.engine.tokenizer, tokens, start, top, name)

    def _answer(self, number: int, done: Future) -> None:
        err = done.exception()
        self._send(("result", number, err is None, done.result() if err is None else _portable(err)))

    def _emitter(self, number: int):
        def emit(index, delta, reason, count):
            tokens = error = None
            entry = self.requests.get(number)
            if reason is not None and entry is not None:
                request, open_choices = entry
                tokens, error = request.token_ids.get(index), request.error
                open_choices.discard(index)
                if not open_choices:
                    self.requests.pop(number, None)
                error = _portable(error) if error is not None else None
            # a choice's first and last text go at once (time to first token, the end of a request);
            # the text between may wait GATHER_S, joined with later steps' (streams flush every 50 ms)
            urgent = reason is not None or count <= 1
            self._send(("emit", (number, index, delta, reason, count, tokens, error)), urgent)

        return emit

    def _send(self, message, urgent: bool = True) -> None:
        """Queue a message for the sender thread: the loop never waits for the socket."""
        with self.outgoing_lock:
            self.outgoing.append(message)
        self.wake.set()
        if urgent:
            self.urgent.set()

    def _flush(self) -> None:
        """Send what was queued, in order, text events of consecutive steps together, on a thread of
        its own: pickling and writing overlap the tensor operations. Text in the middle of a request
        waits up to GATHER_S for more (one message, one wake-up of this thread and of the replica's
        reader for several tokens: a single stream's steps are ~1 ms); anything else goes at once."""
        while True:
            self.wake.wait()
            self.wake.clear()
            if not self.urgent.is_set():
                self.urgent.wait(GATHER_S)
            self.urgent.clear()
            with self.outgoing_lock:
                queued, self.outgoing = self.outgoing, []
            for message in _grouped(queued):
                try:
                    self.conn.send(message)
                except OSError:  # the replica is gone
                    os._exit(0)


def _grouped(messages: list) -> list:
    """Consecutive ("emit", event) messages as one ("emit", [events])."""
    out: list = []
    for message in messages:
        if message[0] == "emit":
            if out and out[-1][0] == "emit":
                out[-1][1].append(message[1])
            else:
                out.append(("emit", [message[1]]))
        else:
            out.append(message)
    return out


def _strip_adapter_layers(model) -> None:
    """Undo a first adapter load that failed part way: PEFT injects its layers into the base model in
    place before it reads the adapter's weights, and left there (with a non-zero initialisation, or
    half-loaded weights) they would answer every request for the base model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for key, module in list(model.named_modules()):
        if key and isinstance(module, BaseTunerLayer):
            parent, _, child = key.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
