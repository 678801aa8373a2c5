"""What a run found, first (`stages/report/findings.py`): the ranking of findings, the verdict words, the
console's end-of-run summary and the report's first screen, on hand-built score tables with known answers."""

import json

from sae_lens_ctx.core.config import RunConfig
from sae_lens_ctx.core.records import write_jsonl
from sae_lens_ctx.inputs.context import RunContext
from sae_lens_ctx.stages.report import findings as fnd
from sae_lens_ctx.stages.report.tables import RunTables


def _units():
    return [dict(unit_id=u, kind="neuron", layer=2, index=i, token=t, token_id=i, congruence=1.0, control=c)
            for i, (u, t, c) in enumerate((("U1", " one", False), ("U2", " two", False), ("C1", " x", True)))]


def _score(unit, head, scorer, value, low, high, n=10, explainer="lookup", kind=None, control=False):
    return dict(unit_id=unit, head=head, scorer=scorer, value=value, ci_low=low, ci_high=high, n=n,
                explainer=explainer, control_kind=kind, control=control)


def _explained(unit, head, text, explainer="lookup", tokens=None):
    pattern = {"tokens": [{"tokens": tokens}]} if tokens else None
    return dict(unit_id=unit, head=head, explainer=explainer, text=text, status="ok", pattern=pattern)


def _compare(diff, low, high):
    return {"difference": diff, "ci_low": low, "ci_high": high, "distinguishable": low is not None and low > 0,
            "verdict": "words", "n_real": 4}


def _block(real, **controls):
    out = {"real": {"mean": real, "n": 4 if real is not None else 0}, "random_units": {"mean": 0.5, "n": 2}}
    for name, c in controls.items():
        out[f"real_minus_{name}"] = c
    return out


def tables(tmp_path, scores, explanations, summary):
    write_jsonl(tmp_path / "units.jsonl", _units())
    write_jsonl(tmp_path / "scores.jsonl", scores)
    write_jsonl(tmp_path / "explanations.jsonl", explanations)
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    return RunTables.load(tmp_path)


def test_findings_are_ranked_by_the_lower_end_of_their_interval_pairs_first(tmp_path):
    """A 0.95 over three prompts ([0.55, 1]) ranks below a 0.8 over forty ([0.7, 0.9]); at chance, on a control
    unit or a confound control: never a finding; the badge gives 'supported'."""
    scores = [_score("U1", "L1H1", "E", 0.95, 0.55, 1.0, n=3), _score("U1", "L1H2", "E", 0.8, 0.7, 0.9, n=40),
              _score("U2", "L1H1", "E", 0.7, 0.4, 0.9, explainer="paper-round2"),
              _score("U2", "L1H3", "E", 0.5, 0.3, 0.7),                      # chance: no finding
              _score("C1", "L1H1", "E", 0.9, 0.8, 1.0, control=True),        # control unit
              _score("U1", "L1H1", "E", 0.9, 0.8, 1.0, kind="length", explainer="length"),
              _score("U1", None, "unit_E", 0.75, 0.6, 0.9), _score("U2", None, "unit_E", 0.9, 0.5, 1.0)]
    ex = [_explained("U1", "L1H1", "looks up no", tokens=[" no"]), _explained("U1", "L1H2", "looks up not", tokens=[" not"]),
          _explained("U2", "L1H1", "mentions of counting", explainer="paper-round2"),
          _explained("U2", "L1H1", "looks up one", tokens=[" one", " One"]), _explained("U2", "L1H3", "x"),
          _explained("C1", "L1H1", "y"), _explained("U1", None, "fires on one"), _explained("U2", None, "fires on two")]
    well = {"scores": [dict(unit_id="U1", head="L1H2", scorer="E", explainer="lookup", badge=True)]}
    f = fnd.findings(tables(tmp_path, scores, ex, {"well_explained": well, "confound_warnings": ["a", "b"],
                                                   "flags": {"messages": ["c"]}}))
    assert [(x.unit_id, x.head) for x in f.pairs] == [("U1", "L1H2"), ("U1", "L1H1"), ("U2", "L1H1")]
    assert [x.verdict for x in f.pairs] == ["supported", "above-chance", "uncertain"]
    assert [x.unit_id for x in f.units] == ["U1", "U2"] and f.n_warnings == 3
    assert f.pairs[2].looked_up == [" one", " One"] and f.pairs[2].text == "mentions of counting"
    lines = fnd.console_lines(f)
    assert lines[1] == '  1. L1H2 → U1 " one" looks up " not": E 0.80 [0.70, 0.90], n=40, supported (lookup)'
    assert lines[2] == "     looks up not"
    assert lines[-1].startswith("3 warnings and flags") and "summary.json" in lines[-1]


def test_verdict_words_follow_the_intervals_of_the_differences():
    beats = fnd.verdict("lookup", "E", _block(0.9, random_units=_compare(0.4, 0.2, 0.6), shuffled=_compare(0.3, 0.1, 0.5)))
    assert (beats.verdict, beats.control, beats.difference) == ("beats controls", "shuffled", 0.3)
    apart = fnd.verdict("lookup", "E", _block(0.6, random_units=_compare(0.4, 0.2, 0.6), length=_compare(0.0, -0.1, 0.1)))
    assert (apart.verdict, apart.control) == ("not told apart", "length judge")
    below = fnd.verdict("x", "auroc", _block(0.3, random_units=_compare(-0.2, -0.3, -0.1)))
    assert below.verdict == "below a control" and below.interval() == "-0.20 [-0.30, -0.10]"
    assert fnd.verdict("x", "E", _block(None)).verdict == "not scored"


def test_a_run_with_no_finding_says_so_in_one_line_and_still_shows_the_verdict_table(tmp_path):
    """Every score at chance: one plain line on the console and on the report's first screen, and the verdict
    table beside it; a run whose explainers all skipped says that nothing was scored."""
    from sae_lens_ctx.stages.report import html as dashboard

    scores = [_score("U1", "L1H1", "E", 0.5, 0.3, 0.7), _score("U1", None, "unit_E", 0.45, 0.3, 0.6)]
    summary = {"headline": {"E": _block(0.5, random_units=_compare(0.0, -0.2, 0.2))}}
    res = tables(tmp_path, scores, [_explained("U1", "L1H1", "a"), _explained("U1", None, "b")], summary)
    lines = fnd.console_lines(fnd.findings(res))
    assert lines[1] == "  No finding: no explanation scored above chance (E > 0.5) on held-out prompts."
    assert any(line.split()[:2] == ["lookup", "E"] and line.endswith("not told apart") for line in lines)
    assert len(lines) <= 30
    dashboard.run_stage(RunContext(out=tmp_path, config=RunConfig()))
    first = (tmp_path / dashboard.REPORT_FILE).read_text().split('id="units"')[0]
    assert "No finding: no explanation scored above chance" in first and 'class="verdicts"' in first
    assert "<td>lookup</td><td>E</td>" in first

    skipped = tables(tmp_path, [_score("U1", "L1H1", "E", None, None, None, n=0)], [], summary)
    assert fnd.findings(skipped).none_line().startswith("No finding: nothing was scored")
