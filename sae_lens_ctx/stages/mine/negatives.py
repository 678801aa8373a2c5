"""Held-out negatives matched to the positives: same token lengths, same preparation, other documents.

Why: negatives drawn as "the contexts where the unit is lowest" are short (a context with few
positions has a low max), and random contexts are long, so a judge that answers by length alone
separates positives from negatives (on the embedded run: positives 12.2 tokens, negatives 3.0, and unit
AUROC 0.295 for real and random units alike). Each held-out positive ('top' test prompt, after
trimming) here gets one negative ('low') of exactly its token length:

* the negative is a window of a real test context that ends at a real position of its document and
  starts `length` tokens earlier (never a positive, never a context cut short at its end);
* it comes from another document than the positive, out of the unit's candidate contexts (the test
  split's `low` track, its lowest-max contexts, and its `pool` track, a seeded random sample);
* its last token is a position where the unit's in-context activation is at most
  `NEGATIVE_FRACTION` × the unit's largest held-out activation (it does not fire there), and it is
  run as a prompt the way positives are (`bos_ids` in front, as trimming runs them): a candidate whose
  activation as a prompt exceeds that bound is passed over;
* among the candidates, the end nearest the positive's end position in its context is preferred
  (comparable position in its document), then a seeded pseudo-random order; a (context, end) is used
  once per unit.

Candidates are run as prompts lazily, in batched rounds: each round runs the windows the greedy choice
reaches and has not run yet (most positives take their first candidate, so about one window per positive
runs instead of `CANDIDATES_PER_POSITIVE`); the choice is the same as running them all first.

A positive for which no candidate qualifies gets no negative; the count is in `mine.json`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from .trim import Prompt, Reader, suffix_evaluator

NEGATIVE_FRACTION = 0.1
"""A position counts as a negative when the unit's activation there is at most this fraction of its
largest held-out (test 'top') activation (at most 0 when that is not positive)."""

CANDIDATES_PER_POSITIVE = 8
"""Windows evaluated as prompts per positive (the nearest ones first); the first that stays low and
is not yet used is kept."""


def _key(seed: int, *parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest(), "little")


def match_negatives(reader: Reader, positives: Sequence[Prompt], pool: Sequence[Prompt], bos: int,
                    bos_ids: list[int], token_budget: int, seed: int) -> tuple[list[Prompt], int]:
    """One length-matched negative per positive of one unit (see the module doc).

    `positives`: the unit's trimmed test 'top' prompts (`start` set); `pool`: `Prompt`s of its candidate
    test contexts (their `row` is the unit's in-context activation at every position). Returns the
    negatives (kind 'low', with `start`, `end`, `activation` and `acts` as the prompt runs) and how many
    positives got none."""
    if not positives:
        return [], 0
    limit = NEGATIVE_FRACTION * max(0.0, max(p.activation for p in positives))
    unit = positives[0].unit
    # a context in both tracks is one candidate; keyed by its place in the corpus (never by `id()`: the
    # windows' order, and so the evaluation batches and their float round-off, must not depend on memory layout)
    contexts = {(c.context.doc_id, c.context.index): c for c in pool}
    plans: list[list[tuple[tuple[str, int], int, int]]] = []  # per positive: (context key, end, length), best first
    for p in positives:
        length = p.end - bos - p.start + 1
        ranked = []
        for cid, c in contexts.items():
            if c.context.doc_id == p.context.doc_id:
                continue
            row = np.asarray(c.row, dtype=np.float64)
            ends = np.arange(bos + length - 1, len(c.context.tokens))
            for e in ends[np.isfinite(row[ends]) & (row[ends] <= limit)].tolist():
                ranked.append((abs(e - p.end), _key(seed, unit, c.context.doc_id, c.context.index, e), cid, e))
        ranked.sort()
        plans.append([(cid, e, length) for _, _, cid, e in ranked[:CANDIDATES_PER_POSITIVE]])
    windows = sorted({w for plan in plans for w in plan})
    slot = {w: i for i, w in enumerate(windows)}
    evaluate = suffix_evaluator(reader, [list(contexts[cid].context.tokens[e - n + 1:e + 1]) for cid, e, n in windows],
                                [unit] * len(windows), bos_ids, token_budget)
    acts: dict = {}  # window → its token activations as a prompt (torch, 1-D)
    while True:  # the greedy choice below, with windows run lazily: only those it reaches
        out, used, missing, need = [], set(), 0, []
        for p, plan in zip(positives, plans):
            for cid, e, n in plan:
                w = (cid, e, n)
                if (cid, e) in used:
                    continue
                if w not in acts:
                    need.append(w)  # undecided until run; later positives go on speculatively
                    break
                a = acts[w]
                if float(a[-1]) > limit:
                    continue
                used.add((cid, e))
                c = contexts[cid]
                out.append(Prompt(unit, p.split, "low", c.context, e, float(a[-1]), c.row, start=e - bos - n + 1,
                                  acts=a))
                break
            else:
                missing += 1
        if not need:
            break
        need = sorted(set(need))
        for w, a in zip(need, evaluate([(slot[w], 0) for w in need])):
            acts[w] = a
    return out, missing


def length_summary(lengths: Sequence[int]) -> dict:
    """Mean, min, max and the lengths themselves (tokens, BOS not counted)."""
    v = [int(x) for x in lengths]
    return {"n": len(v), "mean": round(float(np.mean(v)), 3) if v else None, "min": min(v, default=None),
            "max": max(v, default=None), "lengths": v}
