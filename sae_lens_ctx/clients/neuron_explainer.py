"""neuron-explainer's side of the LLM layer: its ``make_request`` object backed by an `LLM`, and its imports
made safe (no API key left behind, tiktoken replaced by a local count; ecosystem-notes §3.5).

The simulators call ``make_request`` in three shapes, each answered in the OpenAI response shape its parser
reads:

* ``prompt=<text>, echo=True, max_tokens=0, logprobs=k`` (`ExplanationNeuronSimulator`, all at once): the
  backend's prompt-logprobs capability (`LLM.prompt_logprobs`), ``choices[0].text`` the prompt and
  ``choices[0].logprobs`` its tokens, offsets and top-k alternatives. Alternatives are asked for only from
  the prompt's last ``<start>`` on (the only place neuron-explainer's parser reads them), so that the cache
  does not hold the few-shot part's. Requests made together (one `simulate_and_score` gathers its
  sequences) are handed to the backend in one list, so an in-process model computes their shared opening
  once.
* ``prompt=<messages>, max_tokens=1, logprobs=k`` (`ExplanationTokenByTokenSimulator` in the HARMONY_V4
  format): one chat call with ``top_logprobs`` k, its first token's alternatives as ``top_logprobs[0]``.
* ``prompt=<messages>, max_tokens=N`` (`LogprobFreeExplanationTokenSimulator`): one chat call, its text.

A failed call raises its `LLMError` (so no activation is made up); a chat answer without the logprobs asked
for raises `LLMError('no_logprobs')`.

`simulator_module()` imports neuron-explainer's simulator with one 0.0.1 bug fixed at this seam (no fork):
`LogprobFreeExplanationTokenSimulator` constructs ``PromptBuilder(allow_extra_system_messages=True)``, which
0.0.1's `PromptBuilder` does not accept (a `TypeError` on every call); the module's `PromptBuilder` name is
pointed at a subclass that accepts the flag and applies it in `build`, as its other callers pass it.
And where that simulator's answer does not reproduce the sequence's tokens, 0.0.1's parser returns all
zeros (a made-up simulation: delphi's JSON fallback has the same failure, its #137); here such an answer
raises `UnreproducedSequence` instead (the same check as its parser, before it runs), so the sequence is
counted failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

from ..core.llm import LLMError, PromptLogprobs
from .llm import LLM, CallResult


class NeuronExplainerClient:
    """What neuron-explainer's explainer calls (`self.client.make_request(**kwargs)`), backed by an `LLM`.

    It answers chat requests (`messages`) in the OpenAI response shape and keeps every `CallResult`
    in `results`. A failed call raises `NeuronExplainerCallFailed` (so no text is made up). Requests
    without `messages` are the simulators' (see the module docstring): a text prompt with `echo` through the
    backend's prompt logprobs, a HARMONY_V4 prompt (messages) as one chat call; a text completion without
    echo has no backend here and raises `NotImplementedError`.
    """

    def __init__(self, llm: LLM):
        self.llm = llm
        self.results: list[CallResult] = []
        self._pending: list[tuple[str, int, int, asyncio.Future]] = []
        self.prompt_tokens: list[int] = []
        """Tokens of every prompt scored through prompt logprobs (for the run's record)."""

    async def make_request(self, timeout_seconds: int | None = None, **kwargs: Any) -> dict[str, Any]:
        if "messages" not in kwargs:
            prompt = kwargs.get("prompt")
            if isinstance(prompt, str) and kwargs.get("echo"):
                return await self._echo(prompt, int(kwargs.get("logprobs") or 0))
            if isinstance(prompt, list):
                return await self._chat(prompt, kwargs)
            raise NotImplementedError("neuron-explainer asked for a text completion without echo; the backends "
                                      "here complete chats (use the HARMONY_V4 prompt format)")
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


    async def _echo(self, prompt: str, top: int) -> dict[str, Any]:
        """One all-at-once simulation prompt, scored with the others queued beside it (see the module)."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((prompt, max(0, prompt.rfind("<start>")), top, future))
        await asyncio.sleep(0)  # the sibling simulations of one gather queue theirs meanwhile
        if self._pending:
            batch, self._pending = self._pending, []
            for k in sorted({t for _, _, t, _ in batch}):
                group = [b for b in batch if b[2] == k]
                try:
                    answers = await asyncio.to_thread(self.llm.prompt_logprobs, [b[0] for b in group], k,
                                                      [b[1] for b in group])
                except LLMError as e:
                    answers = [e] * len(group)
                except Exception as e:  # noqa: BLE001  (every queued request needs an answer, or it waits forever)
                    answers = [LLMError("client_error", f"{type(e).__name__}: {str(e)[:200]}")] * len(group)
                for (_, _, _, fut), answer in zip(group, answers):
                    fut.set_result(answer)
        answer = await future
        if not isinstance(answer, PromptLogprobs):
            raise answer
        self.prompt_tokens.append(len(answer.tokens))
        return {"object": "text_completion", "model": self.llm.model,
                "choices": [{"index": 0, "text": prompt, "finish_reason": "length",
                             "logprobs": {"tokens": answer.tokens, "token_logprobs": answer.token_logprobs,
                                          "top_logprobs": answer.top_logprobs, "text_offset": answer.text_offset}}]}

    async def _chat(self, prompt: list[dict], kwargs: dict[str, Any]) -> dict[str, Any]:
        """A HARMONY_V4 prompt (chat messages) as one chat call; with `logprobs`, its first token's
        alternatives (token-by-token), else its text (logprob-free)."""
        messages = [{"role": str(getattr(m["role"], "value", m["role"])), "content": m["content"]} for m in prompt]
        top = min(int(kwargs.get("logprobs") or 0), 20)
        params = {"max_tokens": int(kwargs.get("max_tokens") or 1), "temperature": 0.0}
        if top:
            params["top_logprobs"] = top
        result = await asyncio.to_thread(self.llm.call, messages, **params)
        self.results.append(result)
        if not result.ok:
            raise LLMError(result.reason or "failed", result.error or "")
        choice: dict[str, Any] = {"index": 0, "text": result.text, "finish_reason": result.response.finish_reason,
                                  "message": {"role": "assistant", "content": result.text}}
        if top:
            lps = result.response.logprobs
            if not lps or not lps[0].top:
                raise LLMError("no_logprobs", "the chat answer holds no token alternatives (top_logprobs)")
            choice["logprobs"] = {"tokens": [t.token for t in lps], "token_logprobs": [t.logprob for t in lps],
                                  "top_logprobs": [dict(t.top) for t in lps]}
        return {"object": "chat.completion", "model": self.llm.model, "choices": [choice]}


class UnreproducedSequence(Exception):
    """A logprob-free simulation answer that does not repeat the sequence's tokens line by line."""


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


_SIMULATOR: list[types.ModuleType] = []


def simulator_module() -> types.ModuleType:
    """neuron-explainer's `simulator` module, imported without a key left behind, with 0.0.1's
    `LogprobFreeExplanationTokenSimulator` prompt-builder bug fixed (see the module docstring)."""
    with _IMPORT_LOCK:
        if not _SIMULATOR:
            with _placeholder_key():
                from neuron_explainer.explanations import prompt_builder, scoring, simulator  # noqa: F401

            class PromptBuilder(prompt_builder.PromptBuilder):
                """0.0.1's PromptBuilder, also accepting `allow_extra_system_messages` when constructed."""

                def __init__(self, allow_extra_system_messages: bool = False) -> None:
                    super().__init__()
                    self._allow_extra_system_messages = allow_extra_system_messages

                def build(self, prompt_format: Any, *, allow_extra_system_messages: bool = False) -> Any:
                    allow = allow_extra_system_messages or self._allow_extra_system_messages
                    return super().build(prompt_format, allow_extra_system_messages=allow)

            simulator.PromptBuilder = PromptBuilder
            parse = simulator._parse_no_logprobs_completion

            def parse_or_refuse(completion: str, tokens: Any) -> Any:
                lines = completion.strip("\n").split("༗\n")
                start = next((i for i, line in enumerate(lines) if line.startswith(f"{tokens[0]}\t")), None)
                if start is None or len(lines) - start != len(tokens) or any(
                        not line.startswith(f"{t}\t") for line, t in zip(lines[start:], tokens)):
                    raise UnreproducedSequence("the answer does not repeat the sequence's tokens")
                return parse(completion, tokens)

            simulator._parse_no_logprobs_completion = parse_or_refuse
            _SIMULATOR.append(simulator)
        return _SIMULATOR[0]
