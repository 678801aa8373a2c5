"""Confound controls (issue 18): a hand-built run where only length separates the classes.

The judge here is `LengthJudge`, an offline backend made for this test: it never reads the explanation
and says Yes exactly when the example is long. Its unit scores are perfect, the length-only control
(fitted on the train split) scores the same, and the summary says the real score does not beat it.
"""

from __future__ import annotations

import json
import math

import pytest

from sae_lens_ctx.stages import score
from sae_lens_ctx.core.config import RunConfig
from sae_lens_ctx.stages.score.controls import fit_length_rule
from sae_lens_ctx.core.llm import BACKENDS, Response, TokenLogprob, register_backend
from sae_lens_ctx.inputs.context import RunContext
from sae_lens_ctx.core.records import iter_jsonl, write_jsonl
from scored_run import explanation_row, unit_row

UNIT = "L2N37"
LONG = " the river ran past the old mill and"  # 8 words: positives
SHORT = " so the"                                # 2 words: negatives


class LengthJudge:
    """Offline judge made for this test: Yes iff the example has at least 5 words (explanation unread)."""

    backend, model = "length-judge-for-tests", "length"

    def generate(self, messages, **params):
        empty = len(score.unit_judge_messages("x", "")[0]["content"].split())
        yes = len(messages[-1]["content"].split()) - empty >= 5
        p = 0.9 if yes else 0.1
        return Response(text="Yes" if yes else "No", logprobs=[TokenLogprob(
            "Yes" if yes else "No", math.log(p if yes else 1 - p), [("Yes", math.log(p)), ("No", math.log(1 - p))])],
            prompt_tokens=5, completion_tokens=1)


if LengthJudge.backend not in BACKENDS:
    register_backend(LengthJudge.backend, lambda cfg: LengthJudge())


def _ctx(split, kind, rank, text, act):
    words = text.split()
    return dict(unit_id=UNIT, split=split, kind=kind, rank=rank, doc_id=f"{split}{kind}{rank}", context_index=0,
                start=0, end=len(words), text=text, tokens=list(range(10, 10 + len(words))), activation=act,
                trimmed_activation=act, next_token_id=None, next_token=None)


def test_fit_length_rule_by_hand():
    assert fit_length_rule([8, 9, 2, 3], [True, True, False, False]) == (1, 5.5)
    assert fit_length_rule([2, 3, 8, 9], [True, True, False, False]) == (-1, 5.5)
    assert fit_length_rule([4, 4], [True, True]) is None


def test_a_judge_that_answers_by_length_does_not_beat_its_length_control(tmp_path):
    write_jsonl(tmp_path / "units.jsonl", [unit_row(UNIT, False)])
    contexts = [_ctx("train", "top", r, LONG, 5.0) for r in range(6)]
    contexts += [_ctx("train", "random", r, SHORT, 0.0) for r in range(6)]
    contexts += [_ctx("test", "top", r, LONG, 5.0 - 0.1 * r) for r in range(6)]
    contexts += [_ctx("test", "low", r, SHORT, -0.1 * r) for r in range(6)]
    write_jsonl(tmp_path / "contexts.jsonl", contexts)
    write_jsonl(tmp_path / "heads.jsonl", [])
    write_jsonl(tmp_path / "explanations.jsonl", [explanation_row(UNIT, None, "mentions of rivers")])
    cfg = RunConfig.from_dict({"explain": {"backend": LengthJudge.backend, "cache": False},
                               "score": {"bootstrap_resamples": 200}})
    score.run_stage(RunContext(out=tmp_path, config=cfg))
    records = list(iter_jsonl(tmp_path / "scores.jsonl"))
    by = {(r["scorer"], r["control_kind"]): r for r in records}
    assert by[("unit_E", None)]["value"] == 1.0 and by[("unit_auroc", None)]["value"] == 1.0
    assert by[("unit_E", "length")]["value"] == 1.0 and by[("unit_auroc", "length")]["value"] == 1.0
    assert by[("unit_E", "length")]["explainer"] == "length" and by[("unit_E", None)]["explainer"] == "paper-round2"
    assert by[("unit_E", "token")]["value"] == 0.5  # the unit's token occurs in no prompt: always No
    summary = json.loads((tmp_path / "summary.json").read_text())
    diff = summary["headline"]["unit_E"]["real_minus_length"]
    assert diff["difference"] == pytest.approx(0.0) and not diff["distinguishable"]
    assert any(w.startswith("unit_E: the real score does not beat its length-only control")
               for w in summary["confound_warnings"])
    assert any("length gap" in w for w in summary["confound_warnings"])  # 8 vs 2 tokens: reported
    badge = next(r for r in summary["well_explained"]["scores"] if r["scorer"] == "unit_E")
    assert badge["value"] == 1.0 and badge["versus"]["length"]["difference"] == 0 and not badge["badge"]


def test_report_opens_with_the_headline_and_gives_no_badge_where_real_and_control_overlap(tmp_path):
    """The same run reported: the headline box shows real versus the length-only judge with the verdict
    in words, and the unit's E of 1.0 gets no "well explained" badge (its length control scores 1.0
    too); checked in the HTML and, where chromium is installed, in the DOM a real browser renders."""
    from sae_lens_ctx.stages.report import html as dashboard

    test_a_judge_that_answers_by_length_does_not_beat_its_length_control(tmp_path)
    cfg = RunConfig.from_dict({"explain": {"backend": LengthJudge.backend, "cache": False}})
    dashboard.run_stage(RunContext(out=tmp_path, config=cfg))
    html = (tmp_path / dashboard.REPORT_FILE).read_text()
    assert html.index('id="headline"') < html.index('id="units"')  # the report opens with it
    assert "length-only judge" in html and "cannot be told apart" in html
    assert "does not beat its length-only control" in html
    assert "well explained" not in html.split('id="units"')[1].split('id="summary"')[0]  # no badge on any score
    assert "well explained: 0 of 1 E scores" in html.split('id="units"')[0]  # the headline box counts them
    from browser import CHROMIUM, Dom, chromium

    if CHROMIUM is None:
        return
    dom = Dom()
    dom.feed(chromium(["--dump-dom", (tmp_path / dashboard.REPORT_FILE).as_uri()], tmp_path / "profile"))
    headline = " ".join(dom.text.get("headline", []))
    assert "length-only judge" in headline and "cannot be told apart" in headline
    assert not any("well explained" in "".join(r) for rows in dom.rows.values() for r in rows)
