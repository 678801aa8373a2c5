"""Simulation windows: the held-out sequences on which explanations are simulated token by token.

For every held-out ('test') 'top' and 'random' record of `contexts.jsonl`, `windows.jsonl` keeps the whole
mined context it came from (the corpus chunk, BOS excluded) with the unit's activation at every token, as
the scan computed them: OpenAI's simulate-and-score (Bills et al. 2023) scores a simulator's prediction at
every token of such sequences. A trimmed prompt alone would not do: its max is always its last token,
so "fires on the last token" would score well. The score stage cuts its window out of this
(`score.simulation_window`, docs/simulation.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...core.records import ContextRecord, UnitRecord
from ...inputs.tokens import token_strings
from .trim import Prompt

KINDS = ("top", "random")
"""The held-out record kinds that get a window (OpenAI's protocol: top-activating and random sequences)."""


@dataclass(frozen=True)
class WindowRecord:
    """One held-out sequence (a line of `windows.jsonl`): a mined context with the unit's activations."""

    line: int
    """Line number (from 0) of its record in `contexts.jsonl`."""
    unit_id: str
    kind: str
    """'top' or 'random' (the record's kind)."""
    rank: int
    """The record's rank."""
    token_ids: list[int]
    tokens: list[str]
    """Each token's own text (`inputs.tokens.token_strings`), as the simulator is shown it."""
    activations: list[float]
    """The unit's activation at every token, in the context as the scan ran it (BOS first when configured)."""
    peak: int
    """Index in `tokens` of the record's last token (for 'top': the token where the unit fired most)."""


def window_records(prompts: Sequence[Prompt], units: Sequence[UnitRecord], records: Sequence[ContextRecord],
                   tokenizer, bos: int) -> list[WindowRecord]:
    """The windows of the held-out top and random `records` (in their order), matched to the prompts they
    were built from by (unit, kind, document, context, end)."""
    by_key = {}
    for p in prompts:
        if p.split == "test" and p.kind in KINDS:
            end = p.context.start + p.end - bos + 1
            by_key[(units[p.unit].unit_id, p.kind, p.context.doc_id, p.context.index, end)] = p
    out = []
    for line, r in enumerate(records):
        p = by_key.get((r.unit_id, r.kind, r.doc_id, r.context_index, r.end)) if r.split == "test" else None
        if p is None:
            continue
        ids = [int(t) for t in p.context.tokens[bos:]]
        acts = [float(a) for a in p.row[bos:bos + len(ids)].float().tolist()]
        out.append(WindowRecord(line, r.unit_id, r.kind, r.rank, ids, token_strings(tokenizer, ids), acts,
                                p.end - bos))
    return out
