"""The report's QK block on a unit's page (`qk.jsonl`, `stages/attribute/qk.py`): for each relevant head, its top
looked-up token on one representative active train prompt, as a small query × key heatmap of the gap over the
leading components and a bar of the key-side marginals: the data here, the markup in `templates/qk.html` (styled
cells and bars, no plotting library)."""

from __future__ import annotations

import functools
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


def _color(value: float, peak: float) -> str:
    a = min(abs(value) / peak, 1.0) if peak > 0 else 0.0
    return f"rgba(214,96,77,{a:.2f})" if value >= 0 else f"rgba(67,147,195,{a:.2f})"


def heatmap(grid: dict, table: str = "gap") -> dict:
    """A query (rows) × key (columns) table of `grid[table]` for `templates/qk.html`: each cell its value and
    its shade, red (+) / blue (−) by magnitude."""
    cells = grid[table]
    peak = max((abs(v) for row in cells for v in row), default=0.0)
    return {"table": table, "key": grid["key"],
            "rows": [(q, [(v, _color(v, peak)) for v in row]) for q, row in zip(grid["query"], cells)]}


def bars(key: list[dict]) -> list[dict]:
    """The key-side marginals of the gap as horizontal bars (signed, with their share, width in px)."""
    peak = max((abs(e["gap"]) for e in key), default=0.0)
    return [{"component": e["component"], "gap": e["gap"], "share": e.get("gap_share"),
             "width": 100 * abs(e["gap"]) / peak if peak > 0 else 0, "color": _color(e["gap"], peak)} for e in key]


def qk_blocks(out: Path, unit_id: str) -> list[dict]:
    """The data of one unit's QK block (none without QK records): per head, the token it looked up most often at
    its top source on active train prompts, that token's record with the largest look-up contribution (heatmap
    and bars), and how often the same key component leads the gap over those prompts."""
    rows = [r for r in qk_rows(out, unit_id) if r["split"] == "train" and r["active"] and r["status"] == "ok"]
    by_head: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_head[r["head"]].append(r)
    blocks = []
    for head, records in sorted(by_head.items()):
        token = Counter(r["token"] for r in records).most_common(1)[0][0]
        same = [r for r in records if r["token"] == token]
        best = max(same, key=lambda r: r["contribution"])
        leads = Counter(e["component"] for e in (leading(r["key"]) for r in same if r["gap"] > 0) if e is not None)
        lead, n = leads.most_common(1)[0] if leads else ("nothing", 0)
        blocks.append({"head": head, "token": token, "record": best, "lead": lead, "n_lead": n, "n": len(same),
                       "heatmap": heatmap(best["grid"]), "bars": bars(best["key"])})
    return blocks
