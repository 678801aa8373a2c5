"""The in-process llama-cpp-python backend (`llama-cpp`: any GGUF file), an optional extra; and the GGUF's own
context length, read from its header, that caps every in-process model's window."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.config import ExplainConfig
from ..core.errors import UserError
from ..core.llm import Client, LLMError, Message, PromptLogprobs, Response, TokenLogprob

log = logging.getLogger(__name__)


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

    def prompt_logprobs(self, prompts: Sequence[str], top_logprobs: int,
                        from_offsets: Sequence[int] | None = None) -> list[PromptLogprobs | LLMError]:
        """Each text prompt scored token by token (`core.llm.PromptLogprobs`): one evaluation of the prompt
        on a second copy of the model loaded with `logits_all` (llama.cpp keeps the logits of every position
        only then), log-softmaxed at every position from the token at `from_offsets` on. Calls are serialised."""
        offsets = list(from_offsets) if from_offsets is not None else [0] * len(prompts)
        llm, lock = load_llama(self.path, self.context_window, logits_all=True)
        out: list[PromptLogprobs | LLMError] = []
        for prompt, offset in zip(prompts, offsets):
            ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=False)
            if len(ids) > self.context_window:
                out.append(LLMError("context_too_long", f"{len(ids)} prompt tokens exceed the context window of "
                                    f"{self.context_window} (explain.context_window)"))
                continue
            if len(ids) < 2:
                out.append(LLMError("bad_request", "a prompt of fewer than two tokens has no position to score"))
                continue
            with lock:
                llm.reset()
                llm.eval(ids)
                logits = np.array(llm.scores[:len(ids)], dtype=np.float64)  # every position: logits_all
            raw = [llm.detokenize([int(t)]) for t in ids]
            full = b"".join(raw)
            tokens, starts, at = [], [], 0
            for piece in raw:  # character offsets (a character split over tokens starts at its first byte's)
                starts.append(len(full[:at].decode("utf-8", errors="ignore")))
                tokens.append(_piece_text(piece))
                at += len(piece)
            first = max(1, next((k for k, o in enumerate(starts) if o >= offset), len(ids)))
            shifted = logits[first - 1:len(ids) - 1]
            lse = shifted.max(-1, keepdims=True) + np.log(np.exp(shifted - shifted.max(-1, keepdims=True)).sum(-1, keepdims=True))
            logprobs = shifted - lse
            chosen = [None] * first + [float(logprobs[q, ids[first + q]]) for q in range(len(ids) - first)]
            tops: list[dict[str, float] | None] = [None] * first
            for row in logprobs:
                best = np.argsort(-row)[:top_logprobs]
                tops.append({_piece_text(llm.detokenize([int(i)])): float(row[i]) for i in best})
            out.append(PromptLogprobs(tokens=tokens, text_offset=starts, token_logprobs=chosen, top_logprobs=tops))
        return out

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


def _piece_text(piece: bytes) -> str:
    """A token's bytes as completions servers echo them: its text, or ``bytes:\\xNN...`` where it is not
    whole UTF-8 on its own (part of a multi-byte character; neuron-explainer merges those)."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)


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


def local_n_ctx(cfg: ExplainConfig, path: Path) -> int:
    """explain.context_window, but never more than the GGUF model's own context (a preset's 128,000-token
    window would otherwise make llama.cpp allocate a KV cache the model cannot use)."""
    own = gguf_context_length(path) if path.is_file() else None
    return min(cfg.context_window, own) if own else cfg.context_window


def llama_cpp_factory(cfg: ExplainConfig) -> Client:
    if not cfg.model:
        raise UserError("explain.model is empty: the llama-cpp backend needs the path of a .gguf file")
    path = Path(cfg.model).expanduser()
    return LlamaCppClient("llama-cpp", path, str(path), n_ctx=local_n_ctx(cfg, path), timeout_s=cfg.timeout_s)
