"""A run directory's results, read for showing (W&B tables, plots, the HTML report): whatever exists.

Every stage's records get a table named after its file (`units.jsonl` → `units`). A file that is not
there (its stage is not built yet, or has not run) is simply absent, never an error. Table columns come
from the record dataclass (field order, `core.layout.FILES`), followed by any extra keys found in the rows. Rows are read as
plain dicts, so fields that a stage adds later show up without a change here.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core.layout import SUMMARY_FILES, TABLES, RunFile
from ...core.records import CONFOUND_CONTROLS, iter_jsonl



UNIT_SCORERS = {"unit_E": "E", "unit_auroc": "auroc", "lookup_unit_E": "lookup_E", "lookup_unit_auroc": "lookup_auroc"}
"""A unit's own scorers and the head scorers they compare with (score.py): the unit's explanation
predicting the unit, its heads' predicting their own activity, by the same judge and metric."""

def columns(spec: RunFile, rows: list[dict]) -> list[str]:
    """The record's fields in order, then any key the rows hold beyond them (first seen first)."""
    cols = spec.record_columns()
    seen = set(cols)
    for row in rows:
        for key in row:
            if key not in seen:
                seen.add(key)
                cols.append(key)
    return cols


def cell(value: Any) -> Any:
    """A JSONL value as a table cell: scalars as they are, lists and dicts as their JSON text."""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return value


def safe_name(text: str) -> str:
    """A file- and W&B-safe name (letters, digits, '-', '_', '.'); '/' becomes '__' as SAE-Lens does."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text.replace("/", "__")).strip("-.") or "x"


@dataclass
class RunTables:
    """The records and JSON summaries of one run directory, as far as they exist."""

    out: Path
    tables: dict[str, list[dict]] = field(default_factory=dict)
    """Table name → rows, only for files that exist."""
    side: dict[str, dict] = field(default_factory=dict)
    """`model` / `attribute` / ... → the parsed JSON file, only for files that exist."""

    @classmethod
    def load(cls, out: str | Path) -> RunTables:
        out = Path(out)
        res = cls(out)
        for spec in TABLES:
            path = out / spec.name
            if path.is_file():
                res.tables[spec.table] = list(iter_jsonl(path))
        for name in SUMMARY_FILES:
            path = out / name
            if path.is_file():
                res.side[name.removesuffix(".json")] = json.loads(path.read_text(encoding="utf-8"))
        return res

    def rows(self, name: str) -> list[dict]:
        return self.tables.get(name, [])

    # -- lookups -----------------------------------------------------------------------------------

    @property
    def units(self) -> list[dict]:
        return self.rows("units")

    def unit(self, unit_id: str) -> dict | None:
        return self._units_by_id.get(unit_id)

    @property
    def _units_by_id(self) -> dict[str, dict]:
        return {u["unit_id"]: u for u in self.units}

    def is_control(self, row: dict) -> bool:
        """A row's unit is a control unit (the row's own `control` key wins when it has one)."""
        if "control" in row and row["control"] is not None:
            return bool(row["control"])
        unit = self._units_by_id.get(row.get("unit_id"))
        return bool(unit and unit.get("control"))

    def grouped(self, name: str) -> dict[str, list[dict]]:
        """unit_id → that unit's rows of a table (file order)."""
        out: dict[str, list[dict]] = defaultdict(list)
        for row in self.rows(name):
            out[row.get("unit_id")].append(row)
        return out

    def badges(self) -> dict[tuple, bool]:
        """(unit_id, head, scorer, explainer) → its "well explained" badge, as the score stage decided it
        (`summary.json`'s `well_explained`: E ≥ the threshold and the difference to every control above 0)."""
        rows = ((self.side.get("summary") or {}).get("well_explained") or {}).get("scores") or []
        return {(r["unit_id"], r["head"], r["scorer"], r.get("explainer")): bool(r["badge"]) for r in rows}

    # -- derived tables ----------------------------------------------------------------------------

    def comparison(self) -> list[dict]:
        """Head versus neuron: per (unit, scorer), the unit's own explanation score beside its heads'."""
        per: dict[tuple[str, str], dict] = {}
        for s in self.rows("scores"):
            if number(s.get("value")) is None or s.get("control_kind") in CONFOUND_CONTROLS:
                continue
            scorer = scorer_label(s)
            if s.get("head") is None and scorer in UNIT_SCORERS:
                scorer = UNIT_SCORERS[scorer]  # the unit's own score beside its heads' score of the same kind
            key = (s.get("unit_id"), scorer)
            entry = per.setdefault(key, {"unit": None, "heads": []})
            if s.get("head") is None:
                entry["unit"] = s
            else:
                entry["heads"].append(s)
        rows = []
        for (unit_id, scorer), entry in sorted(per.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            unit = self.unit(unit_id) or {}
            heads = entry["heads"]
            best = max(heads, key=lambda s: s["value"]) if heads else None
            own = entry["unit"]
            rows.append({
                "unit_id": unit_id, "token": unit.get("token"), "layer": unit.get("layer"),
                "control": self.is_control({"unit_id": unit_id}), "scorer": scorer,
                "unit_score": own["value"] if own else None,
                "unit_ci_low": own.get("ci_low") if own else None,
                "unit_ci_high": own.get("ci_high") if own else None,
                "head_score_mean": _mean([h["value"] for h in heads]),
                "head_score_max": best["value"] if best else None,
                "best_head": best["head"] if best else None,
                "n_heads": len(heads),
            })
        return rows

    # -- headline numbers --------------------------------------------------------------------------

    def metrics(self) -> dict[str, float | int | str]:
        """SAE-Lens-style `group/name` headline numbers of what exists (controls beside the real units), at
        most two levels deep; the scores' as a few keys per scorer (`_score_metrics`), the rest of
        `summary.json` in `summary_rows`."""
        m: dict[str, float | int] = {}
        units = self.units
        if "units" in self.tables:
            real = [u for u in units if not u.get("control")]
            m["units/n_units"] = len(real)
            m["units/n_controls"] = len(units) - len(real)
            m["units/n_layers"] = len({u.get("layer") for u in real})
            _put(m, "units/congruence_mean", _mean([u.get("congruence") for u in real]))
        if "contexts" in self.tables:
            ctx = self.rows("contexts")
            top = [c for c in ctx if c.get("kind", "top") == "top" and c.get("split") == "train"]
            m["contexts/n_contexts"] = len(ctx)
            m["contexts/n_units"] = len({c.get("unit_id") for c in ctx})
            _put(m, "contexts/top_activation_mean", _mean([c.get("activation") for c in top]))
            _put(m, "contexts/trimmed_activation_mean", _mean([c.get("trimmed_activation") for c in top]))
        if "heads" in self.tables:
            m.update(self._head_metrics())
        if "explanations" in self.tables:
            ex = self.rows("explanations")
            m["explanations/n"] = len(ex)
            m["explanations/n_failed"] = sum(e.get("status", "ok") != "ok" for e in ex)
            m["explanations/n_heads"] = sum(e.get("head") is not None for e in ex)
            m["explanations/n_units"] = sum(e.get("head") is None for e in ex)
            costs = [e.get("cost_usd") for e in ex]
            m["cost/usd"] = float(sum(c for c in costs if number(c) is not None))
            m["cost/n_unpriced"] = sum("cost_usd" in e and e["cost_usd"] is None and e.get("status", "ok") == "ok"
                                       for e in ex)
            for key in ("prompt_tokens", "completion_tokens"):
                m[f"cost/{key}"] = int(sum(e.get(key) or 0 for e in ex))
        if "scores" in self.tables:
            m.update(self._score_metrics())
        return m

    def _head_metrics(self) -> dict[str, float | int]:
        m: dict[str, float | int] = {}
        heads = self.rows("heads")
        for label, rows in (("", [h for h in heads if not self.is_control(h)]),
                            ("_control", [h for h in heads if self.is_control(h)])):
            relevant = [h for h in rows if h.get("relevant")]
            n_units = len({h.get("unit_id") for h in rows})
            m[f"heads/n_pairs{label}"] = len(relevant)
            m[f"heads/per_unit_mean{label}"] = len(relevant) / n_units if n_units else 0.0
            _put(m, f"heads/ablation_effect_mean{label}", _mean([h.get("ablation_effect") for h in relevant]))
            pvals = [h.get("ablation_pvalue") for h in relevant if number(h.get("ablation_pvalue")) is not None]
            if pvals:
                m[f"heads/ablation_significant_fraction{label}"] = sum(p < 0.05 for p in pvals) / len(pvals)
        ks = (self.side.get("attribute") or {}).get("ablation_ks_across_pairs") or {}
        for key in ("statistic", "pvalue", "mean_drop_active", "mean_drop_inactive"):
            _put(m, f"heads/ablation_ks_{key}", ks.get(key))
        return m

    def _score_metrics(self) -> dict[str, float | int | str]:
        """A few `group/metric` keys per headline scorer (`HEADLINE_SCORERS`): the selected units' mean, the
        control units' (`_control`) and how many (`_n`), from `scores.jsonl`; from `summary.json` when the
        score stage wrote one, real − each control (`_vs_<control>`), the verdict in words (`_verdict`) and
        the share of E scores with the "well explained" badge (`_well_explained`). Everything else of
        `summary.json` is in `summary_rows` (a table)."""
        m: dict[str, float | int | str] = {}
        by: dict[tuple[str, bool], list[float]] = defaultdict(list)
        for s in self.rows("scores"):
            value = number(s.get("value"))
            if value is None or s.get("control_kind") in CONFOUND_CONTROLS:
                continue  # confound controls: in summary.json's headline, beside the real scores
            by[(scorer_label(s), self.is_control(s))].append(value)
        summary = self.side.get("summary") or {}
        headline = summary.get("headline") or {}
        badges = (summary.get("well_explained") or {}).get("scores") or []
        for scorer, key in HEADLINE_SCORERS.items():
            real, control = by.get((scorer, False), []), by.get((scorer, True), [])
            if real or control:
                _put(m, key, _mean(real))
                _put(m, f"{key}_control", _mean(control))
                m[f"{key}_n"] = len(real)
            if scorer.startswith("lookup_"):  # the look-up explainer's comparisons (summary.json `explainers`)
                block = ((summary.get("explainers") or {}).get("lookup") or {}).get(scorer.removeprefix("lookup_")) or {}
            else:
                block = headline.get(scorer) or {}
            compared = {name: block[f"real_minus_{name}"] for name in CONTROL_NAMES if f"real_minus_{name}" in block}
            for name, c in compared.items():
                _put(m, f"{key}_vs_{name}", c.get("difference"))
            if compared:
                behind = [name for name, c in compared.items() if not c.get("distinguishable")]
                m[f"{key}_verdict"] = ("beats every control: " + ", ".join(compared) if not behind else
                                       "cannot be told apart from: " + ", ".join(behind))
            mine = [b for b in badges if b.get("scorer") == scorer]
            if mine:
                m[f"{key}_well_explained"] = sum(bool(b.get("badge")) for b in mine) / len(mine)
        return m

    def summary_rows(self) -> list[dict[str, Any]]:
        """`summary.json` flattened: one row per leaf (`path` 'a/b/c', `value` as JSON text), the table
        beside the few headline keys of `metrics`."""
        return [{"path": path, "value": json.dumps(value, ensure_ascii=False)}
                for path, value in _leaves(self.side.get("summary") or {})]


HEADLINE_SCORERS = {"E": "heads/E", "auroc": "heads/auroc", "lookup_E": "heads/lookup_E",
                    "lookup_auroc": "heads/lookup_auroc", "unit_E": "units/E", "unit_auroc": "units/auroc",
                    "unit_sim_correlation": "units/sim_correlation"}
"""Scorer (`scorer_label`) → its headline key: `heads/` for (unit, head) pairs' explanations, `units/` for
a unit's own."""

CONTROL_NAMES = ("random_units", "shuffled", *CONFOUND_CONTROLS)
"""The controls a real score is compared with in `summary.json`'s headline (`real_minus_<name>`)."""


def scorer_label(score: dict) -> str:
    """A score's scorer, prefixed 'lookup_' for the look-up explainer's (kept apart from the LLM's)."""
    scorer = str(score.get("scorer"))
    return f"lookup_{scorer}" if score.get("explainer") == "lookup" else scorer


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _mean(values: list) -> float | None:
    nums = [v for v in (number(x) for x in values) if v is not None]
    return sum(nums) / len(nums) if nums else None


def _put(m: dict, key: str, value: Any) -> None:
    if number(value) is not None:
        m[key] = value


def _leaves(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Leaves of a JSON object as ('a/b', value) pairs; lists of numbers or strings are leaves, lists of
    objects are walked with their index ('gaps/0/unit_id')."""
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in _leaves(v, f"{prefix}{k}/")]
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return [kv for i, v in enumerate(obj) for kv in _leaves(v, f"{prefix}{i}/")]
    return [(prefix.rstrip("/"), obj)] if prefix else []
