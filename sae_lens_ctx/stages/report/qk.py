"""The report's QK block on a unit's page (`qk.jsonl`, `stages/attribute/qk.py`): for each relevant head, its top
looked-up token on one representative active train prompt, as a small query × key heatmap of the gap over the
leading components and a bar of the key-side marginals. Plain HTML (styled cells and bars), no plotting library."""

from __future__ import annotations

import functools
import html
import json
from collections import Counter, defaultdict
from pathlib import Path

from ...core.lookups import leading

QK_FILE = "qk.jsonl"


@functools.lru_cache(maxsize=4)
def _grouped(path: str, mtime: float) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out[row["unit_id"]].append(row)
    return dict(out)


def qk_rows(out: Path, unit_id: str) -> list[dict]:
    """The unit's rows of `out/qk.jsonl` (none when the file is absent)."""
    path = Path(out) / QK_FILE
    if not path.is_file():
        return []
    return _grouped(str(path), path.stat().st_mtime).get(unit_id, [])


def _e(x) -> str:
    return html.escape(str(x))


def _color(value: float, peak: float) -> str:
    a = min(abs(value) / peak, 1.0) if peak > 0 else 0.0
    return f"rgba(214,96,77,{a:.2f})" if value >= 0 else f"rgba(67,147,195,{a:.2f})"


def heatmap_html(grid: dict, table: str = "gap") -> str:
    """A query (rows) × key (columns) table of `grid[table]`, cells shaded red (+) / blue (−) by magnitude."""
    cells = grid[table]
    peak = max((abs(v) for row in cells for v in row), default=0.0)
    head = "".join(f"<th>{_e(k)}</th>" for k in grid["key"])
    body = "".join(
        f"<tr><th>{_e(q)}</th>" + "".join(f'<td style="background:{_color(v, peak)}">{v:+.2f}</td>' for v in row)
        + "</tr>" for q, row in zip(grid["query"], cells))
    return (f'<table class="qk-grid"><caption>{table}: query × key components</caption>'
            f'<tr><th>query \\ key</th>{head}</tr>{body}</table>')


def bar_html(key: list[dict]) -> str:
    """The key-side marginals of the gap as horizontal bars (signed, with their share)."""
    peak = max((abs(e["gap"]) for e in key), default=0.0)
    rows = []
    for e in key:
        width = 100 * abs(e["gap"]) / peak if peak > 0 else 0
        share = "" if e.get("gap_share") is None else f" ({e['gap_share']:.0%})"
        rows.append(f'<tr><td>{_e(e["component"])}</td><td><div style="width:{width:.0f}px;height:0.8em;'
                    f'background:{_color(e["gap"], peak)}"></div></td><td>{e["gap"]:+.3f}{share}</td></tr>')
    return f'<table class="qk-bar"><caption>key side (gap, share)</caption>{"".join(rows)}</table>'


def qk_section(out: Path, unit_id: str) -> str:
    """The block for one unit ('' without QK records): per head, the token it looked up most often at its top
    source on active train prompts, that token's record with the largest look-up contribution (heatmap and bar),
    and how often the same key component leads the gap over those prompts."""
    rows = [r for r in qk_rows(out, unit_id) if r["split"] == "train" and r["active"] and r["status"] == "ok"]
    if not rows:
        return ""
    parts = ['<h3>Why the head attended there (QK split)</h3><p class=muted>For each relevant head\'s top looked-up '
             "token: the attention score's gap (the score at that position minus the attention-weighted mean) split "
             "exactly over query-side × key-side residual-stream components (docs/qk.md); red adds, blue takes.</p>"]
    by_head: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_head[r["head"]].append(r)
    for head, records in sorted(by_head.items()):
        tokens = Counter(r["token"] for r in records)
        token = tokens.most_common(1)[0][0]
        same = [r for r in records if r["token"] == token]
        best = max(same, key=lambda r: r["contribution"])
        leads = Counter(e["component"] for e in (leading(r["key"]) for r in same if r["gap"] > 0) if e is not None)
        lead, n = leads.most_common(1)[0] if leads else ("nothing", 0)
        parts.append(f"<h4>{_e(head)} looks up <code>{_e(token)}</code> (prompt {best['rank']}, position "
                     f"{best['position']}: attention {best['attention']:.2f}, gap {best['gap']:+.3f})</h4>"
                     f"<p class=muted>Key side led by {_e(lead)} on {n} of {len(same)} active train prompts that "
                     "looked this token up (the component adding most to the gap).</p>"
                     f'<div class="qk" style="display:flex;gap:2em;align-items:flex-start">{heatmap_html(best["grid"])}{bar_html(best["key"])}</div>')
    return "".join(parts)
