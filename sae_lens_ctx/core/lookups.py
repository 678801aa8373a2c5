"""Context look-ups: what a head read from the context when it switched a unit on, exactly; the look-up
explainer (no LLM) and its deterministic judge.

This module holds what two stages share and needs no torch: the look-up record, the explainer's pattern and
its judge. The attribution itself is in `stages/attribute/direct.py` (`source_contributions`, `lookup_records`).

**Exact per-source attribution.** A head's direct contribution to a unit at the prompt's last position
`T` (`stages/attribute/direct.py`) is `A[h] = z_h[T] · f_h / scale[T]` with `f_h = W_O[h] @ read`. Attention makes
`z_h[T] = Σ_{s≤T} pattern[h, T, s] · v_{g(h)}[s]` (`v` as hooked, value bias included; `g(h)` the
head's KV group under grouped-query attention; rotary embeddings change only the pattern), so

    A[h] = Σ_{s≤T} pattern[h, T, s] · (v_{g(h)}[s] · f_h) / scale[T]

splits exactly over the source positions `s` (Neo, Cohen & Barez 2024 name the heads; this says what
each one looked up). The attribute stage computes it from `hook_pattern` at `T` and `hook_v` in the
same forward as `hook_z` (no cache), for every branch of the unit, and writes `lookups.jsonl`: per
relevant (unit, head) pair and prompt, the top source positions by |contribution| and the first
position's share (attention sinks).

**Look-up explainer.** For a pair, a token is *looked up* on a train prompt when a position holding it
contributes at least `explain.lookup_min_share` of the pair's largest single-position contribution. The
pattern is the small set of tokens (greedy, at most `explain.lookup_max_tokens`) whose rule "one of them
occurs in the prompt" best separates, by balanced accuracy, the train prompts where the head is active
(counted where the token was looked up) from those where it is not (counted where the token merely
occurs: that is what the judge will see). Prompts where the head is active and the token was looked up
are its support.

**Judge.** A held-out prompt gets Yes when a pattern token occurs in it (the head attends to every
earlier position, so it can look any of them up), and the graded score `max weight` over the pattern
tokens it holds (weight: the token's own TPR − FPR on train) for AUROC.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from .records import ContextRecord, ExplanationRecord, HeadRecord, UnitRecord

EXPLAINER = "lookup"
"""The `explainer` name of look-up explanations and of their scores."""

SINK_SHARE = 0.99
"""A prompt whose head puts at least this much attention on the first position looks up nothing else."""


@dataclass(frozen=True)
class LookupRecord:
    """One relevant (unit, head) pair on one prompt (a line of `lookups.jsonl`): where the head's direct
    contribution to the unit came from.

    Positions index the prompt as it was run (`offset` tokens, the BOS, prepended to the context tokens of
    `contexts.jsonl`), from 0 to `n_positions - 1`, the last position `T` being where the unit is read."""

    unit_id: str
    head: str
    """`L{layer}H{head}`."""
    split: str
    """'train' or 'test'."""
    rank: int
    """The prompt's rank among the unit's 'top' prompts of the split (as in `contexts.jsonl` and `heads.jsonl`)."""
    active: bool
    """The head is active on this prompt under `attribute.rule`."""
    branch: str
    """The branch the contributions below are on (the one ranking heads: 'in', 'gate' or 'latent')."""
    attribution: float
    """`A[h]` on `branch`: exactly the sum of the contributions of every source position."""
    n_positions: int
    offset: int
    """Tokens prepended to the context tokens (1 with BOS, else 0): position p is context token p - offset."""
    first_attention: float
    """Attention of `T` on position 0 (an attention sink on most models)."""
    first_contribution: float
    """Contribution of position 0 on `branch`."""
    sources: list[dict] = field(default_factory=list)
    """The top `attribute.lookup_top_k` positions by |contribution| on `branch`, largest first: `position`,
    `token_id`, `token` (text, word-start marker as a leading space), `attention`, `contribution`, and
    `branches` (contribution per branch, gated neurons)."""
    status: str = "ok"
    """'ok', 'one_position' (the prompt as run has one position: the head can only attend to itself) or
    'first_position_only' (≥ 99 % of the attention on position 0)."""


# -- the look-up explainer -----------------------------------------------------------------------


def token_key(token: str, merge: bool) -> str:
    """The key tokens are grouped by: the text, or with `merge` its stripped lower-case form."""
    return token.strip().lower() if merge and token.strip() else token


@dataclass
class _Candidate:
    key: str
    ids: set[int] = field(default_factory=set)
    tokens: set[str] = field(default_factory=set)
    looked_up: set[int] = field(default_factory=set)
    """Active train prompts (by rank) where the token was looked up."""
    attention: list[float] = field(default_factory=list)
    present: set[int] = field(default_factory=set)
    """Inactive train prompts (by rank) where the token occurs."""


def explain_pair(records: Sequence[LookupRecord], tokens_of: dict[int, list[int]], *, min_share: float,
                 max_tokens: int, min_support: int, merge: bool) -> tuple[str | None, dict, str | None]:
    """The look-up explanation of one pair from its train records: (text, pattern, error).

    `tokens_of`: rank → the prompt's context tokens (no BOS). `text` is None when there is nothing to say
    (`error` says why: no active prompt, no look-up that adds to the unit, no separating token); the
    pattern always carries the counts (`n_active`, `n_inactive`, `n_one_position`, `n_first_position_only`)."""
    active = [r for r in records if r.active]
    inactive = [r for r in records if not r.active]
    counts = {"n_active": len(active), "n_inactive": len(inactive),
              "n_one_position": sum(r.status == "one_position" for r in records),
              "n_first_position_only": sum(r.status == "first_position_only" for r in records)}
    pattern: dict = {"kind": "head", "rule": "any", "tokens": [], **counts}
    if not active:
        return None, pattern, "no_examples: the head is active on none of the unit's train prompts"
    peak = max((s["contribution"] for r in active for s in r.sources if s["position"] >= r.offset), default=0.0)
    if not peak > 0:
        return None, pattern, "no_lookup: on its active prompts the head draws nothing from the context tokens"
    candidates: dict[str, _Candidate] = {}
    for r in active:
        for s in r.sources:
            if s["position"] < r.offset or s["contribution"] < min_share * peak:
                continue
            key = token_key(s["token"], merge)
            c = candidates.setdefault(key, _Candidate(key))
            c.ids.add(s["token_id"])
            c.tokens.add(s["token"])
            c.looked_up.add(r.rank)
            c.attention.append(s["attention"])
    for c in candidates.values():
        c.present = {r.rank for r in inactive if c.ids & set(tokens_of.get(r.rank, []))}
    candidates = {k: c for k, c in candidates.items() if len(c.looked_up) >= min_support}
    n_a, n_i = len(active), len(inactive)

    def balanced(tp: set, fp: set) -> float:
        tpr = len(tp) / n_a
        return tpr if not n_i else (tpr + 1 - len(fp) / n_i) / 2

    chosen: list[_Candidate] = []
    tp: set[int] = set()
    fp: set[int] = set()
    best_value = balanced(tp, fp) if n_i else 0.0
    while len(chosen) < max_tokens:
        scored = [(balanced(tp | c.looked_up, fp | c.present), len(c.looked_up), -len(c.present), c.key)
                  for c in candidates.values() if c not in chosen]
        if not scored:
            break
        value, *_, key = max(scored, key=lambda t: (t[0], t[1], t[2], [-ord(ch) for ch in t[3]]))
        if value <= best_value + 1e-12:
            break
        best_value = value
        chosen.append(candidates[key])
        tp |= candidates[key].looked_up
        fp |= candidates[key].present
    if not chosen:
        return None, pattern, "no_pattern: no looked-up token separates the active train prompts from the inactive ones"
    for c in chosen:
        weight = len(c.looked_up) / n_a - (len(c.present) / n_i if n_i else 0.0)
        pattern["tokens"].append({
            "key": c.key, "token_ids": sorted(c.ids), "tokens": sorted(c.tokens),
            "n_active_looked_up": len(c.looked_up), "n_inactive_present": len(c.present),
            "mean_attention": sum(c.attention) / len(c.attention), "weight": max(weight, 1e-6)})
    pattern["train_balanced_accuracy"] = best_value
    return explanation_text(pattern), pattern, None


def explanation_text(pattern: dict) -> str:
    """One readable sentence from a head pattern and its counts."""
    n_a, n_i = pattern["n_active"], pattern["n_inactive"]
    parts = []
    for t in pattern["tokens"]:
        shown = " / ".join(f'"{s}"' for s in t["tokens"])
        parts.append(f"{shown} (looked up on {t['n_active_looked_up']} of {n_a} prompts where the head is active, "
                     f"mean attention {t['mean_attention']:.2f}; present in {t['n_inactive_present']} of {n_i} "
                     "where it is inactive)")
    return "The head is active when it can look up " + " or ".join(parts) + " earlier in the document."


def judge(pattern: dict | None, tokens: Sequence[int]) -> tuple[bool, float]:
    """The deterministic judge of one held-out prompt (its context tokens): Yes when a pattern token occurs,
    and the graded score (the largest weight among the pattern tokens it holds; 0 when none)."""
    present = set(int(t) for t in tokens)
    weights = [t["weight"] for t in (pattern or {}).get("tokens", []) if present & set(t["token_ids"])]
    return bool(weights), float(max(weights, default=0.0))


def explain_lookups(units: Sequence[UnitRecord], contexts: Sequence[ContextRecord], heads: Sequence[HeadRecord],
                    lookups: Sequence[LookupRecord], cfg) -> list[ExplanationRecord]:
    """An `ExplanationRecord` (explainer 'lookup') per relevant pair of `heads.jsonl`, from `lookups.jsonl`."""
    known = {u.unit_id for u in units}
    tokens_of: dict[str, dict[int, list[int]]] = defaultdict(dict)
    for c in contexts:
        if c.split == "train" and c.kind == "top":
            tokens_of[c.unit_id][c.rank] = c.tokens
    by_pair: dict[tuple[str, str], list[LookupRecord]] = defaultdict(list)
    for r in lookups:
        if r.split == "train":
            by_pair[(r.unit_id, r.head)].append(r)
    records = []
    for h in heads:
        if not h.relevant or h.unit_id not in known:
            continue
        text, pattern, error = explain_pair(by_pair.get((h.unit_id, h.head), []), tokens_of[h.unit_id],
                                            min_share=cfg.lookup_min_share, max_tokens=cfg.lookup_max_tokens,
                                            min_support=cfg.lookup_min_support, merge=cfg.lookup_merge)
        records.append(ExplanationRecord(
            unit_id=h.unit_id, head=h.head, explainer=EXPLAINER, text=text,
            status="ok" if text else "skipped", error=error, backend="none", model="", prompt_hash="",
            prompt_tokens=0, completion_tokens=0, cost_usd=0.0, n_active=pattern["n_active"],
            n_inactive=pattern["n_inactive"], pattern=pattern))
    return records


def looked_up_positions(records: Sequence[LookupRecord], min_share: float) -> dict[tuple[str, str, int], set[int]]:
    """(unit, head, train rank) → context-token positions looked up (for marking them in the LLM's prompt)."""
    peak: dict[tuple[str, str], float] = defaultdict(float)
    for r in records:
        if r.split == "train" and r.active:
            for s in r.sources:
                if s["position"] >= r.offset:
                    peak[(r.unit_id, r.head)] = max(peak[(r.unit_id, r.head)], s["contribution"])
    out: dict[tuple[str, str, int], set[int]] = {}
    for r in records:
        p = peak.get((r.unit_id, r.head), 0.0)
        if r.split != "train" or not r.active or not p > 0:
            continue
        out[(r.unit_id, r.head, r.rank)] = {
            s["position"] - r.offset for s in r.sources
            if s["position"] >= r.offset and s["contribution"] >= min_share * p and math.isfinite(s["contribution"])}
    return out
