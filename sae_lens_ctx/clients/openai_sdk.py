"""The OpenAI SDK backends: `openai` (api.openai.com, key from OPENAI_API_KEY only) and `openai-compatible`
(any server at `explain.base_url`: vLLM, llama.cpp server, Ollama, OpenRouter)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from collections.abc import Sequence
from typing import Any


from ..core.config import ExplainConfig
from ..core.errors import UserError, did_you_mean
from ..core.llm import Client, LLMError, Message, PromptLogprobs, Response, TokenLogprob

log = logging.getLogger(__name__)


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
        self.ensure_ready()
        with self._errors():
            out = self._sdk.chat.completions.create(model=self.model, messages=list(messages), **_chat_kwargs(params))
        return _openai_response(out)

    def prompt_logprobs(self, prompts: Sequence[str], top_logprobs: int,
                        from_offsets: Sequence[int] | None = None) -> list[PromptLogprobs | LLMError]:
        """Each text prompt through `/v1/completions` with ``echo: true``, ``max_tokens: 0`` and ``logprobs:
        top_logprobs``, as vLLM documents it (one request per prompt; a server batches them itself). A server
        that refuses the request, or answers without prompt logprobs (llama.cpp's server, OpenAI, Ollama),
        gives `LLMError('no_prompt_logprobs')`. Alternatives before `from_offsets` are dropped."""
        self.ensure_ready()
        offsets = list(from_offsets) if from_offsets is not None else [0] * len(prompts)
        out: list[PromptLogprobs | LLMError] = []
        for prompt, offset in zip(prompts, offsets):
            try:
                with self._errors():
                    answer = self._sdk.completions.create(model=self.model, prompt=prompt, echo=True, max_tokens=0,
                                                          logprobs=top_logprobs, temperature=0.0)
                out.append(_echo_logprobs(answer, offset))
            except LLMError as e:
                if e.reason in ("bad_request", "not_found", "http_404", "http_405", "http_501"):
                    e = LLMError("no_prompt_logprobs", f"the server refused /completions with echo: {e}")
                out.append(e)
        return out

    @contextlib.contextmanager
    def _errors(self) -> Any:
        """The SDK's exceptions as `LLMError`s with their reasons."""
        import openai

        try:
            yield
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


def _echo_logprobs(out: Any, from_offset: int) -> PromptLogprobs:
    """A completions answer with echo as `PromptLogprobs` (`LLMError('no_prompt_logprobs')` when it holds
    none: a server that ignores echo or logprobs)."""
    choices = getattr(out, "choices", None)
    lp = getattr(choices[0], "logprobs", None) if choices else None
    tokens = list(getattr(lp, "tokens", None) or [])
    tops = list(getattr(lp, "top_logprobs", None) or [])
    offsets = list(getattr(lp, "text_offset", None) or [])
    chosen = list(getattr(lp, "token_logprobs", None) or [])
    if len(tokens) < 2 or len(tops) != len(tokens) or len(offsets) != len(tokens) or not any(tops[1:]):
        raise LLMError("no_prompt_logprobs", "the answer holds no logprobs for the prompt's tokens (echo ignored?)")
    keep = [o >= from_offset for o in offsets]
    return PromptLogprobs(tokens=[str(t) for t in tokens], text_offset=[int(o) for o in offsets],
                          token_logprobs=[None if x is None else float(x) for x in chosen] + [None] * (len(tokens) - len(chosen)),
                          top_logprobs=[{str(k): float(v) for k, v in t.items()} if t is not None and k_ else None
                                        for t, k_ in zip(tops, keep)])


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


def openai_factory(cfg: ExplainConfig) -> Client:
    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        raise UserError("the openai backend needs the OPENAI_API_KEY environment variable (keys are never read "
                        "from config files): export OPENAI_API_KEY=...")
    if not cfg.model:
        raise UserError("explain.model is empty: name the OpenAI model, e.g. explain.model=gpt-4o-mini")
    return OpenAIClient("openai", cfg.model, api_key=key, base_url=cfg.base_url or None, timeout_s=cfg.timeout_s,
                        max_retries=cfg.max_retries, check_model=cfg.check_server)


def compatible_factory(cfg: ExplainConfig) -> Client:
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
