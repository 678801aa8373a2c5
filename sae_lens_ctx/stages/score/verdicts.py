"""Verdicts on the scores, written once into `summary.json` for the report and W&B to read.

* **The "well explained" badge** (`well_explained`, paper-method §7.1's threshold): an E score (a
  pair's `E`, a unit's `unit_E`; the threshold is defined on E, not AUROC) gets it only where E ≥ the
  threshold up to float round-off (`logging.well_explained`, 2/3; `core.rules.at_least`) AND the
  bootstrap interval of the difference between it and each of its controls lies wholly above 0:

  - **paired** over the same held-out prompts, for the controls judged on exactly those prompts: the
    shuffled explanation (pairs), the length-only and the token-present judges (`controls.py`). Prompts
    are resampled together and the statistic is E(real) − E(control) on each resample
    (`metrics.bootstrap_ci`: resamples with one class only are dropped, as for every E interval);
  - **unpaired** against the random control units' scores of the same scorer (another unit: no prompt
    in common): this score's prompts and the control units' scores are resampled each on their own, and
    the statistic is E(real) on its resample − the mean of the resampled control scores.

  A control without scores (no random units in the run, a judge without a shuffled partner) is not
  required; one with scores but too few for an interval blocks the badge (the two cannot be told apart).
  So E = 0.75 [0.5, 1] over 10 prompts gets no badge beside a length judge at 0.5: the difference's
  interval holds 0.

* **Flags** (`flags`): explanations that read the same across different units (`near_identical`), and
  a judge that answers one way almost always (`one_sided_judge`); each with the evidence.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...core.config import ScoreConfig
from ...core.rules import at_least
from ...core.records import CONFOUND_CONTROLS, ExplanationRecord, ScoreRecord
from .judge import Judgement
from .metrics import balanced_accuracy, balanced_accuracy_along, bootstrap_ci

BADGE_SCORERS = {"E": "head", "unit_E": "unit"}
"""The E scorers a badge applies to, and the judge task whose prompts they are scored on."""

SIMILAR_JACCARD = 0.8
"""Two explanations of different units are near-identical when their word sets' Jaccard index is at least
this (or their normalized texts are equal)."""

ONE_SIDED = 0.1
"""A judge that says Yes to fewer than this share of its parsed judgements, or No to fewer, is flagged."""


def _scored(js: Sequence[Judgement]) -> dict[tuple, Judgement]:
    return {(j.kind, j.rank): j for j in js if j.status == "ok" and j.label is not None}


def _paired_difference(real: Sequence[Judgement], control: Sequence[Judgement], cfg: ScoreConfig,
                       seed: int) -> dict[str, Any]:
    """E(real) − E(control) over the prompts both answered, with the paired bootstrap interval."""
    a, b = _scored(real), _scored(control)
    keys = [k for k in a if k in b]
    y = np.array([a[k].label for k in keys], bool)
    ra, rb = np.array([a[k].answer for k in keys], bool), np.array([b[k].answer for k in keys], bool)
    e_a, e_b = balanced_accuracy(y, ra, cfg.single_class), balanced_accuracy(y, rb, cfg.single_class)
    out = {"paired": True, "n": len(keys), "control": e_b,
           "difference": None if e_a is None or e_b is None else e_a - e_b, "ci_low": None, "ci_high": None}
    if out["difference"] is not None:

        def diff(y, ra, rb, axis=-1):
            return (balanced_accuracy_along(y, ra, cfg.single_class, axis=axis)
                    - balanced_accuracy_along(y, rb, cfg.single_class, axis=axis))

        out["ci_low"], out["ci_high"] = bootstrap_ci(diff, (y, ra, rb), cfg.bootstrap_resamples, cfg.confidence,
                                                     seed)
    return out


def _unpaired_difference(real: Sequence[Judgement], controls: Sequence[float], cfg: ScoreConfig,
                         seed: int) -> dict[str, Any]:
    """E(real) − mean(control scores): `scipy.stats.bootstrap` resampling the real prompts and the control
    scores independently (`metrics.bootstrap_ci`, `paired=False`: resamples where E is undefined dropped)."""
    a = list(_scored(real).values())
    y, ra = np.array([j.label for j in a], bool), np.array([j.answer for j in a], bool)
    c = np.asarray(controls, float)
    e = balanced_accuracy(y, ra, cfg.single_class)
    out = {"paired": False, "n": len(a), "n_control": int(c.size), "control": float(c.mean()),
           "difference": None if e is None else e - float(c.mean()), "ci_low": None, "ci_high": None}
    if out["difference"] is None or len(a) < 2 or c.size < 2:
        return out

    def diff(i, v, axis=-1):
        return balanced_accuracy_along(y[i], ra[i], cfg.single_class, axis=axis) - np.mean(v, axis=axis)

    out["ci_low"], out["ci_high"] = bootstrap_ci(diff, (np.arange(len(a)), c), cfg.bootstrap_resamples,
                                                 cfg.confidence, seed, paired=False)
    return out


def well_explained(scores: Sequence[ScoreRecord], judgements: Sequence[Judgement],
                   confounds: dict[tuple, dict[str, list[Judgement]]], cfg: ScoreConfig, seed: int,
                   threshold: float) -> dict[str, Any]:
    """Per real E score of the selected units: its badge and the difference to each control (module doc).

    `confounds`: `controls.confound_judgements`. Returns {'threshold', 'rule', 'n_badges', 'scores': [...]}."""
    by_group: dict[tuple, list[Judgement]] = defaultdict(list)
    for j in judgements:
        by_group[(j.task, j.unit_id, j.head, j.explainer)].append(j)
    random_units = defaultdict(list)
    for s in scores:
        if s.control and s.control_kind == "random_unit" and s.value is not None:
            random_units[(s.scorer, s.explainer)].append(s.value)
    rows = []
    for s in scores:
        if s.scorer not in BADGE_SCORERS or s.control or s.control_kind is not None or s.value is None:
            continue
        task = BADGE_SCORERS[s.scorer]
        real = by_group[(task, s.unit_id, s.head, s.explainer)]
        versus: dict[str, dict] = {}
        if task == "head" and by_group.get(("shuffled", s.unit_id, s.head, s.explainer)):
            versus["shuffled"] = _paired_difference(real, by_group[("shuffled", s.unit_id, s.head, s.explainer)],
                                                    cfg, seed)
        for name in CONFOUND_CONTROLS:
            control = confounds.get((task, s.unit_id, s.head), {}).get(name)
            if control:
                versus[name] = _paired_difference(real, control, cfg, seed)
        if random_units.get((s.scorer, s.explainer)):
            versus["random_units"] = _unpaired_difference(real, random_units[(s.scorer, s.explainer)], cfg, seed)
        behind = [k for k, v in versus.items() if v["ci_low"] is None or v["ci_low"] <= 0]
        badge = at_least(s.value, threshold) and not behind
        why = (f"E ≥ {threshold:g} and the interval of the difference to every control lies above 0" if badge
               else f"E = {s.value:.3f} is below {threshold:g}" if not at_least(s.value, threshold)
               else "the interval of the difference holds 0 (or there is none) against: " + ", ".join(behind))
        rows.append({"unit_id": s.unit_id, "head": s.head, "scorer": s.scorer, "explainer": s.explainer,
                     "value": s.value, "ci_low": s.ci_low, "ci_high": s.ci_high, "n": s.n, "badge": badge,
                     "why": why, "versus": versus})
    return {"threshold": threshold, "n_badges": sum(r["badge"] for r in rows), "n_scores": len(rows),
            "rule": "E ≥ threshold and, for every control with scores, the bootstrap interval of real − control "
                    "above 0: paired over the same prompts (shuffled explanation, length-only and token-present "
                    "judges), unpaired against the random control units' scores",
            "scores": rows}


# -- flags ------------------------------------------------------------------------------------------


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def near_identical(explanations: Sequence[ExplanationRecord]) -> list[dict[str, Any]]:
    """Groups of explanations of *different units* that read the same: word sets (lower-cased, punctuation
    dropped; so equal normalized texts too) with a Jaccard index ≥ `SIMILAR_JACCARD`. Groups are the
    connected components of that relation; each lists its members and one text."""
    rows = [e for e in explanations if e.text]
    words = [_words(e.text) for e in rows]
    parent = list(range(len(rows)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(rows)):
        for k in range(i + 1, len(rows)):
            if rows[i].unit_id == rows[k].unit_id:
                continue
            union = words[i] | words[k]
            if union and len(words[i] & words[k]) / len(union) >= SIMILAR_JACCARD:
                parent[find(k)] = find(i)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(rows)):
        groups[find(i)].append(i)
    out = []
    for members in groups.values():
        units = {rows[i].unit_id for i in members}
        if len(units) > 1:
            out.append({"n_units": len(units), "text": rows[members[0]].text,
                        "members": [{"unit_id": rows[i].unit_id, "head": rows[i].head} for i in members]})
    return sorted(out, key=lambda g: -g["n_units"])


def one_sided_judge(judgements: Sequence[Judgement]) -> dict[str, Any] | None:
    """The judge's share of Yes over its parsed judgements of explanations (tasks 'head' and 'unit'), and
    whether it lies outside [`ONE_SIDED`, 1 − `ONE_SIDED`]; None without parsed judgements."""
    answered = [j.answer for j in judgements if j.status == "ok" and j.task in ("head", "unit")]
    if not answered:
        return None
    share = float(np.mean(answered))
    return {"yes_share": share, "n": len(answered), "bounds": [ONE_SIDED, 1 - ONE_SIDED],
            "flagged": not ONE_SIDED <= share <= 1 - ONE_SIDED}


def flags(explanations: Sequence[ExplanationRecord], judgements: Sequence[Judgement]) -> dict[str, Any]:
    """`summary.json`'s `flags`: near-identical explanations across units, a one-sided judge, and one
    sentence per raised flag (`messages`, shown in the report's headline box)."""
    groups = near_identical(explanations)
    judge = one_sided_judge(judgements)
    messages = [f"{g['n_units']} units have near-identical explanations (normalized text equal or word-set Jaccard "
                f"≥ {SIMILAR_JACCARD:g}), e.g. {g['text']!r}: they say little about any one unit" for g in groups]
    if judge and judge["flagged"]:
        messages.append(f"the judge answers one way almost always: Yes to {judge['yes_share']:.1%} of {judge['n']} "
                        f"parsed judgements (outside [{ONE_SIDED:.0%}, {1 - ONE_SIDED:.0%}]); its E is close to a "
                        "constant judge's 0.5 by construction")
    return {"near_identical_explanations": groups, "similarity_rule": f"normalized text equal, or word-set Jaccard "
            f"≥ {SIMILAR_JACCARD:g}, between explanations of different units", "one_sided_judge": judge,
            "messages": messages}
