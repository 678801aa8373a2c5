"""Confound controls beside every score: judges that read no explanation.

A real score means something only where it beats a judge that could not have read the explanation.
Two such judges answer every held-out prompt a real judge answered, and are scored with the same
metrics, prompts, labels and bootstrap intervals (`score.score_group`, `score.simulation_score`):

* **length** (`control_kind='length'`, `explainer='length'`): a rule on the prompt's token length,
  fitted on the train split and applied to the held-out prompts. Its direction (longer or shorter
  means Yes) and boundary are the ones of highest balanced accuracy on the train prompts of the same
  question (a pair: the unit's train 'top' prompts, labelled by the head's activity there; a unit:
  its train 'top' prompts against its train 'random' ones). Its graded score, for AUROC, is the
  length signed by the direction. As a simulator (`unit_sim_correlation`) it predicts the activation
  from the length by least squares on the unit's train prompts.
* **token** (`control_kind='token'`, `explainer='token'`): Yes when the unit's token (`UnitRecord.token_id`)
  occurs in the prompt; its graded score is how often it occurs; as a simulator it predicts 10 × that.

`length_gaps` says where the held-out prompts of the paper's head score differ in length between
active and inactive prompts (the gap a length judge can exploit there).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ...core.records import CONFOUND_CONTROLS, ScoreRecord
from .judge import Judgement
from .metrics import balanced_accuracy, score_group, simulation_score

if TYPE_CHECKING:
    from ...core.config import ScoreConfig
    from .jobs import Inputs

LENGTH_GAP = 0.10
"""A relative difference of mean token lengths between two classes of held-out prompts above which
the summary reports a length gap."""


def fit_length_rule(lengths: Sequence[float], labels: Sequence[bool]) -> tuple[int, float] | None:
    """(direction, boundary) of the length rule `direction · (length − boundary) > 0` ⇒ Yes with the
    highest balanced accuracy on these (train) prompts; direction +1 (longer means Yes) or −1, boundary
    a midpoint between distinct lengths (ties: the first found, longer-means-Yes first). None with one
    class only."""
    x, y = np.asarray(lengths, float), np.asarray(labels, bool)
    if y.all() or not y.any():
        return None
    values = np.unique(x)
    cuts = np.concatenate([[values[0] - 0.5], (values[:-1] + values[1:]) / 2, [values[-1] + 0.5]])
    best: tuple[float, int, float] | None = None
    for direction in (1, -1):
        for cut in cuts:
            e = balanced_accuracy(y, direction * (x - cut) > 0)
            if best is None or e > best[0]:
                best = (e, direction, float(cut))
    return best[1], best[2]


def _judgement(j: Judgement, answer: bool, graded: float) -> Judgement:
    return replace(j, answer=bool(answer), p_yes=float(graded), status="ok", reply=None, error=None)


def _control_groups(judgements: Sequence[Judgement], inp: Inputs):
    """Per real (task, unit, head) group: its judgements on known prompts, their tokens, the unit token's
    counts, the train rows the length rule was fitted on, and each confound judge's judgements."""
    prompt = {(c.unit_id, c.kind, c.rank): c for per in inp.test.values() for rows in per.values() for c in rows}
    heads = {(h.unit_id, h.head): h for h in inp.pairs}
    groups: dict[tuple, list[Judgement]] = defaultdict(list)
    for j in judgements:
        if j.task in ("head", "unit"):
            groups[(j.task, j.unit_id, j.head)].append(j)
    for (task, unit_id, head), js in groups.items():
        unit = inp.units.get(unit_id)
        js = [j for j in js if (unit_id, j.kind, j.rank) in prompt]
        tokens = [prompt[(unit_id, j.kind, j.rank)].tokens for j in js]
        train = inp.train.get(unit_id, {})
        if task == "head":
            rows = train.get("top", [])
            pair = heads.get((unit_id, head))
            active = set(pair.active_train_ranks if pair else [])
            rule = fit_length_rule([len(c.tokens) for c in rows], [c.rank in active for c in rows])
        else:
            rows = train.get("top", []) + train.get("random", [])
            rule = fit_length_rule([len(c.tokens) for c in rows], [c.kind == "top" for c in rows])
        token_id = unit.token_id if unit else None
        counts = [sum(t == token_id for t in ts) for ts in tokens]
        judged = {"token": [_judgement(j, n > 0, n) for j, n in zip(js, counts)]}
        if rule is not None:
            d, cut = rule
            judged["length"] = [_judgement(j, d * (len(t) - cut) > 0, d * len(t)) for j, t in zip(js, tokens)]
        yield task, unit_id, head, bool(unit and unit.control), js, tokens, counts, rows, judged


def confound_judgements(judgements: Sequence[Judgement], inp: Inputs) -> dict[tuple, dict[str, list[Judgement]]]:
    """(task, unit_id, head) → confound control name → its answers on the group's prompts (the
    judgements `control_scores` scores), for comparisons prompt by prompt with the real judge."""
    return {(task, unit_id, head): judged for task, unit_id, head, *_, judged in _control_groups(judgements, inp)}


def control_scores(judgements: Sequence[Judgement], inp: Inputs, cfg: ScoreConfig, seed: int) -> list[ScoreRecord]:
    """The length and token controls of every real pair and unit score (see the module doc)."""
    out: list[ScoreRecord] = []
    for task, unit_id, head, control, js, tokens, counts, rows, judged in _control_groups(judgements, inp):
        prefix = "" if task == "head" else "unit_"
        for name in CONFOUND_CONTROLS:
            tag = dict(explainer=name, control_kind=name)
            if name not in judged:
                out += [ScoreRecord(unit_id=unit_id, head=head, scorer=f"{prefix}{m}", value=None, ci_low=None,
                                    ci_high=None, n=0, control=control, skipped="one class only on the train side",
                                    **tag) for m in ("E", "auroc")]
                continue
            out += [replace(r, **tag) for r in score_group(judged[name], unit_id, head, prefix, control, cfg, seed)]
        if task == "unit":
            out += _simulation_controls(js, tokens, counts, rows, unit_id, control, cfg, seed)
    return out


def _simulation_controls(js, tokens, counts, train_rows, unit_id, control, cfg, seed) -> list[ScoreRecord]:
    """`unit_sim_correlation` of the length simulator (least squares of activation on length, train) and
    the token simulator (10 × occurrences); `simulation_score` reads 10 · p_yes as the simulation."""
    out = []
    x = np.array([len(c.tokens) for c in train_rows], float)
    a = np.array([c.activation for c in train_rows], float)
    if x.size > 1 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, a, 1)
        sim = [_judgement(j, True, (intercept + slope * len(t)) / 10.0) for j, t in zip(js, tokens)]
        out.append(replace(simulation_score(sim, unit_id, control, cfg, seed), explainer="length",
                           control_kind="length"))
    else:
        out.append(ScoreRecord(unit_id=unit_id, head=None, scorer="unit_sim_correlation", value=None, ci_low=None,
                               ci_high=None, n=0, control=control, skipped="constant length on the train side",
                               explainer="length", control_kind="length"))
    sim = [_judgement(j, n > 0, float(n)) for j, n in zip(js, counts)]
    out.append(replace(simulation_score(sim, unit_id, control, cfg, seed), explainer="token", control_kind="token"))
    return out


def length_gaps(judgements: Sequence[Judgement], inp: Inputs) -> dict[str, Any]:
    """Per scored pair, the mean token length of its held-out active and inactive prompts; the pairs
    whose means differ by more than `LENGTH_GAP` (relative to the larger), and the same for units'
    top versus low prompts, with a sentence saying so."""
    prompt = {(c.unit_id, c.kind, c.rank): len(c.tokens) for per in inp.test.values() for rows in per.values()
              for c in rows}
    classes: dict[tuple, dict[bool, list[int]]] = defaultdict(lambda: {True: [], False: []})
    for j in judgements:
        if j.task in ("head", "unit") and j.label is not None and (j.unit_id, j.kind, j.rank) in prompt:
            classes[(j.task, j.unit_id, j.head)][j.label].append(prompt[(j.unit_id, j.kind, j.rank)])
    rows = []
    for (task, unit_id, head), c in sorted(classes.items(), key=lambda kv: str(kv[0])):
        if not c[True] or not c[False]:
            continue
        pos, neg = float(np.mean(c[True])), float(np.mean(c[False]))
        gap = abs(pos - neg) / max(pos, neg)
        if gap > LENGTH_GAP:
            rows.append({"task": task, "unit_id": unit_id, "head": head, "mean_tokens_positive": round(pos, 2),
                         "mean_tokens_negative": round(neg, 2), "relative_gap": round(gap, 3)})
    heads = [r for r in rows if r["task"] == "head"]
    words = []
    if heads:
        words.append(f"{len(heads)} scored pairs have a length gap over {LENGTH_GAP:.0%} between their active and "
                     "inactive held-out prompts: a judge can tell them apart by length alone (see the length control)")
    if len(rows) > len(heads):
        words.append(f"{len(rows) - len(heads)} units have a length gap over {LENGTH_GAP:.0%} between their held-out "
                     "positives and negatives")
    return {"threshold": LENGTH_GAP, "gaps": rows, "verdict": "; ".join(words) or "no length gap between classes"}
