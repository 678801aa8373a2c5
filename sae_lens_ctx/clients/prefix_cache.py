"""Shared prompt prefixes computed once, for the in-process transformers LLM (`local_hf`).

Neuron-explainer's unit prompts share a long few-shot opening, and judge prompts come in runs that differ
only in their last lines (the system prompt, the template and one explanation, then one held-out example;
`token_batches` computes those together, their shared part through this store).
llama.cpp keeps the key/value cache of the previous prompt for this; transformers' `generate` recomputes
every prompt from its first token.

`PrefixCache.prefill(hf, ids)` runs a prompt's first `n = BLOCK·⌊(len − 1) / BLOCK⌋` tokens through the
model in blocks of `BLOCK` tokens, each block attending to the key/value cache of the blocks before it, and
keeps each block's keys and values under the token ids up to its end. A later prompt that starts with the
same blocks takes them from the store instead of computing them; `generate` then runs the rest of the
prompt on that cache (transformers' documented prefix re-use: `past_key_values=` a cache of the prompt's
first tokens).

Where a prompt is split depends on its own length alone, and a stored block holds exactly what computing
it again would give (the same tokens, shapes and operations on the same cache), so an answer is a function
of its request, whatever was asked before: a resumed run answers as an uninterrupted one. It is not
bit-equal to one unsplit forward over the prompt (float sums in another order: log-probabilities agree
to about 1e-6), so it is part of the engine's identity in the LLM cache key (`local_hf.ENGINE`).

The store holds at most `max_tokens` tokens of keys and values (46 KB a token for SmolLM2-135M in float32),
least recently used blocks dropped first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

BLOCK = 256
"""Tokens per prefill block: a shared prefix is re-used to the last whole block inside it. Long blocks,
because a forward of batch 1 keeps a core busy only over many tokens: SmolLM2-135M in float32 on one core
prefills 187 tokens/s in blocks of 32, 370 in blocks of 128, 450 in blocks of 256 (as in one forward of
1,024). The embedded run's 34 explain calls took 75 s with blocks of 32 and 50 s with 256, the same
texts; neuron-explainer's shared few-shot opening (about 1,100 tokens) is still re-used to 1,024."""


class PrefixCache:
    """Key/value blocks of prompt prefixes, keyed by the token ids up to each block's end (see the module)."""

    def __init__(self, block: int = BLOCK, max_tokens: int = 4096):
        self.block, self.max_tokens = block, max_tokens
        self._blocks: OrderedDict[tuple[int, ...], list[tuple[Any, Any]]] = OrderedDict()
        self._lock = threading.Lock()
        self.reused = self.computed = 0
        """Blocks taken from the store / computed (for tests and the benchmark)."""

    def prefill(self, hf: Any, ids: Sequence[int]) -> tuple[Any, int]:
        """(cache, n): a `DynamicCache` of the prompt's first n tokens (n a multiple of `block`, n < len(ids);
        None and 0 for a prompt of at most one block). Call under `torch.inference_mode()`."""
        import torch
        from transformers import DynamicCache

        n = (len(ids) - 1) // self.block * self.block
        if n == 0:
            return None, 0
        ids = [int(i) for i in ids]
        cache = DynamicCache(config=hf.config)
        for end in range(self.block, n + 1, self.block):
            key = tuple(ids[:end])
            with self._lock:
                kv = self._blocks.get(key)
                if kv is not None:
                    self._blocks.move_to_end(key)
                    self.reused += 1
            if kv is None:  # computed outside the lock: calls run side by side (two may compute one block alike)
                hf(input_ids=torch.tensor([ids[end - self.block:end]]), past_key_values=cache, use_cache=True,
                   logits_to_keep=1)
                kv = [(layer.keys[:, :, -self.block:].clone(), layer.values[:, :, -self.block:].clone())
                      for layer in cache.layers]
                with self._lock:
                    self._blocks[key] = kv
                    self.computed += 1
                    self._evict()
            else:
                for i, (k, v) in enumerate(kv):
                    cache.update(k, v, i)
        return cache, n

    def _evict(self) -> None:
        while len(self._blocks) * self.block > self.max_tokens:
            self._blocks.popitem(last=False)
