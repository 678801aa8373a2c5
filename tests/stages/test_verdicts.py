"""Verdicts on scores (issue 18, point 4): the "well explained" badge rests on the interval of the
difference to each control, not on point values; near-identical explanations and a one-sided judge
are flagged. Judgements and explanations are built by hand here, so every verdict is known."""

from __future__ import annotations

import json

import numpy as np

from sae_lens_ctx.core.config import RunConfig, ScoreConfig
from sae_lens_ctx.core.records import ExplanationRecord, ScoreRecord, write_jsonl
from sae_lens_ctx.inputs.context import RunContext
from sae_lens_ctx.stages.score import verdicts
from sae_lens_ctx.stages.score.judge import Judgement
from sae_lens_ctx.stages.score.metrics import balanced_accuracy, bootstrap_ci, balanced_accuracy_along

CFG = ScoreConfig(bootstrap_resamples=1000)


def judged(task, unit, head, labels, answers, explainer="paper-round2"):
    return [Judgement(task, unit, head, f"{unit}/{head}", "top", r, bool(y), 1.0, answer=bool(a), p_yes=float(a),
                      explainer=explainer) for r, (y, a) in enumerate(zip(labels, answers))]


def record(unit, head, value, n, scorer="E"):
    return ScoreRecord(unit_id=unit, head=head, scorer=scorer, value=value, ci_low=None, ci_high=None, n=n,
                       explainer="paper-round2")


# E = 0.75 on 10 prompts: 6 active (all said Yes), 4 inactive (2 said No): TPR 1, TNR 0.5
Y10 = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
A10 = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]


def test_e_075_over_ten_prompts_gets_no_badge_beside_a_constant_control():
    real = judged("head", "U1", "H1", Y10, A10)
    constant = judged("head", "U1", "H1", Y10, [0] * 10)  # a token judge that never finds the token: E = 0.5
    e = balanced_accuracy(Y10, A10)
    lo, hi = bootstrap_ci(balanced_accuracy_along, (np.array(Y10, bool), np.array(A10, bool)), 1000, 0.95, 0)
    assert e == 0.75 and lo <= 0.5 and hi == 1.0  # the example: E = 0.75 [0.5, 1], n = 10
    out = verdicts.well_explained([record("U1", "H1", e, 10)], real, {("head", "U1", "H1"): {"token": constant}},
                                  CFG, 0, 0.67)
    row = out["scores"][0]
    assert row["value"] >= 0.67 and row["versus"]["token"]["difference"] == 0.25
    assert row["versus"]["token"]["paired"] and row["versus"]["token"]["ci_low"] <= 0  # the interval holds 0
    assert not row["badge"] and "token" in row["why"] and out["n_badges"] == 0


def test_a_clear_score_gets_the_badge_and_loses_it_to_a_control_that_scores_the_same():
    y = [1, 0] * 20
    real = judged("head", "U1", "H1", y, y)  # perfect on 40 prompts
    shuffled = judged("shuffled", "U1", "H1", y, [1, 1, 0, 0] * 10)  # E = 0.5 on the same prompts
    confounds = {("head", "U1", "H1"): {"length": judged("head", "U1", "H1", y, [0] * 40)}}
    scores = [record("U1", "H1", 1.0, 40)] + [
        ScoreRecord(unit_id=f"C{i}", head="H0", scorer="E", value=v, ci_low=None, ci_high=None, n=10, control=True,
                    control_kind="random_unit", explainer="paper-round2") for i, v in enumerate([0.4, 0.5, 0.6])]
    out = verdicts.well_explained(scores, real + shuffled, confounds, CFG, 0, 0.67)
    row = out["scores"][0]
    assert set(row["versus"]) == {"shuffled", "length", "random_units"}
    assert not row["versus"]["random_units"]["paired"] and row["versus"]["random_units"]["difference"] == 0.5
    assert all(v["ci_low"] > 0 for v in row["versus"].values()) and row["badge"]
    # the same score beside a length judge that answers as well as it does: no badge
    confounds[("head", "U1", "H1")]["length"] = judged("head", "U1", "H1", y, y)
    row = verdicts.well_explained(scores, real + shuffled, confounds, CFG, 0, 0.67)["scores"][0]
    assert row["versus"]["length"]["difference"] == 0 and not row["badge"] and "length" in row["why"]
    # below the threshold: no badge whatever the controls say
    low = verdicts.well_explained([record("U1", "H1", 0.6, 40)], real, {}, CFG, 0, 0.67)["scores"][0]
    assert not low["badge"] and "below" in low["why"]


def test_the_report_reads_the_badge_from_the_summary(tmp_path):
    """A run whose scores row says E = 0.75 [0.5, 1] over 10 prompts (the issue's example): no badge in
    the report, because summary.json's difference to its control holds 0; a row the summary badges shows one."""
    from sae_lens_ctx.stages.report import html as dashboard

    write_jsonl(tmp_path / "units.jsonl", [dict(unit_id="U1", kind="neuron", layer=2, index=1, token=" x", token_id=4,
                                                congruence=1.0, control=False)])
    rows = [dict(unit_id="U1", head=h, scorer="E", value=v, ci_low=lo, ci_high=1.0, n=n, explainer="paper-round2",
                 control_kind=None) for h, v, lo, n in (("L0H1", 0.75, 0.5, 10), ("L0H2", 1.0, 1.0, 40),
                                                             ("L0H3", 0.9, 0.7, 10))]
    write_jsonl(tmp_path / "scores.jsonl", rows)
    # L0H3: its own interval lies above 0.5 and no confound record is in scores.jsonl, yet the summary's
    # difference to its controls holds 0 (say, to random units): no badge either
    well = {"threshold": 0.67, "n_badges": 1, "n_scores": 3, "rule": "", "scores": [
        dict(r, badge=r["head"] == "L0H2", why="", versus={}) for r in rows]}
    (tmp_path / "summary.json").write_text(json.dumps({"headline": {}, "well_explained": well}))
    dashboard.run_stage(RunContext(out=tmp_path, config=RunConfig()))
    page = (tmp_path / dashboard.REPORT_FILE).read_text().split('id="summary"')[0]
    cells = {h: [row for row in page.split("<tr>") if row.startswith(f"<td>{h}</td><td>paper-round2</td><td>E</td>")]
             for h in ("L0H1", "L0H2", "L0H3")}
    assert all(len(c) == 1 for c in cells.values())
    assert ["well explained" in c[0] for c in cells.values()] == [False, True, False]
    assert "well explained: 1 of 3 E scores" in page


def test_near_identical_explanations_across_units_are_flagged():
    def explained(unit, head, text):
        return ExplanationRecord(unit_id=unit, head=head, explainer="paper-round2", text=text, status="ok", error=None,
                                 backend="b", model="m", prompt_hash="", prompt_tokens=0, completion_tokens=0,
                                 cost_usd=0.0)

    rows = [explained("U1", None, "Words related to community."),
            explained("U2", None, "words related to the community"),  # Jaccard 4/5
            explained("U3", None, "WORDS, related to community!"),     # the same words
            explained("U4", None, "mentions of rivers and mills"),
            explained("U4", "L0H1", "mentions of rivers and mills"),   # the same unit: fine
            explained("U5", None, "words related to towns")]           # Jaccard 3/5
    groups = verdicts.near_identical(rows)
    assert len(groups) == 1 and groups[0]["n_units"] == 3
    assert {m["unit_id"] for m in groups[0]["members"]} == {"U1", "U2", "U3"}
    out = verdicts.flags(rows, [])
    assert len(out["messages"]) == 1 and "3 units have near-identical explanations" in out["messages"][0]
    assert out["one_sided_judge"] is None


def test_a_judge_that_answers_one_way_almost_always_is_flagged():
    def judge(n_yes, n):
        return judged("head", "U1", "H1", [1] * n, [1] * n_yes + [0] * (n - n_yes))

    for n_yes, flagged in ((5, True), (10, False), (50, False), (90, False), (95, True)):
        out = verdicts.flags([], judge(n_yes, 100))
        assert out["one_sided_judge"]["yes_share"] == n_yes / 100 and out["one_sided_judge"]["flagged"] == flagged
        assert bool(out["messages"]) == flagged
    unparsed = [Judgement("head", "U1", "H1", "U1/H1", "top", r, True, 1.0, status="unparsed") for r in range(50)]
    assert verdicts.flags([], judge(20, 100) + unparsed)["one_sided_judge"]["n"] == 100  # parsed ones only
