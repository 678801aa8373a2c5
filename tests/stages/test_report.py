"""The HTML report in a real headless browser (Debian's chromium, installed by .ci/run).

The rendered DOM is read back (`--dump-dom`) and the planted unit's page is checked: its trigger
contexts, its two planted heads, hostile text shown as text. Screenshots of the unit page and of the
unit list are saved into the run directory (`report/screenshot-*.png`) as CI artifacts, and must
differ: CSS `:target` shows one page at a time, with no JavaScript.
"""

import json
from dataclasses import asdict
from pathlib import Path

import pytest

import tracked_run
from browser import Dom, chromium
from sae_lens_ctx.core.records import ScoreRecord
from sae_lens_ctx.stages.report.html import context_html, unit_anchor
from sae_lens_ctx.pipeline.engine import RunDirectory, run_pipeline


def test_the_report_in_a_real_browser_shows_the_planted_unit(planted_gpt2, tmp_path_factory, tmp_path):
    base = tracked_run.build(planted_gpt2, tmp_path_factory.mktemp("tracked"))
    out = tracked_run.copy_run(base, tmp_path / "run")
    cfg = RunDirectory(out).read_config()
    cfg.logging.report_contexts = 100  # every train context, the hostile one (rank 99) included
    unit = f"L{planted_gpt2.answer.neuron_layer}N{planted_gpt2.answer.neuron_index}"
    with (out / "scores.jsonl").open("a") as f:  # a per-token simulation score, as the score stage writes one
        f.write(json.dumps(asdict(ScoreRecord(
            unit_id=unit, head=None, scorer="sim_ev_correlation", value=0.93, ci_low=0.81, ci_high=0.98, n=10,
            control=False, explainer="lookup", target="unit", metric="ev_correlation", tier="deterministic",
            n_tokens=320))) + "\n")
    run_pipeline(cfg, out, only="report")
    index = out / "report" / "index.html"
    page = unit_anchor(unit)

    dom = Dom()
    dom.feed(chromium(["--dump-dom", f"{index.as_uri()}#{page}"], tmp_path / "profile"))
    assert {"units", page, "summary"} <= set(dom.text)
    assert "script" not in dom.tags and "link" not in dom.tags and "iframe" not in dom.tags
    assert dom.srcs and all(src.startswith("data:image/png;base64,") for src in dom.srcs)  # self-contained

    # the unit list links to the unit page
    assert any(row and row[0] == unit for row in dom.rows["units"])
    # the unit page: its token, its trigger contexts, its two planted heads marked relevant, with ablation
    text = "".join(dom.text[page])
    assert planted_gpt2.answer.target_token in text
    contexts = dom.ctx_text[page]
    for trigger in planted_gpt2.answer.trigger_words.values():
        assert sum(trigger in c for c in contexts) >= 3, trigger
    heads = {row[0]: row for row in dom.rows[page] if len(row) == 8 and row[1] in ("relevant", "–")}  # heads table
    for layer, head in planted_gpt2.answer.heads:
        row = heads[f"L{layer}H{head}"]
        assert row[1] == "relevant" and float(row[4]) > 0.5  # ablation effect on the token probability
    assert sum(r[1] == "relevant" for r in heads.values()) == 2
    # hostile corpus and LLM text: shown as text, exactly, never as markup
    assert tracked_run.NASTY in contexts
    assert tracked_run.NASTY in text and "b" not in dom.tags
    # explanations and scores with their intervals
    assert "Active after the word louvre." in text and "[0.7, 1]" in text
    # each score row names its explainer and, for a per-token simulation, its tier (never pooled across tiers)
    sims = [row for row in dom.rows[page] if len(row) == 9 and row[3] == "deterministic"]
    assert [row[:8] for row in sims] == [["(unit)", "lookup", "sim_ev_correlation", "deterministic", "0.93",
                                          "[0.81, 0.98]", "10", "320"]], dom.rows[page][-5:]

    unit_png, list_png = out / "report" / "screenshot-unit.png", out / "report" / "screenshot-units.png"
    chromium(["--window-size=1280,1600", f"--screenshot={unit_png}", f"{index.as_uri()}#{page}"], tmp_path / "p1")
    chromium(["--window-size=1280,1600", f"--screenshot={list_png}", index.as_uri()], tmp_path / "p2")
    from PIL import Image

    with Image.open(unit_png) as shot:
        assert shot.size == (1280, 1600) and len(shot.getcolors(1 << 24)) > 50  # a rendered page, not a blank one
    assert unit_png.read_bytes() != list_png.read_bytes()  # `:target` shows the unit page, not the list


def test_context_html_escapes_every_token():
    pieces = ["<script>", "alert(1)", "</script>", " &amp;", ' "q"', " 'q'", " café ☕"]
    html = context_html(pieces, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "".join(pieces), 6.0, peak=6.0)
    assert "<script>" not in html and "&lt;script&gt;" in html and "&amp;amp;" in html
    assert "&quot;q&quot;" in html and "&#x27;q&#x27;" in html and "café ☕" in html
    assert html.count('class="tok') == len(pieces) and "rgba(255,140,0,1.00)" in html
    whole = context_html(None, None, "<i>x</i>", None, peak=0.0)
    assert "<i>" not in whole and "&lt;i&gt;x&lt;/i&gt;" in whole


def test_score_histograms_fit_the_report_and_mark_well_explained_only_on_e():
    """Six scorers (E and AUROC of the LLM's, the shuffled and the look-up explanations; confound controls
    left out): two panels per row at a fixed size, no two panels' labels overlapping, and the 0.67 line
    and red bins only on the E panels."""
    from matplotlib.colors import to_hex

    from sae_lens_ctx.stages.report.plots import MARK, PANEL, score_histograms
    from sae_lens_ctx.stages.report.tables import RunTables

    rows = []
    for i, v in enumerate([0.3, 0.55, 0.7, 0.72, 0.9, 1.0]):
        for scorer, explainer, kind in (("E", "paper-round2", None), ("auroc", "paper-round2", None),
                                        ("shuffled_E", "paper-round2", "shuffled"),
                                        ("shuffled_auroc", "paper-round2", "shuffled"),
                                        ("E", "lookup", None), ("auroc", "lookup", None), ("E", "length", "length")):
            rows.append(dict(unit_id=f"U{i % 2}", head=f"L0H{i}", scorer=scorer, value=v, explainer=explainer,
                             control_kind=kind, control=i == 5))
    fig = score_histograms(RunTables(Path("."), tables={"scores": rows, "units": []}), 0.67)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    titles = sorted(ax.get_title().split(" ")[0] for ax in axes)
    assert titles == ["E", "auroc", "lookup_E", "lookup_auroc", "shuffled_E", "shuffled_auroc"]
    assert tuple(fig.get_size_inches()) == pytest.approx((2 * PANEL[0], 3 * PANEL[1]))
    for ax in axes:
        e = ax.get_title().split(" ")[0].endswith("E")
        lines = [line.get_xdata()[0] for line in ax.lines]
        red = [p for p in ax.patches if to_hex(p.get_facecolor()) == MARK]
        assert (lines == [0.67]) if e else not lines, ax.get_title()
        assert (len(red) > 0) == e and all(p.get_x() >= 0.67 - 1e-9 for p in red)
    selected = axes[0].containers[0]  # the E panel's selected-units bars: 5 pairs, no length-control score
    assert axes[0].get_title().startswith("E ") and sum(p.get_height() for p in selected) == 5
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [ax.get_tightbbox(renderer) for ax in axes]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b)


PROBE = """<script>
const h = 900, seen = e => { const r = e.getBoundingClientRect(); return r.height > 0 && r.bottom <= h; };
const rows = [...document.querySelectorAll('#headline table.findings tbody tr')].filter(seen);
const verdicts = [...document.querySelectorAll('#headline table.verdicts tr')];
document.body.insertAdjacentHTML('beforeend', '<pre id="probe">' + JSON.stringify({height: h, width: innerWidth,
  findings: rows.map(r => [...r.cells].map(c => c.textContent)),
  verdicts: verdicts.length, verdicts_seen: verdicts.every(seen)}) + '</pre>');
</script>"""
"""Measures, in the browser's own layout at the window's width, which findings rows and whether the whole
verdict table lie inside the first 900 pixels (a 1400 × 900 screen, unscrolled: the page has no height-dependent
layout), and writes it into the DOM for `--dump-dom`."""


def test_the_first_screen_shows_a_finding_with_its_explanation_and_interval_and_the_verdict_table(planted_gpt2,
                                                                                                  tmp_path):
    """The whole pipeline on the planted model (offline test LLM): in a real browser at 1400 × 900 the
    report's first screen holds the planted look-up as a finding (its explanation text naming the trigger, its
    E with interval) and every row of the verdict table."""
    import json
    import re

    out = tracked_run.full_run(planted_gpt2, tmp_path / "full")
    index = out / "report" / "index.html"
    probe = index.with_name("probe.html")
    probe.write_text(index.read_text().replace("</body>", PROBE + "</body>"))
    dom = chromium(["--window-size=1400,900", "--dump-dom", probe.as_uri()], tmp_path / "profile")
    seen = json.loads(re.findall(r'<pre id="probe">(.*?)</pre>', dom, re.S)[-1].replace("&quot;", '"'))
    assert seen["width"] == 1400
    triggers = set(planted_gpt2.answer.heads.values())  # the token each planted head looks up
    found = [row for row in seen["findings"] if "looks up" in row[1] and any(f'"{t}"' in row[2] for t in triggers)]
    assert found, seen["findings"]
    assert re.fullmatch(r"E \d\.\d\d \[\d\.\d\d, \d\.\d\d\]", found[0][3]) and found[0][5] in (
        "supported", "above-chance", "uncertain")
    assert seen["verdicts"] >= 3 and seen["verdicts_seen"]  # the header and every row, unscrolled


def test_every_template_of_the_report_ships_as_package_data():
    """pyproject.toml's package-data globs cover every file of `stages/report/templates` (a wheel built from this
    checkout held all nine on 2026-12-07), and the environment escapes with autoescaping on."""
    import fnmatch
    import tomllib

    from sae_lens_ctx.stages.report import html as dashboard

    root = Path(__file__).resolve().parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "sae_lens_ctx.stages.report"]
    folder = root / "sae_lens_ctx" / "stages" / "report" / dashboard.TEMPLATES
    files = [p.relative_to(folder.parent).as_posix() for p in folder.iterdir()]
    assert files and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), (files, globs)
    assert dashboard.environment().autoescape is True
    assert dashboard.render("link.html", href="#x", text="<b>") == '<a href="#x">&lt;b&gt;</a>'
