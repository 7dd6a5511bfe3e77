"""A running OpenAI-compatible server as a model of `kind: evaluate`: the same measures on the same token
ids, the forward passes replaced by requests to its completions API.

    endpoint = Endpoint(entry.endpoint)
    nll, tokens = endpoint.cross_entropy(blocks)

Token-id prompts and `echo` with `max_tokens: 0` (the prompt's log-probabilities, as evaluation clients
use them) are what raylm's server and vLLM answer; the endpoint's tokenizer (`endpoint.tokenizer`) packs
the text and encodes the prompts, so the numbers compare with a local evaluation of the same model.
"""

from __future__ import annotations

from pathlib import Path

from raylm.data.sft import IGNORE
from raylm.runtime.secrets import ApiKeyError, read_api_key


class EndpointError(RuntimeError):
    """The endpoint refused or failed a request; the message names the endpoint and what it said."""


def api_key(spec) -> str | None:
    """The key from endpoint.api_key_file or the endpoint.api_key_env variable (never from the spec)."""
    return read_api_key(spec.api_key_file, spec.api_key_env, "endpoint.api_key_file")


def problems(spec, where: str) -> list[tuple[str, str]]:
    """The server answers its /models with this model (and accepts the key); the tokenizer is here."""
    import requests

    found = []
    tokenizer = Path(spec.tokenizer).expanduser()
    if "://" not in spec.tokenizer and not tokenizer.exists():
        found.append((f"{where}.endpoint.tokenizer", f"{spec.tokenizer} does not exist"))
    try:
        key = api_key(spec)
    except ApiKeyError as err:
        return [*found, (f"{where}.endpoint.api_key_file", str(err))]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = spec.url.rstrip("/") + "/models"
    try:
        answer = requests.get(url, headers=headers, timeout=min(10.0, spec.timeout_s))
    except requests.RequestException as err:
        return [*found, (f"{where}.endpoint.url", f"cannot reach {shown(url)}: {type(err).__name__}")]
    if answer.status_code in (401, 403):
        why = f"{shown(url)} refused the key (HTTP {answer.status_code}): set {spec.api_key_env} or api_key_file"
        return [*found, (f"{where}.endpoint", why)]
    if answer.status_code != 200:
        return [*found, (f"{where}.endpoint.url", f"{shown(url)} answered HTTP {answer.status_code}")]
    try:
        names = [m.get("id") for m in answer.json().get("data", [])]
    except (ValueError, AttributeError, TypeError):
        return [*found, (f"{where}.endpoint.url", f"{shown(url)} is not an OpenAI-compatible /models answer")]
    if spec.model not in names:
        served = ", ".join(map(str, names)) or "no model"
        found.append((f"{where}.endpoint.model", f"{shown(url)} serves {served}, not {spec.model!r}"))
    return found


def shown(url: str) -> str:
    """A URL without any user:password in it (for logs, errors and results)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))


class Endpoint:
    def __init__(self, spec):
        self.spec = spec
        self.url = spec.url.rstrip("/") + "/completions"
        key = api_key(spec)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def complete(self, body: dict) -> dict:
        import requests

        try:
            answer = requests.post(
                self.url,
                json={"model": self.spec.model, **body},
                headers=self.headers,
                timeout=self.spec.timeout_s,
            )
        except requests.RequestException as err:
            raise EndpointError(f"{shown(self.url)}: {type(err).__name__}") from None
        if answer.status_code != 200:
            raise EndpointError(f"{shown(self.url)} answered {answer.status_code}: {answer.text[:500]}")
        try:
            return answer.json()["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise EndpointError(f"{shown(self.url)} gave no completion choice: {answer.text[:300]}") from None

    def prompt_logprobs(self, ids: list[int]) -> list[float | None]:
        """log p(token t | tokens before t) for every token of `ids` (None for the first)."""
        choice = self.complete(
            {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0}
        )
        found = (choice.get("logprobs") or {}).get("token_logprobs")
        if (
            not isinstance(found, list)
            or len(found) < len(ids)
            or any(lp is None for lp in found[1 : len(ids)])
        ):
            raise EndpointError(
                f"{shown(self.url)} does not give the prompt's log-probabilities for all {len(ids)} tokens "
                "(echo + logprobs with max_tokens 0, token-id prompts): perplexity and choice tasks need them"
            )
        return found[: len(ids)]

    def cross_entropy(self, blocks: list[list[int]]) -> tuple[float, int]:
        """As raylm.compress.measure.cross_entropy: the mean next-token cross-entropy over every
        predicted token of `blocks`, and how many."""
        total, count = 0.0, 0
        for block in blocks:
            logprobs = self.prompt_logprobs(block)[1:]
            total -= sum(logprobs)
            count += len(logprobs)
        return total / count, count

    def greedy_answers(self, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        """Greedy continuations of token-id prompts, up to EOS (the server stops there)."""
        answers = []
        for prompt in prompts:
            choice = self.complete({"prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0})
            answers.append(str(choice.get("text", "")))
        return answers

    def pick_choice(self, tokenizer, prompt: str, options: list[str], spec) -> int:
        """As raylm.evaluate.measure.pick_choice: the option whose labelled tokens have the largest mean
        log-probability, each option encoded as fine-tuning encodes it."""
        from raylm.data.sft import encode

        scores = []
        for option in options:
            ids, labels = encode(prompt, option, tokenizer, spec)
            logprobs = self.prompt_logprobs(ids)
            picked = [lp for t, lp in enumerate(logprobs) if t > 0 and labels[t] != IGNORE]
            scores.append(sum(picked) / max(1, len(picked)))
        return max(range(len(scores)), key=scores.__getitem__)
