"""neuron-explainer's side of the LLM layer: its ``make_request`` object backed by an `LLM`, and its imports
made safe (no API key left behind, tiktoken replaced by a local count; ecosystem-notes §3.5)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

from .llm import LLM, CallResult


class NeuronExplainerClient:
    """What neuron-explainer's explainer calls (`self.client.make_request(**kwargs)`), backed by an `LLM`.

    It answers chat requests (`messages`) in the OpenAI response shape and keeps every `CallResult`
    in `results`. A failed call raises `NeuronExplainerCallFailed` (so no text is made up). Requests
    without `messages` (the logprob simulators' `/completions` with `echo` and prompt logprobs) cannot
    be served by a chat protocol and raise `NotImplementedError`.
    """

    def __init__(self, llm: LLM):
        self.llm = llm
        self.results: list[CallResult] = []

    async def make_request(self, timeout_seconds: int | None = None, **kwargs: Any) -> dict[str, Any]:
        if "messages" not in kwargs:
            raise NotImplementedError("neuron-explainer asked for a /completions request (prompt, echo, prompt "
                                      "logprobs: its logprob simulators); the backend protocol is chat-only")
        n = int(kwargs.get("n", 1) or 1)
        params = {k: kwargs[k] for k in ("max_tokens", "temperature", "top_p") if k in kwargs}
        choices = []
        for _ in range(n):  # the cache answers repeats of the same request with the same text
            result = await asyncio.to_thread(self.llm.call, kwargs["messages"], **params)
            self.results.append(result)
            if not result.ok:
                raise NeuronExplainerCallFailed(result)
            choices.append({"index": len(choices), "finish_reason": result.response.finish_reason,
                            "message": {"role": "assistant", "content": result.text}})
        return {"object": "chat.completion", "model": self.llm.model, "choices": choices}


class NeuronExplainerCallFailed(Exception):
    def __init__(self, result: CallResult):
        super().__init__(result.error)
        self.result = result


_IMPORT_LOCK = threading.Lock()


_PLACEHOLDER_KEY = "sae-lens-ctx-placeholder-never-sent"


@contextlib.contextmanager
def _placeholder_key() -> Iterator[None]:
    """neuron-explainer's `api_client` asserts a non-empty OPENAI_API_KEY at import: a placeholder is
    set for the import and removed after it (a user's own key is left alone)."""
    had = "OPENAI_API_KEY" in os.environ
    if not had:
        os.environ["OPENAI_API_KEY"] = _PLACEHOLDER_KEY
    try:
        yield
    finally:
        if not had:
            os.environ.pop("OPENAI_API_KEY", None)


@contextlib.contextmanager
def neuron_explainer_imports() -> Iterator[None]:
    """Import neuron-explainer modules inside this block: no key left behind, one thread at a time."""
    with _IMPORT_LOCK, _placeholder_key():
        yield


@contextlib.contextmanager
def neuron_explainer(count_tokens: Callable[[str], int]) -> Iterator[types.ModuleType]:
    """neuron-explainer's `explainer` module, imported without a key left behind, counting tokens locally."""
    with _IMPORT_LOCK:
        with _placeholder_key():
            from neuron_explainer.explanations import explainer, prompt_builder
        saved = prompt_builder.tiktoken
        encoding = types.SimpleNamespace(encode=lambda text, allowed_special=None: [0] * count_tokens(text))
        prompt_builder.tiktoken = types.SimpleNamespace(get_encoding=lambda name: encoding)
        try:
            yield explainer
        finally:
            prompt_builder.tiktoken = saved
