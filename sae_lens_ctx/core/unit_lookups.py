"""The unit look-up explainer (no LLM): which context tokens a unit's activation needs, and its judge.

In the spirit of Neuron-to-Graph (Foote et al. 2023, "N2G: A Scalable Approach for Quantifying
Interpretable Neuron Representations in Large Language Models"): mining already trims each top prompt
to the shortest suffix that keeps most of the activation (N2G's pruning step); the attribute stage then
measures each remaining context token's importance by **occlusion** (N2G's saliency step), and this
module turns the measurements into a pattern that can be checked on held-out prompts.

**Occlusion** (`stages/attribute/occlusion.py`). For each of the unit's train 'top' prompts, every
context token before the last is in turn replaced by the token that pads batches (`inputs.view.pad_id`:
the pad token, else EOS, else BOS; N2G replaces by padding too), all variants of all prompts in a few
batched forwards stopped after the unit's layer, and the unit's activation at the last position is read.
`drop = clean − occluded`. Replacing keeps every other token at its position (deleting would shift
them, and with them learned positions). The last token is never occluded: it is the position the unit
is read at, and the pattern names it on its own. One record per prompt goes to `occlusions.jsonl`.

**Pattern.** A context token *matters* on a prompt when occluding it drops the activation by at least
`explain.unit_lookup_min_drop` of the prompt's own (clean) activation. The positives are the unit's top
train prompts on which it is active as run (clean activation > 0); the negatives are windows of its
train 'random' prompts, one per positive and of the positive's length, ending where the unit's recorded
activation is at most `INACTIVE_FRACTION` of its largest top train activation (`inactive_windows`; the
same bound as the mine stage's held-out negatives). The rule is

    (the prompt's last token is one of `last_tokens`, or `last_tokens` is empty: any last token)
    and (one of `context_tokens` occurs in the prompt, or `context_tokens` is empty)

chosen by balanced accuracy (positives vs negatives) in two ways, keeping the better (ties: any last
token): with any last token, context tokens added greedily; or the last tokens first (greedily, alone),
then the context tokens within. A context token's positive support counts the prompts where it
*mattered* (occlusion), its negative count the negatives where it merely *occurs* (that is what the
judge will see), as for the head look-up explainer. Why a conjunction with an optional side: a
next-token unit may fire on one token whatever precedes it (last tokens alone), on anything after a
trigger (context tokens alone, the planted models' neuron), or on a token in a context (both), and the
train data decide which; an empty side is never a silent match-everything, as the rule must beat
balanced accuracy 0.5 to be kept.

**Judge** (`judge`): Yes when the rule matches the held-out prompt's tokens; graded score (for AUROC)
the product of the matching last token's weight (1 when any) and the largest matching context token's
weight (1 when there are none), weight = the token's train TPR − FPR; 0 when the rule does not match.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from .lookups import EXPLAINER, Candidate, choose_tokens, token_key
from .records import ExplanationRecord

INACTIVE_FRACTION = 0.1
"""A window of a train 'random' prompt is a negative when the unit's activation at its last token is at
most this fraction of the unit's largest top train activation (at most 0 when that is not positive): the
bound of the mine stage's held-out negatives (`stages/mine/negatives.py`, `NEGATIVE_FRACTION`)."""


@dataclass(frozen=True)
class OcclusionRecord:
    """One train 'top' prompt of one unit (a line of `occlusions.jsonl`): the unit's activation at the
    prompt's last token with each earlier context token occluded in turn."""

    unit_id: str
    split: str
    """'train'."""
    rank: int
    """The prompt's rank among the unit's 'top' prompts of the split (as in `contexts.jsonl`)."""
    n_tokens: int
    """Context tokens of the prompt (no BOS)."""
    offset: int
    """Tokens run in front of the context tokens (1 with BOS, else 0); never occluded."""
    last_token_id: int
    last_token: str
    """The last token's text (`inputs.tokens.token_strings`: word-start marker as a leading space)."""
    activation: float
    """The unit's activation at the last token, the prompt run as is (BOS in front when configured)."""
    replacement_id: int
    """The token every occluded position is replaced by (`inputs.view.pad_id`)."""
    tokens: list[dict] = field(default_factory=list)
    """Every context token before the last, in order: `position` (0-based in the context tokens),
    `token_id`, `token`, `activation` (occluded), `drop` (`activation` of the record − occluded)."""
    status: str = "ok"
    """'ok', 'one_token' (nothing before the last token to occlude) or 'inactive' (activation ≤ 0 as run)."""


# -- negatives -----------------------------------------------------------------------------------


def inactive_windows(lengths: Sequence[int], candidates: Sequence[tuple[Sequence[int], Sequence[float]]],
                     bound: float) -> list[list[int]]:
    """One negative per positive length where one is found: a window of a candidate prompt ('random'
    train prompts: tokens and the unit's activation at each), of exactly that length, ending at a token
    where the activation is at most `bound`. Positive i tries candidate i mod n first, then the next
    ones; within a candidate, the latest end first; each (candidate, end) is used once."""
    used: set[tuple[int, int]] = set()
    out = []
    n = len(candidates)
    for i, length in enumerate(lengths):
        for k in range(n):
            c = (i + k) % n
            tokens, acts = candidates[c]
            end = next((e for e in range(len(tokens) - 1, length - 2, -1)
                        if (c, e) not in used and acts[e] <= bound), None)
            if end is not None and length >= 1:
                used.add((c, end))
                out.append([int(t) for t in tokens[end - length + 1:end + 1]])
                break
    return out


# -- the explainer -------------------------------------------------------------------------------


def _entry(c: Candidate, n_p: int, n_n: int, context: bool) -> dict:
    out = {"key": c.key, "token_ids": sorted(c.ids), "tokens": sorted(c.tokens), "n_positive": len(c.positive),
           "n_negative": len(c.negative), "weight": c.weight(n_p, n_n)}
    if context:
        out["mean_drop"] = sum(c.values) / len(c.values)
    return out


def explain_unit(records: Sequence[OcclusionRecord], negatives: Sequence[Sequence[int]], *, min_drop: float,
                 max_tokens: int, min_support: int,
                 merge: bool) -> tuple[str | None, dict, str | None]:
    """The look-up explanation of one unit: (text, pattern, error) from its occlusion records (train 'top'
    prompts) and its negatives (token lists). `text` is None when there is nothing to say (`error` says why); the pattern always carries the counts
    (`n_positive`, `n_negative`, `n_one_token`, `n_inactive`)."""
    positives = [r for r in records if r.status != "inactive"]
    counts = {"n_positive": len(positives), "n_negative": len(negatives),
              "n_one_token": sum(r.status == "one_token" for r in records),
              "n_inactive": sum(r.status == "inactive" for r in records)}
    pattern: dict = {"kind": "unit", "rule": "last_and_any_context", "last_tokens": [], "context_tokens": [],
                     **counts}
    if not positives:
        return None, pattern, "no_examples: the unit is active on none of its train top prompts"
    if not negatives:
        return None, pattern, "no_negatives: no train prompt window where the unit is inactive was found"
    n_p, n_n = len(positives), len(negatives)
    last: dict[str, Candidate] = {}
    context: dict[str, Candidate] = {}
    for i, r in enumerate(positives):
        c = last.setdefault(token_key(r.last_token, merge), Candidate(token_key(r.last_token, merge)))
        c.ids.add(r.last_token_id)
        c.tokens.add(r.last_token)
        c.positive.add(i)
        for t in r.tokens:
            if r.activation > 0 and t["drop"] >= min_drop * r.activation:
                key = token_key(t["token"], merge)
                c = context.setdefault(key, Candidate(key))
                c.ids.add(t["token_id"])
                c.tokens.add(t["token"])
                c.positive.add(i)
                c.values.append(t["drop"] / r.activation)
    for j, tokens in enumerate(negatives):
        present = set(tokens)
        for c in last.values():
            if tokens and tokens[-1] in c.ids:
                c.negative.add(j)
        for c in context.values():
            if c.ids & present:
                c.negative.add(j)
    last = {k: c for k, c in last.items() if len(c.positive) >= min_support}
    context = {k: c for k, c in context.items() if len(c.positive) >= min_support}
    # any last token, context tokens greedily
    ctx_a, tp_a, fp_a, value_a = choose_tokens(context, n_p, n_n, max_tokens)
    # last tokens greedily, then context tokens within
    last_b, tp_l, fp_l, _ = choose_tokens(last, n_p, n_n, max_tokens)
    ctx_b, tp_b, fp_b, value_b = choose_tokens(context, n_p, n_n, max_tokens, within=(tp_l, fp_l)) if last_b \
        else ([], tp_l, fp_l, 0.0)
    chosen_last, chosen_ctx, value, tp, fp = ([], ctx_a, value_a, tp_a, fp_a) if value_a >= value_b or not last_b \
        else (last_b, ctx_b, value_b, tp_b, fp_b)
    if not chosen_last and not chosen_ctx:
        return None, pattern, ("no_pattern: no last token or context token that matters separates the top "
                               "train prompts from the inactive ones")
    pattern["last_tokens"] = [_entry(c, n_p, n_n, False) for c in chosen_last]
    pattern["context_tokens"] = [_entry(c, n_p, n_n, True) for c in chosen_ctx]
    pattern["train_balanced_accuracy"] = value
    pattern["n_positive_matched"], pattern["n_negative_matched"] = len(tp), len(fp)
    return explanation_text(pattern), pattern, None


def explanation_text(pattern: dict) -> str:
    """One readable sentence from a unit pattern and its counts."""
    n_p, n_n = pattern["n_positive"], pattern["n_negative"]

    def shown(t: dict) -> str:
        return " / ".join(f'"{s}"' for s in t["tokens"])

    if pattern["last_tokens"]:
        head = "The unit fires on " + " or ".join(
            f"{shown(t)} (the last token of {t['n_positive']} of {n_p} top prompts and of {t['n_negative']} of "
            f"{n_n} inactive ones)" for t in pattern["last_tokens"])
    else:
        head = "The unit fires on any token"
    if not pattern["context_tokens"]:
        return head + ", whatever precedes it."
    ctx = " or ".join(
        f"{shown(t)} (occluding it drops the activation by {t['mean_drop']:.0%} on average, on {t['n_positive']} "
        f"of {n_p} top prompts; present in {t['n_negative']} of {n_n} inactive ones)" for t in pattern["context_tokens"])
    return f"{head} when the context holds {ctx}."


def judge(pattern: dict | None, tokens: Sequence[int]) -> tuple[bool, float]:
    """The deterministic judge of one held-out prompt (its context tokens, the last one where the unit is
    read): (Yes, graded score), see the module doc."""
    if not pattern or not tokens or not (pattern.get("last_tokens") or pattern.get("context_tokens")):
        return False, 0.0
    last = int(tokens[-1])
    present = {int(t) for t in tokens}
    if pattern["last_tokens"]:
        weights = [t["weight"] for t in pattern["last_tokens"] if last in t["token_ids"]]
        if not weights:
            return False, 0.0
        last_weight = max(weights)
    else:
        last_weight = 1.0
    if not pattern["context_tokens"]:
        return True, float(last_weight)
    weights = [t["weight"] for t in pattern["context_tokens"] if present & set(t["token_ids"])]
    return (True, float(last_weight * max(weights))) if weights else (False, 0.0)


def explain_units(units: Sequence, occlusions: Sequence[OcclusionRecord],
                  negatives: dict[str, list[list[int]]], cfg) -> list[ExplanationRecord]:
    """An `ExplanationRecord` (explainer 'lookup', `head` None) per unit of `units` (`UnitRecord`s), from
    `occlusions.jsonl` and each unit's negatives (`inactive_windows`); `cfg` the explain section."""
    by_unit: dict[str, list[OcclusionRecord]] = defaultdict(list)
    for r in occlusions:
        by_unit[r.unit_id].append(r)
    out = []
    for u in units:
        unit_id = u.unit_id
        text, pattern, error = explain_unit(by_unit.get(unit_id, []), negatives.get(unit_id, []),
                                            min_drop=cfg.unit_lookup_min_drop, max_tokens=cfg.lookup_max_tokens,
                                            min_support=cfg.lookup_min_support, merge=cfg.lookup_merge)
        out.append(ExplanationRecord(
            unit_id=unit_id, head=None, explainer=EXPLAINER, text=text, status="ok" if text else "skipped",
            error=error, backend="none", model="", prompt_hash="", prompt_tokens=0, completion_tokens=0,
            cost_usd=0.0, n_active=pattern["n_positive"], n_inactive=pattern["n_negative"], pattern=pattern))
    return out
