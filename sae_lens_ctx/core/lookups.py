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
from collections import Counter, defaultdict
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


@dataclass(frozen=True)
class QkRecord:
    """Why the head attended to one looked-up position (a line of `qk.jsonl`): the exact split of its attention
    score at the prompt's last position `T` over query-side × key-side residual-stream components
    (`stages/attribute/qk.py`, `docs/qk.md`). One per look-up record and each of its first
    `attribute.qk_sources` sources.

    Components: `embed`, `pos_embed` (learned positions only), `L{l}H{h}` (each earlier head's output),
    `L{l}MLP`, `const` (output biases, the query/key biases and the norm bias). Each marginal entry holds
    `component`, `score` and `gap` (its signed contribution summed over the other side), `score_share` and
    `gap_share` (that over the total, so the shares sum to 1; None where the total is 0); the `top`
    components by |gap| come first, then `other` (with `n`, the components it sums), so a marginal sums to
    its total exactly. A key entry of an earlier head also holds `reads_position`, `reads_token` and
    `reads_attention`: where that head attended most from `s`, i.e. where what it wrote at `s` came from
    (`s - 1`: a previous-token head)."""

    unit_id: str
    head: str
    split: str
    rank: int
    active: bool
    """The head is active on this prompt (as in the look-up record)."""
    position: int
    """The looked-up key position `s` (indexing the prompt as run, as `LookupRecord.sources`)."""
    token_id: int
    token: str
    query_position: int
    """`T`, the prompt's last position."""
    attention: float
    """The head's attention from `T` to `s`."""
    contribution: float
    """The look-up contribution of `s` to the unit (from the look-up record)."""
    score: float | None
    """The hooked attention score at (`T`, `s`): what the softmax sees (after any softcap)."""
    softcap: float | None
    """The attention logit soft-cap `c` (Gemma 2): `score = c · tanh(logit / c)`; None without one."""
    n_components: int
    """Components on each side."""
    status: str
    """'ok'; 'first_position' (s = 0, the attention sink: split, with the reason); 'one_position' (a
    one-position prompt: the gap is 0); 'masked' (outside a sliding window: no score); 'not_splittable'
    (QK-norm, a softcap that cannot be inverted at this score, or a split that misses the hooked score:
    no numbers)."""
    reason: str | None = None
    """Why the status is not 'ok', in words."""
    logit: float | None = None
    """`scaling · q_T · k_s` before any softcap: exactly the sum of the table (equals `score` without a cap)."""
    gap: float | None = None
    """`logit(s)` minus the attention-weighted mean logit over every position `T` sees: what moves attention onto `s`."""
    key: list[dict] = field(default_factory=list)
    """Key-side marginals (each key component summed over all query components)."""
    query: list[dict] = field(default_factory=list)
    """Query-side marginals."""
    pairs: list[dict] = field(default_factory=list)
    """The largest (query component, key component) entries of the gap table: `query`, `key`, `score`, `gap`."""
    grid: dict | None = None
    """A small heatmap: the score and gap tables summed over the leading query and key components and 'other'
    (`query`, `key` labels; `score`, `gap` rows of the query labels)."""


# -- the look-up explainer -----------------------------------------------------------------------


def token_key(token: str, merge: bool) -> str:
    """The key tokens are grouped by: the text, or with `merge` its stripped lower-case form."""
    return token.strip().lower() if merge and token.strip() else token


@dataclass
class Candidate:
    """A token (tokens merged by `token_key`) that a look-up explainer may name, with the train prompts it
    separates: the head explainer's looked-up tokens, the unit explainer's last and context tokens."""

    key: str
    ids: set[int] = field(default_factory=set)
    tokens: set[str] = field(default_factory=set)
    positive: set[int] = field(default_factory=set)
    """Positive prompts it covers (head: active prompts where it was looked up; unit: top prompts where it is
    the last token, or where occluding it mattered)."""
    negative: set[int] = field(default_factory=set)
    """Negative prompts it matches (head: inactive prompts where it occurs; unit: inactive windows where it is
    the last token, or occurs)."""
    values: list[float] = field(default_factory=list)
    """Per covered occurrence: the attention (head) or the relative occlusion drop (unit context tokens)."""

    def weight(self, n_p: int, n_n: int) -> float:
        """Train TPR − FPR (FPR 0 without negatives), at least 1e-6: the judge's graded score of a match."""
        return max(len(self.positive) / n_p - (len(self.negative) / n_n if n_n else 0.0), 1e-6)


def balanced_accuracy(tp: set, fp: set, n_p: int, n_n: int) -> float:
    """(TPR + 1 − FPR) / 2 of the covered positives `tp` and matched negatives `fp`; TPR alone without negatives."""
    tpr = len(tp) / n_p
    return tpr if not n_n else (tpr + 1 - len(fp) / n_n) / 2


def choose_tokens(candidates: dict[str, Candidate], n_p: int, n_n: int, max_tokens: int,
                  within: tuple[set, set] | None = None) -> tuple[list[Candidate], set, set, float]:
    """Candidates added greedily while the balanced accuracy of "one of them matches" improves (ties: more
    positives, fewer negatives, then the key); at most `max_tokens`. `within` (positives, negatives): the rule
    is that base ∧ (one of them), so matches are intersected with it and it is the starting point.
    Returns (chosen, covered positives, matched negatives, balanced accuracy)."""
    chosen: list[Candidate] = []
    union_p: set[int] = set()
    union_n: set[int] = set()
    tp, fp = (set(within[0]), set(within[1])) if within else (set(), set())
    best = balanced_accuracy(tp, fp, n_p, n_n)
    while len(chosen) < max_tokens:
        scored = []
        for c in candidates.values():
            if c in chosen:
                continue
            p, n = union_p | c.positive, union_n | c.negative
            if within:
                p, n = p & within[0], n & within[1]
            scored.append((balanced_accuracy(p, n, n_p, n_n), len(c.positive), -len(c.negative),
                           [-ord(ch) for ch in c.key], c.key, p, n))
        if not scored:
            break
        value, *_, key, p, n = max(scored, key=lambda t: t[:4])
        if value <= best + 1e-12:
            break
        best, tp, fp = value, p, n
        chosen.append(candidates[key])
        union_p |= candidates[key].positive
        union_n |= candidates[key].negative
    return chosen, tp, fp, best


def explain_pair(records: Sequence[LookupRecord], tokens_of: dict[int, list[int]], *, min_share: float,
                 max_tokens: int, min_support: int, merge: bool,
                 qk: Sequence[QkRecord] = ()) -> tuple[str | None, dict, str | None]:
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
    candidates: dict[str, Candidate] = {}
    for r in active:
        for s in r.sources:
            if s["position"] < r.offset or s["contribution"] < min_share * peak:
                continue
            key = token_key(s["token"], merge)
            c = candidates.setdefault(key, Candidate(key))
            c.ids.add(s["token_id"])
            c.tokens.add(s["token"])
            c.positive.add(r.rank)
            c.values.append(s["attention"])
    for c in candidates.values():
        c.negative = {r.rank for r in inactive if c.ids & set(tokens_of.get(r.rank, []))}
    candidates = {k: c for k, c in candidates.items() if len(c.positive) >= min_support}
    n_a, n_i = len(active), len(inactive)
    chosen, _, _, best_value = choose_tokens(candidates, n_a, n_i, max_tokens)
    if not chosen:
        return None, pattern, "no_pattern: no looked-up token separates the active train prompts from the inactive ones"
    for c in chosen:
        pattern["tokens"].append({
            "key": c.key, "token_ids": sorted(c.ids), "tokens": sorted(c.tokens),
            "n_active_looked_up": len(c.positive), "n_inactive_present": len(c.negative),
            "mean_attention": sum(c.values) / len(c.values), "weight": c.weight(n_a, n_i)})
        if qk:
            reason = key_reason(qk, c.ids, c.positive)
            if reason:
                pattern["tokens"][-1]["key_reason"] = reason
    pattern["train_balanced_accuracy"] = best_value
    return explanation_text(pattern), pattern, None


KEY_REASON_MIN_PROMPTS = 2
"""A key-side reason is stated when one component leads the gap's key side on at least this many of the token's
looked-up prompts, and on at least half of them."""


def leading(entries: Sequence[dict]) -> dict | None:
    """The marginal entry (not 'other') adding most to the gap, when it adds (gap > 0): the component that pulled
    attention onto the position. Entries are ordered by |gap|, so the first one may work against the gap (on
    real models often the attention sink's competition) and is not a reason."""
    best = max((e for e in entries if e["component"] != "other"), key=lambda e: e["gap"], default=None)
    return best if best is not None and best["gap"] > 0 else None


def key_reason(qk: Sequence[QkRecord], ids: set[int], ranks: set[int]) -> dict | None:
    """The stable key-side reason of a looked-up token from the pair's QK records (`qk.jsonl`): on each active
    train prompt of `ranks` where the token was looked up (its record with the largest contribution, status
    'ok', a positive gap), the key component adding most to the gap (`leading`); the component leading on most
    of them when it leads on at least half (and `KEY_REASON_MIN_PROMPTS`): `component`, `n_prompts` (where it
    leads), `n_looked_up`, `mean_gap_share` over those, `query` (the query component leading most often there)
    and, for an earlier head, `reads` (the offset from `s` it attended to most on most of those prompts, the
    token most often there, and both counts). None otherwise."""
    best: dict[int, QkRecord] = {}
    for r in qk:
        if r.split == "train" and r.active and r.status == "ok" and r.token_id in ids and r.rank in ranks and r.key:
            if r.rank not in best or r.contribution > best[r.rank].contribution:
                best[r.rank] = r
    if not best:
        return None
    leads = defaultdict(list)
    for r in best.values():
        lead = leading(r.key) if r.gap is not None and r.gap > 0 else None
        if lead is not None:
            leads[lead["component"]].append((r, lead))
    if not leads:
        return None
    component, rows = max(leads.items(), key=lambda kv: (len(kv[1]), kv[0]))
    if len(rows) < max(KEY_REASON_MIN_PROMPTS, len(best) / 2):
        return None
    shares = [e["gap_share"] for _, e in rows if e["gap_share"] is not None]
    queries: dict[str, int] = defaultdict(int)
    for r, _ in rows:
        q = leading(r.query)
        if q is not None:
            queries[q["component"]] += 1
    query = max(queries.items(), key=lambda kv: (kv[1], kv[0]))[0] if queries else None
    out = {"component": component, "n_prompts": len(rows), "n_looked_up": len(best),
           "mean_gap_share": sum(shares) / len(shares) if shares else None, "query": query}
    reads = [(e["reads_position"] - r.position, e["reads_token"]) for r, e in rows if "reads_position" in e]
    if reads:  # where the earlier head read what it wrote at the looked-up position, when that is stable
        offset, n_offset = max(Counter(o for o, _ in reads).items(), key=lambda kv: (kv[1], -abs(kv[0])))
        if n_offset >= len(reads) / 2:
            token, n_token = Counter(t for o, t in reads if o == offset).most_common(1)[0]
            out["reads"] = {"offset": offset, "token": token, "n_same_token": n_token, "n_same_offset": n_offset}
    return out


def key_reason_text(reason: dict) -> str:
    """' — keyed on the token itself (embedding, 71 % of the gap on 9 of 11 prompts), asked for by L9H2 at the query'."""
    c = reason["component"]
    share = f"{reason['mean_gap_share']:.0%} of the gap on " if reason["mean_gap_share"] is not None else ""
    counts = f"{share}{reason['n_prompts']} of {reason['n_looked_up']} prompts".replace("%", " %")
    reads = reason.get("reads")
    source = ""
    if reads:
        where = "previous token" if reads["offset"] == -1 else "same token" if reads["offset"] == 0 else \
            f"token {-reads['offset']} back"
        source = f", from the {where}" + (f" '{reads['token']}'" if reads["n_same_token"] == reads["n_same_offset"] else
                                          f", '{reads['token']}' on {reads['n_same_token']}")
    what = {"embed": f"the token itself (embedding, {counts})", "pos_embed": f"its position (positional embedding, "
            f"{counts})", "const": f"the biases alone ({counts})"}.get(c, f"what {c} wrote there ({counts}{source})")
    q = reason.get("query")
    asked = "" if q is None else {"embed": ", asked for by the query token's embedding",
                                  "pos_embed": ", asked for by the query's position",
                                  "const": ", asked for by a constant query (biases)"}.get(q, f", asked for by {q} at the query")
    return f" — keyed on {what}{asked}"


def explanation_text(pattern: dict) -> str:
    """One readable sentence from a head pattern and its counts."""
    n_a, n_i = pattern["n_active"], pattern["n_inactive"]
    parts = []
    for t in pattern["tokens"]:
        shown = " / ".join(f'"{s}"' for s in t["tokens"])
        parts.append(f"{shown} (looked up on {t['n_active_looked_up']} of {n_a} prompts where the head is active, "
                     f"mean attention {t['mean_attention']:.2f}; present in {t['n_inactive_present']} of {n_i} "
                     "where it is inactive)" + (key_reason_text(t["key_reason"]) if t.get("key_reason") else ""))
    return "The head is active when it can look up " + " or ".join(parts) + " earlier in the document."


def judge(pattern: dict | None, tokens: Sequence[int]) -> tuple[bool, float]:
    """The deterministic judge of one held-out prompt (its context tokens): Yes when a pattern token occurs,
    and the graded score (the largest weight among the pattern tokens it holds; 0 when none)."""
    present = set(int(t) for t in tokens)
    weights = [t["weight"] for t in (pattern or {}).get("tokens", []) if present & set(t["token_ids"])]
    return bool(weights), float(max(weights, default=0.0))


def explain_lookups(units: Sequence[UnitRecord], contexts: Sequence[ContextRecord], heads: Sequence[HeadRecord],
                    lookups: Sequence[LookupRecord], cfg, qk: Sequence[QkRecord] = ()) -> list[ExplanationRecord]:
    """An `ExplanationRecord` (explainer 'lookup') per relevant pair of `heads.jsonl`, from `lookups.jsonl`; with
    the QK records of `qk.jsonl`, each pattern token with a stable key-side reason says it (`key_reason`)."""
    qk_of: dict[tuple[str, str], list[QkRecord]] = defaultdict(list)
    for q in qk:
        qk_of[(q.unit_id, q.head)].append(q)
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
                                            min_support=cfg.lookup_min_support, merge=cfg.lookup_merge,
                                            qk=qk_of.get((h.unit_id, h.head), ()))
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
