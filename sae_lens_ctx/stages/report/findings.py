"""What a run found, first: its best-supported explanations and one verdict per (explainer, scorer).

The console's end-of-run summary (`cli`), the report's first screen (`html.py`) and W&B's findings keys
and tables (`pipeline/wandb_log.py`) all show what `findings` returns, so they say the same thing.
Nothing here decides a verdict: the intervals and the "well explained" badges are the score stage's
(`stages/score/verdicts.py`, `metrics.compare`), read from `summary.json`; this module ranks and words them.

**A finding** is an explanation of a selected (not control) unit's pair or of the unit itself, from any
explainer, whose E on held-out prompts (the pair's `E`, the unit's `unit_E`: balanced accuracy, 0.5 is
chance) lies above 0.5. Findings are **ranked by the lower end of E's interval** (then E, then the number
of prompts): the explanation whose score is surest to be above chance comes first, so a 0.9 over three
prompts does not outrank a 0.8 over forty. Pairs come before units' own explanations (the look-ups are
what the method is about), at most `MAX_PAIRS` and `MAX_UNITS` of each. Each finding's word:

* `supported`: it holds the "well explained" badge (E ≥ `logging.well_explained` and the interval of
  the difference to every control above 0; `verdicts.well_explained`);
* `above-chance`: E's own interval lies above 0.5, but it does not beat every control (or has no badge
  to hold: the look-up explainer's scores are compared with controls in aggregate only);
* `uncertain`: E is above 0.5 but its interval holds 0.5.

**A verdict** is one row per (explainer, scorer) of the real scores' mean against each control of
`summary.json` (random control units, shuffled explanations, the length-only and token-present judges):
`beats controls` when the interval of real − control lies above 0 for every control, `below a control`
when it lies below 0 for one, `not told apart` otherwise, `not scored` without real scores. The row
shows the strongest control: the one whose real − control interval reaches lowest (no interval counts as
lowest; ties by the smaller difference), so the control shown is the one that decides the verdict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .tables import RunTables, number

MAX_PAIRS = 3
"""Pair findings shown at most (console, report, W&B's headline keys; the W&B table holds every one)."""
MAX_UNITS = 2
"""Unit findings shown at most."""

MAX_TOKENS = 4
"""Looked-up tokens named in a finding's title at most (the rest as '…'; all of them in `looked_up`)."""

FINDING_SCORERS = {"E": "pair", "unit_E": "unit"}
"""The scorers a finding is ranked on, and what they explain."""

VERDICT_SCORERS = ("E", "auroc", "unit_E", "unit_auroc", "unit_sim_correlation")
"""The scorers of the verdict table, in order."""

CONTROLS = {"random_units": ("random units", "random_units"), "shuffled": ("shuffled", "shuffled_explanations"),
            "length": ("length judge", "length_control"), "token": ("token judge", "token_control")}
"""Control name in `summary.json` (`real_minus_<name>`) → (its short label, the key of its own mean)."""

CHANCE = 0.5
"""E of a judge that knows nothing (a constant judge has E = 0.5 exactly)."""


@dataclass
class Finding:
    """One explanation worth reading first: its text, its score with interval and its word."""

    kind: str
    """'pair' (a head's explanation) or 'unit' (the unit's own)."""
    unit_id: str
    head: str | None
    token: str | None
    """The unit's token (what it predicts)."""
    explainer: str
    text: str
    scorer: str
    value: float
    ci_low: float | None
    ci_high: float | None
    n: int
    verdict: str
    """'supported', 'above-chance' or 'uncertain' (module doc)."""
    looked_up: list[str] = field(default_factory=list)
    """The tokens the head looks up (the look-up explainer's pattern of the pair); empty for units."""

    def interval(self) -> str:
        return "[–]" if self.ci_low is None else f"[{self.ci_low:.2f}, {self.ci_high:.2f}]"

    def title(self) -> str:
        """`L11H6 → L29N1220 " one" looks up " no"` or `L29N1220 " one"`."""
        token = f" {quoted(self.token)}" if self.token is not None else ""
        if self.kind == "unit":
            return f"{self.unit_id}{token}"
        shown = [quoted(t) for t in self.looked_up[:MAX_TOKENS]] + (["…"] if len(self.looked_up) > MAX_TOKENS else [])
        looks = f" looks up {' / '.join(shown)}" if self.looked_up else ""
        return f"{self.head} → {self.unit_id}{token}{looks}"

    def score(self) -> str:
        label = "E" if self.kind == "pair" else "unit E"
        return f"{label} {self.value:.2f} {self.interval()}, n={self.n}"


@dataclass
class Verdict:
    """One row of the verdict table: an explainer's scorer, its real mean and its strongest control."""

    explainer: str
    scorer: str
    real: float | None
    n: int
    control: str | None
    """The strongest control's label, None without controls."""
    control_mean: float | None
    difference: float | None
    ci_low: float | None
    ci_high: float | None
    verdict: str
    """'beats controls', 'not told apart', 'below a control' or 'not scored'."""

    def interval(self) -> str:
        if self.difference is None:
            return "–"
        ci = "[–]" if self.ci_low is None else f"[{self.ci_low:+.2f}, {self.ci_high:+.2f}]"
        return f"{self.difference:+.2f} {ci}"


@dataclass
class Findings:
    """A run's findings, verdicts and the count of its warnings and flags."""

    pairs: list[Finding]
    units: list[Finding]
    verdicts: list[Verdict]
    n_warnings: int
    """Confound warnings and flags of `summary.json` (each one line there and in the report's collapsed section)."""
    scored: bool
    """Whether the run has scores at all."""
    all_pairs: list[Finding] = field(default_factory=list)
    """Every pair finding, ranked (W&B's table)."""
    all_units: list[Finding] = field(default_factory=list)

    @property
    def shown(self) -> list[Finding]:
        return self.pairs + self.units

    def none_line(self) -> str:
        """The one plain line of a run without findings."""
        if not self.scored:
            return "No finding: nothing was scored (no explanation was written or judged)."
        return "No finding: no explanation scored above chance (E > 0.5) on held-out prompts."

    def warnings_line(self) -> str:
        return (f"{self.n_warnings} warnings and flags (controls not told apart, confounds, near-identical "
                "explanations): summary.json (confound_warnings, flags) and the report's \"Warnings and flags\"")


def quoted(token: str | None) -> str:
    return '"' + str(token) + '"'


def _rank(f: Finding) -> tuple:
    return (-(f.ci_low if f.ci_low is not None else float("-inf")), -f.value, -f.n, f.unit_id, f.head or "",
            f.explainer)


def findings(res: RunTables) -> Findings:
    """The findings and verdicts of a run directory's tables (module doc for the rules)."""
    summary = res.side.get("summary") or {}
    units = {u["unit_id"]: u for u in res.units}
    texts = {(e.get("unit_id"), e.get("head"), e.get("explainer")): e for e in res.rows("explanations")
             if e.get("text") and e.get("status", "ok") == "ok"}
    badges = res.badges()
    scores = res.rows("scores")
    found: dict[str, list[Finding]] = {"pair": [], "unit": []}
    for s in scores:
        kind = FINDING_SCORERS.get(s.get("scorer"))
        value = number(s.get("value"))
        if kind is None or value is None or value <= CHANCE or s.get("control_kind") is not None or res.is_control(s):
            continue
        ex = texts.get((s.get("unit_id"), s.get("head"), s.get("explainer")))
        if ex is None:
            continue
        low = number(s.get("ci_low"))
        word = ("supported" if badges.get((s["unit_id"], s.get("head"), s["scorer"], s.get("explainer")))
                else "above-chance" if low is not None and low > CHANCE else "uncertain")
        lookup = texts.get((s["unit_id"], s.get("head"), "lookup")) if kind == "pair" else None
        pattern = (lookup or {}).get("pattern") or {}
        looked_up = [tok for t in pattern.get("tokens") or [] for tok in t.get("tokens") or []]
        found[kind].append(Finding(
            kind=kind, unit_id=s["unit_id"], head=s.get("head"), token=(units.get(s["unit_id"]) or {}).get("token"),
            explainer=str(s.get("explainer")), text=str(ex["text"]), scorer=s["scorer"], value=value, ci_low=low,
            ci_high=number(s.get("ci_high")), n=int(s.get("n") or 0), verdict=word, looked_up=looked_up))
    for rows in found.values():
        rows.sort(key=_rank)
    n_warn = len(summary.get("confound_warnings") or []) + len((summary.get("flags") or {}).get("messages") or [])
    return Findings(pairs=found["pair"][:MAX_PAIRS], units=found["unit"][:MAX_UNITS], verdicts=verdicts(res),
                    n_warnings=n_warn, scored=any(number(s.get("value")) is not None for s in scores),
                    all_pairs=found["pair"], all_units=found["unit"])


def verdicts(res: RunTables) -> list[Verdict]:
    """One `Verdict` per (explainer, scorer) of `summary.json`: the LLM's (its `headline`, named after the
    explainers whose scores it holds), every other explainer's (its `explainers` block), and the per-token
    simulation's `ev_correlation` per tier and explainer (its `simulation` block; scorer `sim-<tier>`, e.g.
    `sim-prompt-logprobs`, `sim-deterministic`)."""
    summary = res.side.get("summary") or {}
    llm_names: dict[str, list[str]] = {}
    for s in res.rows("scores"):
        if s.get("control_kind") is None and s.get("explainer") not in (summary.get("explainers") or {}):
            names = llm_names.setdefault(s.get("scorer"), [])
            if s.get("explainer") and s["explainer"] not in names:
                names.append(s["explainer"])
    blocks: list[tuple[str, str, dict]] = []
    headline = summary.get("headline") or {}
    for scorer in VERDICT_SCORERS:
        if isinstance(headline.get(scorer), dict):
            blocks.append((" / ".join(llm_names.get(scorer) or ["llm"]), scorer, headline[scorer]))
    for name, block in (summary.get("explainers") or {}).items():
        for scorer in VERDICT_SCORERS:
            if isinstance(block.get(scorer), dict):
                blocks.append((name, scorer, block[scorer]))
    for key, prefix in (("tiers", "sim"), ("heads", "head-sim")):  # units, then heads per token
        for tier, by_explainer in ((summary.get("simulation") or {}).get(key) or {}).items():
            for name, metrics in by_explainer.items():  # per tier, never pooled (docs/simulation.md)
                if isinstance(metrics.get("ev_correlation"), dict):
                    blocks.append((name, f"{prefix}-{tier}", metrics["ev_correlation"]))
    return [verdict(explainer, scorer, block) for explainer, scorer, block in blocks]


def verdict(explainer: str, scorer: str, block: dict[str, Any]) -> Verdict:
    """The verdict of one `summary.json` block (`real`, `real_minus_<control>`, the controls' means)."""
    real = block.get("real") or {}
    compared = {name: block[f"real_minus_{name}"] for name in CONTROLS
                if isinstance(block.get(f"real_minus_{name}"), dict)
                and number(block[f"real_minus_{name}"].get("difference")) is not None}
    n = int(real.get("n") or 0)
    if not n or number(real.get("mean")) is None:
        return Verdict(explainer, scorer, None, 0, None, None, None, None, None, "not scored")
    if not compared:
        return Verdict(explainer, scorer, real["mean"], n, None, None, None, None, None, "no control")
    name, c = min(compared.items(), key=lambda kv: (_low(kv[1]), kv[1]["difference"]))
    below = any(number(v.get("ci_high")) is not None and v["ci_high"] < 0 for v in compared.values())
    word = ("below a control" if below else "beats controls" if all(v.get("distinguishable") for v in compared.values())
            else "not told apart")
    label, mean_key = CONTROLS[name]
    return Verdict(explainer, scorer, real["mean"], n, label, number((block.get(mean_key) or {}).get("mean")),
                   c["difference"], number(c.get("ci_low")), number(c.get("ci_high")), word)


def _low(c: dict) -> float:
    low = number(c.get("ci_low"))
    return float("-inf") if low is None else low


# -- the console ------------------------------------------------------------------------------------


def clip(text: str, width: int) -> str:
    """`text` on one line (inner whitespace runs made one space, the indent kept), cut to `width` with '…'."""
    indent = text[: len(text) - len(text.lstrip(" "))]
    text = indent + " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def console_lines(f: Findings, width: int = 130) -> list[str]:
    """The end-of-run summary: findings (two lines each), the verdict table, the warnings in one line."""
    lines = ["Findings (ranked by the lower end of E's 95% interval; 0.5 is chance):"]
    if not f.shown:
        lines.append("  " + f.none_line())
    for i, x in enumerate(f.shown, 1):
        lines.append(clip(f"  {i}. {x.title()}: {x.score()}, {x.verdict} ({x.explainer})", width))
        lines.append(clip(f"     {x.text}", width))
    lines.append("Verdicts (real mean against its strongest control; real − control with its 95% interval):")
    w = max([21] + [len(v.scorer) for v in f.verdicts])  # a scorer is never clipped: it names the tier
    lines.append(f"  {'explainer':<18} {'scorer':<{w}} {'real':>5}  {'strongest control':<19} {'real − control':<22} verdict")
    for v in f.verdicts:
        real = "–" if v.real is None else f"{v.real:.2f}"
        ctrl = "–" if v.control is None else v.control + ("" if v.control_mean is None else f" {v.control_mean:.2f}")
        lines.append(f"  {clip(v.explainer, 18):<18} {v.scorer:<{w}} {real:>5}  {ctrl:<19} {v.interval():<22} {v.verdict}")
    if f.n_warnings:
        lines.append(f.warnings_line())
    return lines


def as_dicts(rows: list) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
