"""The score stage: the paper's E, AUROC from P(Yes), simulate-and-score, controls and intervals.

A planted run directory (units, held-out contexts, heads with known held-out labels, explanations)
is written by the tests in the stages' record formats. The judge is either `KeywordJudge`, an
offline backend made for these tests (it answers Yes exactly when the explanation's last word occurs
in the example, with fixed logprobs, so every score can be computed by hand), or the embedded SmolLM2.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from sae_lens_ctx.stages import score
from sae_lens_ctx.core.config import RunConfig
from sae_lens_ctx.core.llm import TokenLogprob
from sae_lens_ctx.inputs.context import RunContext
from sae_lens_ctx.core.records import iter_jsonl
from scored_run import (CONTROL, CONTROL_HEAD, HEAD_A, HEAD_ALL, HEAD_B, HEAD_FAILED, LOW, P_NO, P_YES, TOP, UNIT,
                        KeywordJudge, MumblingJudge, write_planted_run)


def make_ctx(out, backend=KeywordJudge.backend, **score_cfg):
    cfg = RunConfig.from_dict({"explain": {"backend": backend, "cache": False},
                               "score": {"bootstrap_resamples": 200, **score_cfg}})
    return RunContext(out=out, config=cfg)


def scores_of(out, control_kind=None) -> dict[tuple, dict]:
    """The judge's scores (or one confound control's, `control_kind` 'length' / 'token') by (unit, head, scorer)."""
    return {(s["unit_id"], s["head"], s["scorer"]): s for s in iter_jsonl(out / "scores.jsonl")
            if (s["control_kind"] if s["control_kind"] in ("length", "token") else None) == control_kind}


# --------------------------------------------------------------------------------------------
# Pure metrics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply, answer", [
    ("Yes", True), ("yes.", True), ("**Yes**", True), ("Answer: No", False), (" NO!", False),
    ("No, it is not", False), ("Maybe", None), ("", None), (None, None), ("I think yes", True)])
def test_replies_are_parsed_robustly_and_the_rest_is_unparseable(reply, answer):
    assert score.parse_answer(reply) is answer


def test_p_yes_sums_variants_and_normalises_over_yes_and_no():
    pos = TokenLogprob("Yes", math.log(0.5), [("Yes", math.log(0.5)), (" yes", math.log(0.1)), ("No", math.log(0.2)),
                                               ("Maybe", math.log(0.2))])
    assert score.p_yes([pos]) == pytest.approx(0.6 / 0.8)
    assert score.p_yes(None) is None
    assert score.p_yes([TokenLogprob("Hmm", -0.1, [("Hmm", -0.1)])]) is None


def test_balanced_accuracy_auroc_and_constant_judges_by_hand():
    y = [True, True, True, False, False, False]
    p = [True, True, False, True, False, False]
    assert score.balanced_accuracy(y, p) == pytest.approx(0.5 * (2 / 3 + 2 / 3))
    assert score.balanced_accuracy(y, [True] * 6) == 0.5 and score.balanced_accuracy(y, [False] * 6) == 0.5
    assert score.balanced_accuracy([True, True], [True, False]) is None
    assert score.balanced_accuracy([True, True], [True, False], single_class="single-rate") == 0.5
    assert score.balanced_accuracy([], []) is None
    # positives .9 .9 .2 vs negatives .2 .2 .9: 4 wins, 2 + 2 ties of the 9 pairs → 6/9
    assert score.auroc(y, [0.9, 0.9, 0.2, 0.2, 0.2, 0.9]) == pytest.approx(6 / 9)
    assert score.auroc(y, [1.0] * 6) == 0.5
    assert score.auroc([True, True], [0.1, 0.2]) is None


def test_bootstrap_interval_is_the_percentile_interval_computed_by_hand():
    y = np.array([True, False, True, False, True, False, True, True])
    p = np.array([True, False, False, False, True, True, True, True])
    lo, hi = score.bootstrap_ci(score.balanced_accuracy_along, (y, p), 500, 0.9, seed=3)
    rng = np.random.default_rng(3)
    vals = []
    for idx in rng.integers(0, 8, size=(500, 8)):
        yy, pp = y[idx], p[idx]
        if yy.all() or not yy.any():
            continue
        vals.append(0.5 * ((pp & yy).sum() / yy.sum() + (~pp & ~yy).sum() / (~yy).sum()))
    assert (lo, hi) == pytest.approx(tuple(np.percentile(vals, [5, 95])))
    assert lo <= score.balanced_accuracy(y, p) <= hi


def test_aggregate_and_comparison_of_real_and_control():
    real, control = [0.9, 0.8, 0.85, 0.95, 0.7, 0.9], [0.5, 0.45, 0.55, 0.5, 0.6, 0.4]
    agg = score.aggregate(real, 1000, 0.95, seed=0)
    ci = stats.bootstrap((np.array(real),), np.mean, n_resamples=1000, method="percentile",
                         random_state=np.random.default_rng(0)).confidence_interval
    assert agg["mean"] == pytest.approx(np.mean(real)) and agg["std"] == pytest.approx(np.std(real, ddof=1))
    assert (agg["ci_low"], agg["ci_high"]) == pytest.approx((ci.low, ci.high))
    apart = score.compare(real, control, 1000, 0.95, seed=0)
    assert apart["distinguishable"] and apart["pvalue"] < 0.01 and apart["difference"] == pytest.approx(
        np.mean(real) - np.mean(control))
    same = score.compare(control, list(reversed(control)), 1000, 0.95, seed=0, paired=True)
    assert not same["distinguishable"] and "cannot be told apart" in same["verdict"]
    assert score.compare([], control, 100, 0.95, 0)["verdict"].startswith("cannot compare")


def test_paper_statistics_histogram_skew_and_well_explained():
    values = [0.25, 0.45, 0.55, 0.55, 0.65, 0.7, 0.8, 0.95, 1.0]
    s = score.paper_statistics(values, 0.67)
    assert s["histogram"]["counts"] == [0, 0, 1, 0, 1, 2, 1, 1, 1, 2] and sum(s["histogram"]["counts"]) == 9
    assert s["well_explained_fraction"] == pytest.approx(4 / 9)
    assert s["skew"] == pytest.approx(stats.skew(values))
    assert s["skewtest_pvalue"] == pytest.approx(stats.skewtest(values, alternative="greater").pvalue)
    assert score.paper_statistics([0.5, 0.6], 0.67)["skewtest_pvalue"] is None


def test_paper_statistics_as_the_authors_compute_them():
    """7_results at f97f993: the red bins are the last three of np.linspace(0, 1, 10), so E = 2/3 is well
    explained, and the std printed is np.std (ddof=0), written by hand in their loop as var / len."""
    from sae_lens_ctx.core.rules import PAPER_WELL_EXPLAINED

    values = [0.5, 2 / 3, (1 / 3 + 1) / 2, 0.75, 1.0, 0.25, 0.6]
    s = score.paper_statistics(values, PAPER_WELL_EXPLAINED)
    edges = np.linspace(0, 1, 10)
    red = sum(np.histogram(values, edges)[0][-3:])  # their plt.hist bins, the red three
    assert red == 4 and s["well_explained_fraction"] == pytest.approx(4 / 7)
    assert score.paper_statistics(values, 0.6666666667)["well_explained_fraction"] == pytest.approx(4 / 7)
    mean = sum(values) / len(values)
    std = (sum((x - mean) ** 2 for x in values) / len(values)) ** 0.5  # their loop, by hand
    assert s["std"] == pytest.approx(std, abs=1e-15) and s["std"] == pytest.approx(np.std(values), abs=1e-15)
    assert s["std_ddof1"] == pytest.approx(np.std(values, ddof=1), abs=1e-15)
    assert score.paper_statistics([0.5], PAPER_WELL_EXPLAINED)["std"] == 0.0


def test_shuffled_partners_never_give_a_pair_its_own_explanation():
    pairs = [("U1", "H1"), ("U1", "H2"), ("U2", "H1"), ("U3", "H4"), ("U3", "H5")]
    for seed in range(20):
        partner = score.shuffled_partner(pairs, seed)
        assert sorted(partner) == sorted(pairs) and sorted(partner.values()) == sorted(pairs)
        assert all(partner[k] != k for k in pairs)
    assert score.shuffled_partner([("U1", "H1")], 0) == {}


# --------------------------------------------------------------------------------------------
# The stage, with the keyword judge
# --------------------------------------------------------------------------------------------


def test_stage_scores_equal_hand_computed_values(tmp_path):
    write_planted_run(tmp_path)
    score.run_stage(make_ctx(tmp_path))
    s = scores_of(tmp_path)
    # HEAD_A: active on 0, 2, 4; the judge says Yes on 0, 2, 5 ("france") → TPR 2/3, TNR 2/3
    a = s[(UNIT, HEAD_A, "E")]
    assert a["value"] == pytest.approx(2 / 3) and a["n"] == 6 and (a["n_positive"], a["n_negative"]) == (3, 3)
    assert a["ci_low"] <= a["value"] <= a["ci_high"]
    assert s[(UNIT, HEAD_A, "auroc")]["value"] == pytest.approx(6 / 9)
    # HEAD_B ("louvre" on 1 and 3): perfect, with a degenerate interval
    b = s[(UNIT, HEAD_B, "E")]
    assert (b["value"], b["ci_low"], b["ci_high"]) == (1.0, 1.0, 1.0)
    assert s[(UNIT, HEAD_B, "auroc")]["value"] == 1.0
    # active on every held-out prompt: one class, skipped (round 2) and said so, never 0.5
    everywhere = s[(UNIT, HEAD_ALL, "E")]
    assert everywhere["value"] is None and everywhere["skipped"] == "one class only"
    # a failed explanation is not scored at all
    assert not any(k[1] == HEAD_FAILED for k in s)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["counts"]["not_scored"] == {"explanation failed": 1}
    assert {(k[1], k[2]) for k in s if k[0] == UNIT and k[2].startswith("unit_plus_head")} == {(HEAD_B, "unit_plus_head_E"), (HEAD_B, "unit_plus_head_auroc")}
    assert summary["counts"]["pairs_relevant"] == 5 and summary["counts"]["pairs_scored"] == 3
    # the unit's own explanation ("france"): top prompts 0, 2, 5 say Yes, no low prompt does
    u = s[(UNIT, None, "unit_E")]
    assert u["value"] == pytest.approx(0.5 * (3 / 6 + 3 / 3)) and (u["n_positive"], u["n_negative"]) == (6, 3)
    assert s[(UNIT, None, "unit_auroc")]["value"] == pytest.approx((3 * 3 + 0.5 * 3 * 3) / 18)
    # simulate-and-score: Pearson over top, low and random prompts of 10·P(Yes) against activation
    acts = [10.0 - r for r in range(6)] + [0.0, 0.5, 1.0] + [3.0]
    sim = [10 * (P_YES if "france" in t else P_NO) for t in TOP + LOW + [" france again"]]
    assert s[(UNIT, None, "unit_sim_correlation")]["value"] == pytest.approx(np.corrcoef(acts, sim)[0, 1])
    # unit + head: the joined explanation's last word is the head's keyword
    assert s[(UNIT, HEAD_B, "unit_plus_head_E")]["value"] == pytest.approx(0.5 * (2 / 6 + 2 / 3))
    # the control unit and its head are scored through the same path, marked as control
    assert s[(CONTROL, CONTROL_HEAD, "E")]["control"] and not a["control"]
    assert s[(CONTROL, CONTROL_HEAD, "E")]["value"] == pytest.approx(0.5 * (0 / 2 + 1 / 2))


def test_summary_holds_controls_with_intervals_and_the_head_versus_neuron_table(tmp_path):
    write_planted_run(tmp_path)
    score.run_stage(make_ctx(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    e = summary["headline"]["E"]
    assert e["real"]["n"] == 2 and e["real"]["mean"] == pytest.approx((2 / 3 + 1) / 2)
    assert e["random_units"]["n"] == 1
    assert "verdict" in e["real_minus_random_units"] and "verdict" in e["real_minus_shuffled"]
    assert not e["real_minus_random_units"]["distinguishable"]  # one control pair: no interval, said plainly
    assert "cannot be told apart" in e["real_minus_random_units"]["verdict"]
    assert summary["headline"]["constant_judges"]["always_yes_E"] == 0.5
    rows = {r["unit_id"]: r for r in summary["head_versus_neuron"]}
    assert rows[UNIT]["unit_E"] == pytest.approx(0.75) and rows[UNIT]["head_E_mean"] == pytest.approx(5 / 6)
    stats_real = summary["paper_statistics"]["real"]
    assert stats_real["n"] == 2 and stats_real["mean"] == pytest.approx(5 / 6)


def test_shuffled_control_judges_every_pair_with_another_pairs_explanation(tmp_path):
    write_planted_run(tmp_path)
    score.run_stage(make_ctx(tmp_path))
    shuffled = [j for j in iter_jsonl(tmp_path / "judgements.jsonl") if j["task"] == "shuffled"]
    own = {(j["unit_id"], j["head"]) for j in iter_jsonl(tmp_path / "judgements.jsonl") if j["task"] == "head"}
    assert {(j["unit_id"], j["head"]) for j in shuffled} == own
    assert all(j["explanation_of"] != f"{j['unit_id']}/{j['head']}" for j in shuffled)
    assert len({j["explanation_of"] for j in shuffled}) == len(own)  # a permutation of the explanations


def test_a_judge_that_never_answers_is_counted_never_scored(tmp_path):
    write_planted_run(tmp_path, unit_explanations=False)
    score.run_stage(make_ctx(tmp_path, backend=MumblingJudge.backend, shuffled_control=False))
    s = scores_of(tmp_path)
    a = s[(UNIT, HEAD_A, "E")]
    assert a["value"] is None and a["n_unparsed"] == 6 and a["n_parsed"] == 0 and a["skipped"] == "no parsed judgements"
    assert s[(UNIT, HEAD_A, "auroc")]["skipped"] == "no parsed judgements"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["counts"]["unparsed"] == summary["counts"]["judgements"] > 0
    assert summary["headline"]["E"]["real"]["mean"] is None


def test_round_one_rule_scores_single_class_pairs_with_the_one_rate(tmp_path):
    write_planted_run(tmp_path)
    score.run_stage(make_ctx(tmp_path, single_class="single-rate", unit_scores=False, shuffled_control=False))
    everywhere = scores_of(tmp_path)[(UNIT, HEAD_ALL, "E")]
    assert everywhere["value"] == pytest.approx(1 / 6)  # "city" occurs in one of the six active prompts: TPR


def test_missing_inputs_are_a_user_error(tmp_path):
    from sae_lens_ctx.core.errors import UserError

    write_planted_run(tmp_path)
    (tmp_path / "explanations.jsonl").unlink()
    with pytest.raises(UserError, match="run the explain stage first"):
        score.run_stage(make_ctx(tmp_path))


@pytest.mark.embedded
def test_embedded_judge_scores_every_pair_offline_with_intervals_and_controls(tmp_path):
    write_planted_run(tmp_path)
    ctx = make_ctx(tmp_path, backend="embedded", n_prompts=4)
    score.run_stage(ctx)
    s = scores_of(tmp_path)
    judgements = list(iter_jsonl(tmp_path / "judgements.jsonl"))
    assert judgements and all(j["status"] in ("ok", "unparsed") for j in judgements)
    assert all(j["p_yes"] is not None and 0.0 <= j["p_yes"] <= 1.0 for j in judgements if j["status"] == "ok")
    for pair in [(UNIT, HEAD_A), (UNIT, HEAD_B), (CONTROL, CONTROL_HEAD)]:
        for scorer in ("E", "auroc", "shuffled_E", "shuffled_auroc"):
            rec = s[(*pair, scorer)]
            assert rec["value"] is not None or rec["skipped"], rec
            assert rec["n_parsed"] + rec["n_unparsed"] + rec["n_failed"] == 4
    summary = json.loads((tmp_path / "summary.json").read_text())
    for scorer in ("E", "auroc"):
        for side in ("real", "random_units", "shuffled_explanations"):
            assert set(summary["headline"][scorer][side]) >= {"mean", "ci_low", "ci_high", "n"}
        assert summary["headline"][scorer]["real_minus_random_units"]["verdict"]
    calls = ctx.this_run["judge"]  # this invocation's calls (stages.json in a pipeline run)
    assert calls["backend_calls"] + calls["cache_hits"] == len(judgements) and calls["failed"] == 0
    assert summary["cost"]["judge_usd"] == 0.0 and summary["cost"]["total_usd"] == 0.0
    assert summary["cost"]["judge_prompt_tokens"] == sum(j["prompt_tokens"] for j in judgements) > 0


def test_explanations_with_template_markers_are_data_in_the_judge_prompts():
    from sae_lens_ctx.core import prompts

    hostile = 'active on {example} and {0} and """fenced""" text {explanation}'
    for variant in prompts.JUDGE_TEMPLATES:
        text = prompts.judge_messages(hostile, " the city", " paris", variant)[0]["content"]
        assert hostile in text and " the city paris" in text
    unit_text = score.unit_judge_messages(hostile, " the city")[0]["content"]
    assert hostile in unit_text and unit_text.count(" the city") == 1
