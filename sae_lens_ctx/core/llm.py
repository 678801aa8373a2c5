"""The LLM protocol, the backend registry, request keys and prices: what every LLM client shares.

Protocol (after delphi's ``Client.generate``)::

    client.generate(messages, **params) -> Response(text, logprobs, prompt_tokens, completion_tokens)

`params` are OpenAI chat parameters: ``max_tokens``, ``temperature``, ``top_p``, ``top_logprobs``
(an int: how many alternatives per generated token; 0 or absent = no logprobs), ``stop``, ``seed``.
A backend raises `LLMError(reason, transient)` for a failed call.

Optionally, a backend that answers many requests in one pass has ``batchable(params) -> bool`` and
``generate_batch(requests, params, workers) -> list[Response | LLMError]`` (answers in request order, a
failure in its request's place); the call layer then hands it whole lists of such requests (the embedded
model: one-token greedy judge calls, `clients.token_batches`).

Optionally, a backend that scores a text prompt has ``prompt_logprobs(prompts, top_logprobs, from_offsets)
-> list[PromptLogprobs | LLMError]``: for each text prompt (no chat template), its tokens as strings, their
character offsets and, at every position from ``from_offset`` on, the ``top_logprobs`` most likely tokens
there (the fields of an OpenAI completions ``logprobs`` object, which neuron-explainer's all-at-once
simulator reads). In-process models compute it in one forward; OpenAI-compatible servers through
``/v1/completions`` with ``echo``, ``max_tokens: 0`` and ``logprobs`` (as vLLM serves it). A backend without
it, or a server that refuses it, leaves the simulator a fallback tier (`stages/score/simulation.py`).

The registry (SAE-Lens style: explicit, duplicates refused) names the built-in backends here, so that a
config can be checked without importing any client; their factories are attached by `sae_lens_ctx.clients`
when it is imported (the run engine and the apps import it). `register_backend` adds a user's backend.
The clients themselves (OpenAI SDK, llama-cpp, the cached call layer) live in `sae_lens_ctx.clients`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from .errors import UserError, did_you_mean

Message = dict[str, str]


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token, its log-probability, and the top alternatives at its position."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Response:
    """What a backend returns for one call."""

    text: str
    logprobs: list[TokenLogprob] | None = None
    """Per generated token, when asked (`top_logprobs`) and the backend has them; else None."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    """'stop' or 'length' (cut off at max_tokens)."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Response:
        lps = data.get("logprobs")
        if lps is not None:
            lps = [TokenLogprob(t["token"], t["logprob"], [tuple(a) for a in t.get("top", [])]) for t in lps]
        return cls(text=data["text"], logprobs=lps, prompt_tokens=data.get("prompt_tokens", 0),
                   completion_tokens=data.get("completion_tokens", 0), finish_reason=data.get("finish_reason"))


@dataclass(frozen=True)
class PromptLogprobs:
    """A text prompt scored token by token: the fields of an OpenAI completions `logprobs` object.

    Position i holds the prompt's i-th token; its `token_logprobs[i]` and `top_logprobs[i]` are the
    model's log-probabilities at that position given the tokens before it (natural log). Position 0, and
    every position before the first one asked for (`from_offset`), holds None: nothing predicts them here.
    """

    tokens: list[str]
    """The prompt's tokens as text (the tokenizer's pieces, decoded one by one)."""
    text_offset: list[int]
    """Character offset in the prompt of each token's first character."""
    token_logprobs: list[float | None]
    """Log-probability of each prompt token at its position."""
    top_logprobs: list[dict[str, float] | None]
    """The most likely tokens at each position and their log-probabilities."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> PromptLogprobs:
        return cls(list(data["tokens"]), [int(x) for x in data["text_offset"]], list(data["token_logprobs"]),
                   [None if t is None else dict(t) for t in data["top_logprobs"]])


class LLMError(Exception):
    """A failed call: a short `reason` code ('rate_limited', 'server_error', 'timeout', 'connection',
    'malformed_response', 'empty_completion', 'context_too_long', 'not_found', 'auth',
    'bad_request', ...), whether it is worth retrying, and whether the SDK already retried it."""

    def __init__(self, reason: str, message: str = "", *, transient: bool = False, retried: bool = False):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.transient = transient
        self.retried = retried


class Client(Protocol):
    """An LLM backend."""

    backend: str
    """Registered backend name."""
    model: str
    """Model as recorded (and as sent to the server)."""

    def generate(self, messages: Sequence[Message], **params: Any) -> Response: ...


BUILTIN_BACKENDS = ("embedded", "llama-cpp", "openai", "openai-compatible")
"""The backends this package ships (their clients are in `sae_lens_ctx.clients`)."""

BACKENDS: dict[str, Callable[[Any], Client] | None] = dict.fromkeys(BUILTIN_BACKENDS)
"""Backend factories by name: `factory(explain_config: ExplainConfig) -> Client`; None until `sae_lens_ctx.clients` is imported."""


def register_backend(name: str, factory: Callable[[Any], Client]) -> None:
    """Add a backend; a second backend of the same name is an error."""
    if BACKENDS.get(name) is not None:
        raise ValueError(f"an LLM backend named {name!r} is already registered")
    BACKENDS[name] = factory


def check_backend_name(name: str) -> None:
    if name not in BACKENDS:
        raise UserError(f"unknown LLM backend '{name}'{did_you_mean(name, BACKENDS)}: "
                        f"choose one of {', '.join(BACKENDS)} (explain.backend)")


def request_key(backend: str, model: str, messages: Sequence[Message], params: dict[str, Any],
                engine: str | None = None) -> str:
    """The cache key: backend, engine (for in-process backends: 'transformers', 'llama-cpp', so that one
    engine's answers are never served as another's), model, messages and parameters (no key, no URL)."""
    request = {"backend": backend, "model": model, "messages": list(messages), "params": params}
    if engine:
        request["engine"] = engine
    blob = json.dumps(request, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def prompt_hash(messages: Sequence[Message]) -> str:
    """A short hash of the messages alone (recorded with each explanation)."""
    blob = json.dumps(list(messages), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def parse_prices(entries: Sequence[str]) -> dict[str, tuple[float, float]]:
    """`["gpt-4o=2.5,10", ...]` → {model: (USD per 1M prompt tokens, USD per 1M completion tokens)}."""
    table = {}
    for entry in entries:
        m = re.fullmatch(r"\s*([^=\s][^=]*?)\s*=\s*([0-9.eE+-]+)\s*,\s*([0-9.eE+-]+)\s*", entry)
        try:
            prices = (float(m.group(2)), float(m.group(3))) if m else None
        except ValueError:
            prices = None
        if prices is None or min(prices) < 0:
            raise UserError(f"explain.prices entry '{entry}' should look like MODEL=PROMPT_USD,COMPLETION_USD "
                            "(USD per million tokens), e.g. gpt-4o-mini=0.15,0.6")
        table[m.group(1)] = prices
    return table
