"""The server's metrics, through Ray Serve's metrics API (they appear on every Ray node's Prometheus
endpoint, `ray start --metrics-export-port`, prefixed `ray_` and tagged with Serve's application,
deployment and replica, plus `model`):

    ray_raylm_requests_total{model, status}           requests answered, by HTTP status
    ray_raylm_prompt_tokens_total{model}              prompt tokens of answered requests
    ray_raylm_completion_tokens_total{model}          tokens generated
    ray_raylm_time_to_first_token_seconds{model}      histogram: arrival to first token
    ray_raylm_time_per_output_token_seconds{model}    histogram: per token after the first, per choice
    ray_raylm_queue_length{model}                     gauge: requests waiting for a decoding slot
    ray_raylm_running_batch_size{model}               gauge: sequences decoding together

`model` is the model name a request asked for (the served model or one of its adapters).
"""

from __future__ import annotations

import functools
import logging

LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


def _never_fails(method):
    """Recording a metric must never fail a request: a failure is logged once, then ignored."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            method(self, *args, **kwargs)
        except Exception:  # noqa: BLE001
            if not self.failed:
                logging.getLogger(__name__).exception("recording a server metric failed")
            self.failed = True

    return guarded


class ServerMetrics:
    def __init__(self):
        from ray.serve import metrics

        self.failed = False
        self.requests = metrics.Counter(
            "raylm_requests", description="Requests answered, by HTTP status.", tag_keys=("model", "status")
        )
        self.prompt_tokens = metrics.Counter(
            "raylm_prompt_tokens", description="Prompt tokens of answered requests.", tag_keys=("model",)
        )
        self.completion_tokens = metrics.Counter(
            "raylm_completion_tokens", description="Tokens generated.", tag_keys=("model",)
        )
        self.first_token = metrics.Histogram(
            "raylm_time_to_first_token_seconds",
            description="Seconds from a request's arrival to its first generated token.",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("model",),
        )
        self.per_token = metrics.Histogram(
            "raylm_time_per_output_token_seconds",
            description="Seconds per generated token after the first, per choice.",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("model",),
        )
        self.queue = metrics.Gauge(
            "raylm_queue_length", description="Requests waiting for a decoding slot.", tag_keys=("model",)
        )
        self.batch = metrics.Gauge(
            "raylm_running_batch_size", description="Sequences decoding together.", tag_keys=("model",)
        )

    @_never_fails
    def answered(self, model: str, status: int, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        self.requests.inc(tags={"model": model, "status": str(status)})
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens, tags={"model": model})
        if completion_tokens:
            self.completion_tokens.inc(completion_tokens, tags={"model": model})

    @_never_fails
    def timings(self, model: str, first_token_s: float | None, per_token_s: float | None) -> None:
        if first_token_s is not None:
            self.first_token.observe(first_token_s, tags={"model": model})
        if per_token_s is not None:
            self.per_token.observe(per_token_s, tags={"model": model})

    @_never_fails
    def load(self, model: str, waiting: int, running: int) -> None:
        self.queue.set(waiting, tags={"model": model})
        self.batch.set(running, tags={"model": model})
