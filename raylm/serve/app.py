"""The Ray Serve deployment: a FastAPI ingress with OpenAI's routes over raylm's batched engine.

    GET  /health                 GET /v1/models
    POST /v1/completions         POST /v1/chat/completions        (stream: true for server-sent events)

Requests from different callers meet in `@serve.batch` and enter the replica's continuous-batching loop
(raylm/serve/continuous.py);
LoRA adapters over the base are loaded on demand per replica (`@serve.multiplexed`, least recently used
unloaded past the limit) and serve mixed batches. The model, its loop and every adapter load live in
a process of their own (raylm/serve/worker.py), one thread of which touches the model, so adapter
loads never race a step and the replica's HTTP work never takes the interpreter from a step.
"""

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from raylm.infer.sampling import GenerationError, check_fits
from raylm.serve.continuous import CacheBudgetError, cache_cost
from raylm.serve.engine import Request
from raylm.serve.metrics import ServerMetrics
from raylm.serve.protocol import ApiError, ChatRequest, CompletionRequest, key_digest, validation_message
from raylm.serve.worker import EngineError, EngineProcess


def build_app(job, key_hash: str | None):
    """The Serve application for a validated ServeJob."""
    scaling = job.scaling
    options = {
        "ray_actor_options": {"num_cpus": scaling.cpus_per_replica, "num_gpus": scaling.gpus_per_replica},
        "max_ongoing_requests": scaling.max_ongoing_requests,
        "max_queued_requests": scaling.max_queued_requests,
        # a replica whose model process ended is found within ~3 checks (Serve's threshold), then replaced
        "health_check_period_s": 2,
    }
    if scaling.autoscaling:
        options["autoscaling_config"] = scaling.autoscaling.model_dump()
    else:
        options["num_replicas"] = scaling.replicas
    return Server.options(**options).bind(job.model_dump(mode="json"), key_hash)


api = FastAPI(docs_url=None, redoc_url=None)
FLUSH_S = 0.05  # new text reaches callers at most this often (20 messages/s per stream)


def failure(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def unexpected(err: BaseException, doing: str | None = None) -> ApiError:
    """An error no check foresaw: 503 while the replica replaces a model process that ended (a status
    clients retry; the message says the process ended), else 500 naming the exception."""
    if isinstance(err, EngineError):
        return ApiError(503, f"{doing}: {err}" if doing else str(err))
    return ApiError(500, f"{doing or 'internal error'}: {type(err).__name__}: {err}")


class Outbox:
    """Hands events from the decoding thread to the replica's event loop: one wake-up per batch of
    events (a decoding step emits one per row), not one per event."""

    def __init__(self, loop):
        self.loop, self.items, self.lock, self.scheduled = loop, [], threading.Lock(), False

    def emitter(self, queue):
        def emit(index, delta, reason, count):
            with self.lock:
                self.items.append((queue, (index, delta, reason, count)))
                if self.scheduled:
                    return
                self.scheduled = True
            self.loop.call_soon_threadsafe(self._deliver)

        return emit

    def _deliver(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, event in items:
            queue.put_nowait(event)


class Events(asyncio.Queue):
    """One request's (choice, delta, finish, tokens) events, on the replica's event loop; `ended` is set
    once every choice has finished."""

    def __init__(self, choices: int):
        super().__init__()
        self.open, self.ended = choices, asyncio.Event()

    def put_nowait(self, event) -> None:
        super().put_nowait(event)
        if event[2] is not None:
            self.open -= 1
            if self.open <= 0:
                self.ended.set()


async def _until_flush(events: Events) -> None:
    """FLUSH_S, or less once every choice has finished: the end of a stream goes out as soon as it is
    decoded, not at the next flush (one wake-up per flush, not per token)."""
    try:
        await asyncio.wait_for(events.ended.wait(), FLUSH_S)
    except asyncio.TimeoutError:
        pass


def _nothing_generated(ids: list[int], n: int) -> dict:
    """The result of a request that only scores its prompt (max_tokens 0 with echo)."""
    return {"texts": [""] * n, "finish": ["length"] * n, "prompt_tokens": len(ids), "completion_tokens": 0,
            "token_ids": [[] for _ in range(n)]}  # fmt: skip


def _completion_logprobs(entries) -> dict:
    """OpenAI's completions shape: parallel lists, top alternatives as {token: logprob}."""
    offsets, at = [], 0
    for entry in entries:
        offsets.append(at)
        at += len(entry.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [None if e.logprob is None else dict(e.top) for e in entries],
        "text_offset": offsets,
    }


def _chat_logprobs(entries) -> list[dict]:
    """OpenAI's chat shape: one object per token with its bytes and its top alternatives."""

    def item(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return [{**item(e.token, e.logprob), "top_logprobs": [item(t, v) for t, v in e.top]} for e in entries]


def _error_event(err: ApiError) -> str:
    """An error inside a stream: OpenAI's error body as an event, then [DONE] (the client sees an
    APIError rather than a cut connection)."""
    return f"data: {json.dumps(err.body())}\n\ndata: [DONE]\n\n"


def _template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if "{" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    return value


class Adapter:
    """What the multiplexer keeps per loaded adapter; unloading it retires the adapter's weights."""

    def __init__(self, server, name: str, token: int):
        self.server, self.name, self.token = server, name, token

    def __del__(self):
        self.server._retire(self.name, self.token)


@serve.deployment(name="raylm")
@serve.ingress(api)
class Server:
    def __init__(self, spec: dict, key_hash: str | None):
        from raylm.infer.strategies import prepare
        from raylm.spec.serve import ServeJob

        self.job = ServeJob.model_validate(spec)
        self.key_hash = key_hash
        self.metrics = ServerMetrics()
        model_name = self.job.model_name
        self.engine = EngineProcess(  # loads the model in its own process (raylm/serve/worker.py)
            spec, observe=lambda waiting, running: self.metrics.load(model_name, waiting, running)
        )
        if self.engine.warning:
            logging.getLogger(__name__).warning(self.engine.warning)
        self.tokenizer, self.cache_budget = self.engine.tokenizer, self.engine.cache_budget
        self.outbox = None  # made on the replica's event loop by the first request
        self.loaded: dict[str, int] = {}  # adapter -> load token
        self.retired: set[str] = set()
        self.in_use: Counter[str] = Counter()  # adapter -> requests admitted and not yet answered

        # Serve's public pattern for a per-instance limit: multiplex a function made here (Serve finds
        # multiplexed functions among instance attributes too).
        async def load_adapter(name: str):
            return await self._load_adapter_now(name)

        limit = self.job.max_adapters_per_replica
        self._load_adapter = serve.multiplexed(max_num_models_per_replica=limit)(load_adapter)
        self.tokens = 0
        self.strategies = {s.name: (s, *prepare(s)) for s in self.job.strategies}
        self.chat_template = _template(self.job.chat_template)
        self._submit.set_max_batch_size(self.job.batching.max_batch_size)
        self._submit.set_batch_wait_timeout_s(self.job.batching.batch_wait_timeout_s)
        self.context, self.vocabulary = self.engine.context, self.engine.vocabulary

    def check_health(self):
        """Serve's health check: a replica whose model's process ended is replaced."""
        if not self.engine.alive():
            raise RuntimeError(self.engine.ended or "the model's process ended")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    # ---- routes ------------------------------------------------------------------------
    @api.get("/health")
    async def health(self):
        """Up; `compiled_steps`: decoding steps run through torch.compile (batching.compile)."""
        try:
            steps = await asyncio.wrap_future(self.engine.call("compiled_steps"))
        except Exception as err:  # noqa: BLE001 - the model's process ended: 503, saying so
            return failure(unexpected(err))
        return {"status": "ok", "model": self.job.model_name, "compiled_steps": steps}

    @api.get("/v1/models")
    async def models(self, request: HttpRequest):
        try:
            self._authorize(request)
        except ApiError as err:
            return failure(err)
        names = [self.job.model_name, *self.job.adapters]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": 0, "owned_by": "raylm"} for n in names],
        }

    @api.post("/v1/completions")
    async def completions(self, request: HttpRequest):
        return await self._answer(request, CompletionRequest, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: HttpRequest):
        return await self._answer(request, ChatRequest, chat=True)

    # ---- request handling -------------------------------------------------------------
    async def _answer(self, request, model_type, chat: bool):
        """The route's answer, counted in the metrics (streams count themselves when they end)."""
        answer = await self._answer_request(request, model_type, chat)
        if not isinstance(answer, StreamingResponse):
            usage = answer.get("usage", {}) if isinstance(answer, dict) else {}
            status = answer.status_code if isinstance(answer, JSONResponse) else 200
            model = getattr(request.state, "served_model", self.job.model_name)
            self.metrics.answered(
                model, status, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
            )
        return answer

    async def _answer_request(self, request, model_type, chat: bool):
        adapter, streaming = None, False
        try:
            self._authorize(request)
            try:
                body = model_type.model_validate(json.loads(await request.body()))
            except ValueError as err:
                errors = (
                    err.errors()
                    if isinstance(err, ValidationError)
                    else [{"type": "json_invalid", "msg": str(err)}]
                )
                message, param = validation_message(errors)
                raise ApiError(400, message, param) from None
            adapter = await self._adapter_for(body.model)
            request.state.served_model = body.model  # one of this server's names (else 404 above)
            controls = body.generation(self.job.defaults, self.job.max_tokens_limit)
            prompts = self._prompts(body, chat)
            scoring = getattr(body, "scores_only", False)
            for ids in prompts:
                self._check_length(ids, controls, scoring)
            deadline = self.job.http.request_timeout_s
            if body.strategy is not None:
                return await asyncio.wait_for(
                    self._strategy(body, prompts, controls, adapter, chat), deadline
                )
            if body.stream:
                if len(prompts) > 1:
                    raise ApiError(400, "stream one prompt per request", "prompt")
                streaming = True  # the stream releases the adapter when it ends
                return StreamingResponse(
                    self._events(body, prompts[0], controls, adapter, chat, deadline),
                    media_type="text/event-stream",
                )
            top, echo = body.logprob_settings()
            if scoring:
                results = [_nothing_generated(ids, controls.n) for ids in prompts]
            else:
                results = await asyncio.wait_for(
                    asyncio.gather(*[self._collect(ids, controls, adapter) for ids in prompts]), deadline
                )
            if top is not None or echo:
                await asyncio.wait_for(self._logprobs(results, prompts, top, echo, adapter), deadline)
            return self._response(body, results, controls, chat, prompts if echo else None)
        except ApiError as err:
            return failure(err)
        except asyncio.TimeoutError:
            return failure(
                ApiError(
                    408,
                    f"no answer within {self.job.http.request_timeout_s:g} s (http.request_timeout_s)",
                )
            )
        except Exception as err:  # noqa: BLE001 - a caller gets an OpenAI error body, never a cut connection
            return failure(unexpected(err))
        finally:
            if not streaming:
                self._release(adapter)

    def _authorize(self, request) -> None:
        if self.key_hash is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise ApiError(401, "missing API key: send Authorization: Bearer KEY", code="invalid_api_key")
        if not hmac.compare_digest(key_digest(key.strip()), self.key_hash):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    async def _adapter_for(self, name: str) -> str | None:
        if name == self.job.model_name:
            return None
        if name not in self.job.adapters:
            raise ApiError(
                404,
                f"model {name!r} does not exist here; models: {', '.join([self.job.model_name, *self.job.adapters])}",
                "model",
                "model_not_found",
            )
        self._hold(name)  # in use from now until the answer ends: never unloaded under a request
        try:
            await self._load_adapter(name)
        except BaseException as err:
            self._release(name)
            if isinstance(err, Exception) and not isinstance(err, ApiError):
                raise unexpected(err, f"adapter {name!r} could not be loaded") from err
            raise
        return name

    def _hold(self, adapter: str | None) -> None:
        if adapter is not None:
            self.in_use[adapter] += 1

    def _release(self, adapter: str | None) -> None:
        if adapter is not None:
            self.in_use[adapter] -= 1

    async def _load_adapter_now(self, name: str):
        """What Serve's multiplexer calls (self._load_adapter, made in __init__ with the spec's limit)."""
        from raylm.runtime.storage import fetch_artifact

        loop = asyncio.get_running_loop()
        # an adapter named by a storage URI is fetched here, off the model's thread (streams go on)
        folder = await asyncio.to_thread(fetch_artifact, self.job.adapters[name])
        # the retired adapters no request holds (admitted here, or still named by a row in the model's
        # process, which checks that itself) go as this one loads; the model's process runs the calls
        # in order, so a request for one of them admitted after this list was made loads it again
        self.retired.discard(name)
        busy = {adapter for adapter, count in self.in_use.items() if count}
        retired = sorted(self.retired - busy)
        attach = asyncio.wrap_future(self.engine.call("attach", name, folder, retired), loop=loop)
        given_up = []  # the caller left before the load ended: no Adapter will hold it
        attach.add_done_callback(lambda done: self._attached(name, done, given_up))
        try:
            await asyncio.shield(attach)  # the load ends, and is recorded, even if the caller leaves
        except asyncio.CancelledError:
            given_up.append(True)
            if attach.done() and not attach.cancelled() and attach.exception() is None:
                self.retired.add(name)  # recorded already: the next load may unload it
            raise
        return Adapter(self, name, self.loaded[name])

    def _attached(self, name: str, done: asyncio.Future, given_up: list) -> None:
        """Record an adapter load that ended (on the event loop, whether or not its caller waited)."""
        if done.cancelled() or done.exception() is not None:
            return
        for old in done.result():
            self.loaded.pop(old, None)
            self.retired.discard(old)
        self.tokens += 1
        self.loaded[name] = self.tokens
        if given_up:
            self.retired.add(name)

    def _retire(self, name: str, token: int) -> None:
        if self.loaded.get(name) == token:
            self.retired.add(name)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # the spec's values are set per replica
    async def _submit(self, jobs: list[Request]) -> list[Events]:
        """Requests that arrived together enter the decoding loop together (one prefill); each gets
        the queue its text arrives on. Returns at once: the loop admits later batches between steps."""
        if self.outbox is None:
            self.outbox = Outbox(asyncio.get_running_loop())
        queues = []
        for job_ in jobs:
            queues.append(Events(job_.controls.n))
            job_.emit = self.outbox.emitter(queues[-1])
        self.engine.submit(jobs)
        return queues

    async def _stream(self, job_: Request):
        """Lists of (choice, delta, finish, tokens) for one request, merged per choice, one list per
        flush: the first text at once, then every FLUSH_S rather than every token, which keeps the
        per-message cost of streaming through Serve's proxy off the decoding path, and the last as soon
        as every choice has finished."""
        controls = job_.controls
        arrived, first_token = time.monotonic(), {}
        try:
            events = await self._submit(job_)
            remaining, first = controls.n, True
            while remaining:
                pending = [await events.get()]
                self._time(job_, pending, arrived, first_token)
                timed = 1
                if not first and not events.ended.is_set():  # the first text goes out at once
                    await _until_flush(events)
                first = False
                while not events.empty():
                    pending.append(events.get_nowait())
                self._time(job_, pending[timed:], arrived, first_token)
                merged: dict[int, tuple] = {}
                for index, delta, reason, count in pending:
                    text = merged.get(index, (index, "", None, 0))[1]
                    merged[index] = (index, text + delta, reason, count)
                    if reason == "error":
                        raise unexpected(job_.error, "generation failed")
                    if reason is not None:
                        remaining -= 1
                yield list(merged.values())
        finally:
            self.engine.cancel(job_)  # the caller left (timeout, disconnect): its rows stop at the next step

    def _time(self, job_: Request, events, arrived: float, first_token: dict) -> None:
        """Time to first token (per request) and per output token (per choice, at its end)."""
        now, model = time.monotonic(), job_.adapter or self.job.model_name
        for index, _, reason, count in events:
            if count and index not in first_token:
                first_token[index] = now
                if len(first_token) == 1:
                    self.metrics.timings(model, now - arrived, None)
            if reason is not None and count > 1 and index in first_token:
                self.metrics.timings(model, None, (now - first_token[index]) / (count - 1))

    async def _collect(self, ids, controls, adapter) -> dict:
        texts = [""] * controls.n
        finish, tokens = [None] * controls.n, [0] * controls.n
        job_ = Request(ids, controls, emit=None, adapter=adapter)
        async for events in self._stream(job_):
            for index, delta, reason, count in events:
                texts[index] += delta
                if reason is not None:
                    finish[index], tokens[index] = reason, count
        return {
            "texts": texts,
            "finish": finish,
            "prompt_tokens": len(ids),
            "completion_tokens": sum(tokens),
            "token_ids": [job_.token_ids.get(i, []) for i in range(controls.n)],
        }

    async def _logprobs(self, results: list[dict], prompts, top: int | None, echo: bool, adapter) -> None:
        """Each choice's token logprobs (and the prompt's, with echo): one forward pass per choice over
        prompt + completion on the model's thread, under the choice's own adapter."""
        loop = asyncio.get_running_loop()
        for result, ids in zip(results, prompts, strict=True):
            result["logprobs"] = []
            for completion in result["token_ids"]:
                start = 0 if echo else len(ids)
                scored = self.engine.call("score", ids + completion, start, top or 0, adapter)
                result["logprobs"].append(await asyncio.wrap_future(scored, loop=loop))

    def _prompts(self, body, chat: bool) -> list[list[int]]:
        if chat:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            template = self.tokenizer.chat_template or self.chat_template
            if template is None:
                raise ApiError(
                    400,
                    "this model's tokenizer has no chat template: use /v1/completions, or set "
                    "chat_template in the serve spec",
                    "messages",
                )
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=template, add_generation_prompt=True, tokenize=False
            )
            return [self.tokenizer(text, add_special_tokens=False)["input_ids"]]
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            prompt = [prompt]  # one prompt of token ids
        if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            for ids in prompt:
                bad = [t for t in ids if not 0 <= t < self.vocabulary]
                if bad:  # on a GPU an out-of-range id is a device-side assert that takes the replica down
                    raise ApiError(
                        400,
                        f"prompt: token id {bad[0]} is outside this model's vocabulary [0, {self.vocabulary})",
                        "prompt",
                    )
                if not ids:
                    raise ApiError(400, "prompt: an empty list of token ids", "prompt")
            return [list(ids) for ids in prompt]
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not texts:
            raise ApiError(400, "prompt: empty list", "prompt")
        return [self.tokenizer(t)["input_ids"] for t in texts]

    def _check_length(self, ids: list[int], controls, scoring: bool = False) -> None:
        if scoring:  # max_tokens 0: one forward pass over the prompt, no cache kept
            if self.context is not None and len(ids) > self.context:
                raise ApiError(
                    400,
                    f"the prompt ({len(ids)} tokens) exceeds the model's context of {self.context} tokens",
                    "prompt",
                    "context_length_exceeded",
                )
            return
        try:
            check_fits(len(ids), controls, self.context, field="max_tokens")
        except GenerationError as err:
            raise ApiError(400, str(err), "max_tokens", "context_length_exceeded") from None
        needed = cache_cost([Request(ids, controls, emit=None)])
        if needed > self.cache_budget:  # could never be admitted: say so now rather than time out
            raise ApiError(400, str(CacheBudgetError(needed, self.cache_budget)), "max_tokens")

    def _response(self, body, results: list[dict], controls, chat: bool, echoed=None) -> dict:
        choices = []
        for number, result in enumerate(results):
            scored = result.get("logprobs") or [None] * len(result["texts"])
            for text, reason, entries in zip(result["texts"], result["finish"], scored, strict=True):
                index = len(choices)
                if chat:
                    message = {"role": "assistant", "content": text}
                    choice = {"index": index, "message": message, "finish_reason": reason}
                    choice["logprobs"] = None if entries is None else {"content": _chat_logprobs(entries)}
                else:
                    if echoed is not None:
                        text = self.tokenizer.decode(echoed[number], skip_special_tokens=True) + text
                    logprobs = None if entries is None else _completion_logprobs(entries)
                    choice = {"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs}
                choices.append(choice)
        usage = {
            "prompt_tokens": sum(r["prompt_tokens"] for r in results),
            "completion_tokens": sum(r["completion_tokens"] for r in results),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": choices,
            "usage": usage,
        }

    async def _events(self, body, ids, controls, adapter, chat: bool, deadline: float):
        """The stream of one request; the adapter it holds is released however the stream ends."""
        usage = {"status": 200, "completion": 0}
        try:
            async for event in self._server_sent_events(body, ids, controls, adapter, chat, deadline, usage):
                yield event
        finally:
            self._release(adapter)
            self.metrics.answered(body.model, usage["status"], len(ids), usage["completion"])

    async def _server_sent_events(
        self, body, ids, controls, adapter, chat: bool, deadline: float, usage: dict
    ):
        """Server-sent events: a chunk per piece of text, the finish reasons, usage if asked, [DONE]."""
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created, kind = int(time.time()), "chat.completion.chunk" if chat else "text_completion"

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(choices, usage=None) -> str:
            data = {
                "id": ident,
                "object": kind,
                "created": created,
                "model": body.model,
                "choices": choices,
            }
            if include_usage:  # OpenAI's shape: null on every chunk before the usage chunk
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        def piece(index, delta, reason) -> dict:
            if chat:
                return {"index": index, "delta": {"content": delta} if delta else {}, "finish_reason": reason}
            return {"index": index, "text": delta, "finish_reason": reason, "logprobs": None}

        if chat:
            yield chunk(
                [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    for i in range(controls.n)
                ]
            )
        completion = 0
        events = self._stream(Request(ids, controls, emit=None, adapter=adapter))
        end = asyncio.get_running_loop().time() + deadline
        try:
            while True:
                try:
                    left = end - asyncio.get_running_loop().time()
                    batch = await asyncio.wait_for(events.__anext__(), max(left, 0))
                except StopAsyncIteration:
                    break
                pieces = []
                for index, delta, reason, count in batch:
                    if delta:
                        pieces.append(chunk([piece(index, delta, None)]))
                    if reason is not None:  # the finish reason in its own chunk, with an empty delta
                        completion += count
                        usage["completion"] = completion
                        pieces.append(chunk([piece(index, "", reason)]))
                if pieces:
                    yield "".join(pieces)  # one HTTP message per flush
        except asyncio.TimeoutError:
            usage["status"] = 408
            yield _error_event(ApiError(408, f"no answer within {deadline:g} s (http.request_timeout_s)"))
            return
        except ApiError as err:
            usage["status"] = err.status
            yield _error_event(err)
            return
        except Exception as err:  # noqa: BLE001 - an error event and [DONE], never a cut connection
            error = unexpected(err)
            usage["status"] = error.status
            yield _error_event(error)
            return
        finally:
            await events.aclose()
        if include_usage:
            totals = {
                "prompt_tokens": len(ids),
                "completion_tokens": completion,
                "total_tokens": len(ids) + completion,
            }
            yield chunk([], totals)
        yield "data: [DONE]\n\n"

    async def _strategy(self, body, prompts, controls, adapter, chat: bool):
        from raylm.infer import strategies

        if body.stream or len(prompts) > 1 or controls.n > 1 or body.logprob_settings() != (None, False):
            raise ApiError(
                400, "strategy: one prompt, one choice, no streaming, no logprobs or echo", "strategy"
            )
        if body.strategy not in self.strategies:
            offered = ", ".join(self.strategies) or "none (set strategies: in the serve spec)"
            raise ApiError(
                400, f"strategy {body.strategy!r} is not offered here; offered: {offered}", "strategy"
            )
        spec, exemplars, tools = self.strategies[body.strategy]
        question = (
            body.messages[-1].text() if chat else self.tokenizer.decode(prompts[0], skip_special_tokens=True)
        )
        loop = asyncio.get_running_loop()

        def complete(prompt: str, stop: list[str]) -> str:
            chosen = strategies.step_controls(controls, stop)
            ids = self.tokenizer(prompt)["input_ids"]
            self._check_length(ids, chosen)
            result = asyncio.run_coroutine_threadsafe(self._collect(ids, chosen, adapter), loop).result()
            return result["texts"][0]

        try:
            outcome = await asyncio.to_thread(strategies.run, spec, question, complete, exemplars, tools)
        except ApiError as err:
            if err.status >= 500:  # the server's failure, not the strategy's: the client retries it
                raise
            outcome = strategies.Outcome(None, "", err.message)
        answer = {
            "texts": [outcome.answer or ""],
            "finish": ["stop"],
            "prompt_tokens": len(prompts[0]),
            "completion_tokens": 0,
        }
        response = self._response(body, [answer], controls, chat)
        response["strategy"] = {"name": spec.name, **outcome.as_dict()}
        return response
