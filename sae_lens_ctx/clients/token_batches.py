"""Many single-token greedy requests in few forwards, for the in-process transformers LLM (`local_hf`).

The judge asks about a thousand Yes/No questions a run, each one next token after a prompt of about
100 tokens, and the prompts of one explanation differ only in their last lines (one held-out example).
Asked one by one, each is a forward of batch 1 (its matrices too small to keep a core busy) plus
`generate`'s bookkeeping. Here:

* `group_by_prefix` sorts the prompts' token ids and walks them in order, adding a prompt to the current
  group while that costs fewer computed tokens than starting a new one. A group's cost is its shared
  prefix once, plus every row padded to the group's longest rest, plus `FORWARD_OVERHEAD_TOKENS` for each
  of its two forwards; at most `MAX_ROWS` rows a group. On the embedded run this makes one group per
  explanation shown.
* `next_token_logits` computes one group: the shared prefix once at batch 1 (its whole blocks through the
  `PrefixCache`, so later groups of the same explanation re-use them), that cache repeated per row, then
  every row's rest in one right-padded forward, keeping logits only at each row's last token. Right
  padding needs no attention mask: a row's padding comes after all its real tokens, and causal attention
  never looks ahead.

The rows of one forward go through one matrix product, so a row's log-probabilities can differ from the
same prompt asked alone in their last digits: over the embedded run's 933 judge prompts by at most
2e-5, every greedy answer the same (measured against `generate` one by one). As on any batched server,
an answer can therefore depend, in those digits, on the rows beside it; the cache key's engine name says
that this engine batches (`local_hf.ENGINE`). Measured on the same 933 prompts (2 cores, float32):
124 s one by one with 4 workers, 61 s in groups with 2 workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .prefix_cache import PrefixCache

MAX_ROWS = 16
"""Rows of one batched forward at most."""

FORWARD_OVERHEAD_TOKENS = 32
"""What one more forward costs, in tokens computed: the grouping's price of starting a new group."""


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _cost(prefix: int, rows: int, longest: int) -> int:
    return prefix + rows * (longest - prefix) + 2 * FORWARD_OVERHEAD_TOKENS


def group_by_prefix(prompts: Sequence[Sequence[int]], max_rows: int = MAX_ROWS) -> list[list[int]]:
    """Indices of `prompts` (token id lists, each at least 1 long) in groups that share a prefix (see the
    module): every index once; a group's rows are in sorted order."""
    order = sorted(range(len(prompts)), key=lambda i: list(prompts[i]))
    groups: list[list[int]] = []
    group: list[int] = []
    prefix = longest = 0
    for i in order:
        x = prompts[i]
        if group:
            # in sorted order the prefix shared by a run of prompts is the one its first and last share
            p = min(_common(prompts[group[0]], x), prefix, len(x) - 1)
            joined = _cost(p, len(group) + 1, max(longest, len(x)))
            apart = _cost(prefix, len(group), longest) + _cost(len(x) - 1, 1, len(x))
            if len(group) < max_rows and joined <= apart:
                group.append(i)
                prefix, longest = p, max(longest, len(x))
                continue
            groups.append(group)
        group, prefix, longest = [i], len(x) - 1, len(x)
    if group:
        groups.append(group)
    return groups


def next_token_logits(hf: Any, prefixes: PrefixCache, rows: Sequence[Sequence[int]], pad_id: int) -> Any:
    """`[len(rows), vocab]` float32 logits of the next token after each prompt of one group (token ids; a
    prefix shared by all, see the module). Call under `torch.inference_mode()`."""
    import torch

    p = min(_common(rows[0], rows[-1]), *(len(r) - 1 for r in rows))  # rows in sorted order: see group_by_prefix
    cache, batch = _shared_prefix_batch(hf, prefixes, rows, p, pad_id)
    last = torch.tensor([len(r) - p - 1 for r in rows])
    keep = torch.unique(last)  # sorted positions: only there the unembedding is applied
    logits = hf(input_ids=batch, past_key_values=cache, use_cache=cache is not None, logits_to_keep=keep).logits
    return logits[torch.arange(len(rows)), torch.searchsorted(keep, last)].float()


def _shared_prefix_batch(hf: Any, prefixes: PrefixCache, rows: Sequence[Sequence[int]], p: int,
                         pad_id: int) -> tuple[Any, Any]:
    """(cache, batch): the first p tokens, shared by every row, computed once at batch 1 (whole blocks from the
    `PrefixCache`) and repeated for each row (None when p is 0); the rows' tokens from p on, right-padded,
    `[len(rows), longest - p]`."""
    import torch
    from transformers import DynamicCache

    cache = None
    if p > 0:
        first = [int(i) for i in rows[0][:p]]
        cache, n = prefixes.prefill(hf, first + [pad_id])
        if cache is None:
            cache = DynamicCache(config=hf.config)
        if p > n:
            hf(input_ids=torch.tensor([first[n:]]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        if len(rows) > 1:
            cache.batch_repeat_interleave(len(rows))
    longest = max(len(r) - p for r in rows)
    batch = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    for k, r in enumerate(rows):
        batch[k, :len(r) - p] = torch.tensor([int(i) for i in r[p:]])
    return cache, batch


def prompt_hidden_states(hf: Any, prefixes: PrefixCache, rows: Sequence[Sequence[int]], keep_from: int,
                         pad_id: int) -> tuple[Any, int]:
    """(states, p): the last hidden states (after the final norm, before the unembedding) of every row of
    token ids from position p on, `[len(rows), longest - p, d_model]`, right-padded; p is the prefix all rows
    share, capped at `keep_from` (the first position whose state the caller needs), computed once at batch 1
    (its whole blocks through the `PrefixCache`). One row with `keep_from` 0 is one plain forward. Call
    under `torch.inference_mode()`."""
    p = max(0, min(keep_from, *(len(r) - 1 for r in rows), *(_common(rows[0], r) for r in rows[1:])))
    cache, batch = _shared_prefix_batch(hf, prefixes, rows, p, pad_id)
    states = hf.model(input_ids=batch, past_key_values=cache, use_cache=cache is not None).last_hidden_state
    return states, p
