"""The OpenAI request bodies the server accepts, their mapping onto raylm's generation controls, and
OpenAI-style error bodies.

OpenAI's names where they exist (max_tokens, temperature, top_p, n, stop, seed, stream); raylm's
extensions beside them (top_k, min_p, repetition_penalty, num_beams, length_penalty, strategy). A field
a request leaves out takes the deployment's `defaults:`.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raylm.spec.generation import GenerationSpec


def key_digest(key: str) -> str:
    """Servers hold a digest of the API key, never the key (Serve records a deployment's init args)."""
    return hashlib.sha256(key.encode()).hexdigest()


class ApiError(Exception):
    """An answer with an HTTP status and an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "invalid_request_error", 408: "timeout_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class Controls(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=0)  # 0: score the prompt only (completions with echo)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None
    # OpenAI fields raylm does not implement: accepted only at their neutral value
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # raylm's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    num_beams: int | None = None
    length_penalty: float | None = None
    strategy: str | None = None

    def generation(self, defaults: GenerationSpec, max_tokens_limit: int) -> GenerationSpec:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ApiError(
                    400, f"{name} is not supported; use repetition_penalty (raylm's extension)", name
                )
        given = {
            "max_new_tokens": self.max_completion_tokens or self.max_tokens or None,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "n": self.n,
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
            "seed": self.seed,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "num_beams": self.num_beams,
            "length_penalty": self.length_penalty,
        }
        merged = {**defaults.model_dump(), **{k: v for k, v in given.items() if v is not None}}
        if self.top_p == 1.0 and not merged["temperature"]:
            merged["top_p"] = None  # clients send top_p 1 (no-op) by default, also with greedy decoding
        if merged["max_new_tokens"] > max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens {merged['max_new_tokens']} is above this server's limit of {max_tokens_limit}",
                "max_tokens",
            )
        try:
            return GenerationSpec.model_validate(merged)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "request"
            where = {"max_new_tokens": "max_tokens"}.get(where, where)
            raise ApiError(400, f"{where}: {first['msg'].removeprefix('Value error, ')}", where) from None

    @property
    def scores_only(self) -> bool:
        """max_tokens 0: the prompt's logprobs, no generation (evaluation clients' log-likelihood)."""
        return self.max_tokens == 0

    def logprob_settings(self) -> tuple[int | None, bool]:
        """(how many top alternatives per token, or None for no logprobs; whether the prompt is echoed)."""
        return None, False

    def check_logprobs(self) -> None:
        top, echo = self.logprob_settings()
        if self.stream and (top is not None or echo):
            raise ApiError(400, "logprobs and echo are not supported with stream: true", "stream")
        if self.scores_only and not echo:
            raise ApiError(400, "max_tokens: 0 scores the prompt: send echo: true with it", "max_tokens")
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"logprobs: between 0 and {MAX_TOP_LOGPROBS}", "logprobs")


MAX_TOP_LOGPROBS = 20


class CompletionRequest(Controls):
    prompt: str | list[str] | list[int] | list[list[int]]  # OpenAI's four forms
    logprobs: int | None = None  # top alternatives per token (OpenAI's completions: an integer)
    echo: bool = False  # the prompt before the completion, with its tokens' logprobs
    # OpenAI fields this server does not implement: refused unless neutral, never silently ignored
    suffix: str | None = None
    best_of: int | None = None

    def logprob_settings(self) -> tuple[int | None, bool]:
        return self.logprobs, self.echo

    def generation(self, defaults: GenerationSpec, max_tokens_limit: int) -> GenerationSpec:
        if self.suffix:
            raise ApiError(400, "suffix (insertion) is not supported by this server", "suffix")
        self.check_logprobs()
        controls = super().generation(defaults, max_tokens_limit)
        if self.best_of is not None and self.best_of != controls.n:
            raise ApiError(
                400, f"best_of {self.best_of} is not supported (only best_of = n); use num_beams", "best_of"
            )
        return controls


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}]
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(Controls):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = None

    def logprob_settings(self) -> tuple[int | None, bool]:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None, False

    def generation(self, defaults: GenerationSpec, max_tokens_limit: int) -> GenerationSpec:
        if self.max_tokens == 0:
            raise ApiError(400, "max_tokens: at least 1 for chat", "max_tokens")
        self.check_logprobs()
        return super().generation(defaults, max_tokens_limit)


# OpenAI request fields this server does not implement (refused by name, never silently ignored).
OPENAI_UNSUPPORTED = {
    "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "response_format",
    "logit_bias", "modalities", "audio", "prediction", "store", "metadata",
    "service_tier", "reasoning_effort", "web_search_options",
}  # fmt: skip


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """FastAPI's validation errors -> (message, param) naming the first bad field."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('msg')}", None
    if first.get("type") == "missing":
        return f"{param}: required field is missing", param
    if first.get("type") == "extra_forbidden":
        if param in OPENAI_UNSUPPORTED:
            return f"{param}: OpenAI's {param} is not supported by this server", param
        return f"{param}: unknown field", param
    return f"{param or 'body'}: {first.get('msg')}", param
