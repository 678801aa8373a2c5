"""The HTML report of one run (`sae-lens-ctx report`): one static, self-contained file, no JavaScript.

`report/index.html` holds every page; CSS `:target` shows one at a time, so it works from `file://`
with no server. It opens with what the run found (`#headline`, `findings.py`: the best-supported
explanations with their scores and intervals, one verdict per (explainer, scorer), the warnings and flags
collapsed), then the unit list (`#units`), a page per unit (`#unit-<id>`: token, congruence, top
contexts with tokens shaded by activation, heads with attribution and ablation, look-ups, explanations,
scores with CIs, head vs neuron) and the run summary (`#summary`: headline numbers with controls beside,
cost, plots). Plots are embedded as PNG data URIs.

The markup is in Jinja2 templates (`templates/`, package data: `report.html` and the pages it holds);
this module only prepares their data. Autoescaping is on and every printed value that is not `Markup`
made by these templates goes through `html.escape` (`_finalize`): everything from the corpus, the
tokenizer, the model or an LLM is inert text. The same `context_html` renders the prompts of the W&B
contexts table.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import shutil
from pathlib import Path
from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from typing import Any

from markupsafe import Markup

from ...core.errors import UserError
from ...inputs.context import RunContext
from ...inputs.model import cached_snapshot, hub_id, resolve_source
from .plots import write_plots
from .qk import qk_blocks
from ...core.records import CONFOUND_CONTROLS, atomic_write
from ...core.layout import TABLES
from .findings import findings
from .tables import RunTables, number, safe_name
from ...inputs.tokens import token_pieces  # per-token pieces that spell the prompt (also used by W&B's HTML cells)

log = logging.getLogger(__name__)

REPORT_FILE = "report/index.html"
SHADE = "255,140,0"
"""RGB of the activation shading (alpha = activation / the unit's peak activation)."""

TEMPLATES = "templates"
"""The Jinja2 templates of the report, package data of this package (`report.html` and the pages it holds)."""


def _finalize(value: Any) -> Any:
    """Every value a template prints: `Markup` (made by this package's templates) as it is, anything else as
    inert text through `html.escape` (quotes as `&quot;` / `&#x27;`, as the report always wrote them); None as ''."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


class Num:
    """A number cell of a table (right-aligned, formatted by `fmt`)."""

    def __init__(self, value: Any):
        self.value = value


@lru_cache(maxsize=1)
def environment() -> Any:
    """The report's Jinja2 environment: templates from the package, autoescaping on."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader(__package__, TEMPLATES), autoescape=True, finalize=_finalize,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    env.tests["num"] = lambda value: isinstance(value, Num)
    return env


def render(name: str, **values: Any) -> Markup:
    """One template of the report rendered (its HTML, safe to insert into another template)."""
    return Markup(environment().get_template(name).render(**values))


def _macro(template: str, name: str) -> Any:
    return getattr(environment().get_template(template).module, name)


CSS = resources.files(__package__).joinpath(TEMPLATES, "report.css").read_text(encoding="utf-8")
"""The report's style sheet (`templates/report.css`; also W&B's HTML cells)."""


def esc(value: Any) -> str:
    """Any value as inert HTML text (quotes included)."""
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    x = number(value)
    if x is None:
        return "–" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    return f"{x:.{digits}g}"


# -- prompts with shaded tokens --------------------------------------------------------------------


def _span(text: str, activation: float | None, peak: float, last: bool = False) -> dict[str, Any]:
    act = number(activation)
    alpha = 0.0 if act is None or peak <= 0 else max(0.0, min(1.0, act / peak))
    return {"text": text, "rgb": SHADE, "alpha": alpha, "title": None if act is None else f"activation {act:.4g}",
            "last": last, "under": False}


def context_html(pieces: list[str] | None, acts: list[float] | None, text: str, activation: float | None,
                 peak: float) -> str:
    """A prompt as HTML: each token shaded by the unit's activation on it (relative to `peak`).

    Without per-token pieces and activations that match (no tokenizer, no `context_acts.safetensors`,
    or tokens that do not spell `text`), the whole text is one span shaded by its final activation.
    """
    if pieces is None or acts is None or len(pieces) != len(acts) or not pieces:
        return _macro("tokens.html", "prompt")([_span(text, activation, peak, last=True)])
    return _macro("tokens.html", "prompt")([_span(p, a, peak, last=i == len(pieces) - 1)
                                            for i, (p, a) in enumerate(zip(pieces, acts))])


LOOKUP_SHADE = "30,136,229"
"""RGB of the look-up shading (alpha = a position's contribution / the largest one recorded on the prompt)."""


def lookup_html(pieces: list[str] | None, record: dict) -> str:
    """A prompt's context tokens shaded by what the head drew from each (`lookups.jsonl`: the recorded
    top positions; a negative contribution is underlined). Without pieces, the looked-up tokens alone."""
    sources = [s for s in record.get("sources") or [] if s["position"] >= record.get("offset", 0)]
    peak = max((abs(s["contribution"]) for s in record.get("sources") or []), default=0.0)
    by_pos = {s["position"] - record.get("offset", 0): s for s in sources}
    if pieces is None:
        pieces = [s["token"] for s in sorted(sources, key=lambda s: s["position"])]
        by_pos = {i: s for i, s in enumerate(sorted(sources, key=lambda s: s["position"]))}
    spans = []
    for i, piece in enumerate(pieces):
        s = by_pos.get(i)
        spans.append({"text": piece, "rgb": LOOKUP_SHADE, "last": False,
                      "alpha": 0.0 if s is None or peak <= 0 else min(1.0, abs(s["contribution"]) / peak),
                      "title": None if s is None else f"attention {s['attention']:.3g}, contribution {s['contribution']:.4g}",
                      "under": s is not None and s["contribution"] < 0})
    return _macro("tokens.html", "prompt")(spans)


def standalone(fragment: str) -> str:
    """An HTML fragment as a small self-contained document (for W&B's HTML cells)."""
    return f'<!doctype html><meta charset="utf-8"><style>{CSS}</style>{fragment}'


class ContextRenderer:
    """Renders `contexts.jsonl` rows: token pieces from the run's tokenizer, per-token activations from
    `context_acts.safetensors` (key `row{line}`). Counts every prompt it had to show unshaded."""

    def __init__(self, out: Path, tokenizer: Any = None, tokenizer_problem: str | None = None):
        self.tokenizer = tokenizer
        self.problems: dict[str, int] = {}
        if tokenizer is None and tokenizer_problem:
            self.problems[tokenizer_problem] = 0
        self._acts = None
        path = Path(out) / "context_acts.safetensors"
        if path.is_file():
            from safetensors import safe_open

            self._acts = safe_open(str(path), framework="pt")
            self._keys = set(self._acts.keys())

    def acts(self, line: int, n_tokens: int) -> list[float] | None:
        key = f"row{line}"
        if self._acts is None or key not in self._keys:
            return None
        values = self._acts.get_tensor(key).float().flatten().tolist()
        if len(values) == n_tokens + 1:  # a leading BOS position
            values = values[1:]
        return values if len(values) == n_tokens else None

    def pieces(self, row: dict) -> list[str] | None:
        tokens = row.get("tokens")
        if self.tokenizer is None or not tokens:
            return None
        pieces = token_pieces(self.tokenizer, list(tokens))
        if "".join(pieces).strip() != str(row.get("text", "")).strip():
            return None  # the tokens do not spell the record's text: show the text itself
        return pieces

    def html(self, row: dict, line: int, peak: float) -> str:
        pieces = self.pieces(row)
        acts = self.acts(line, len(pieces)) if pieces is not None else None
        if pieces is None or acts is None:
            why = ("no tokenizer" if self.tokenizer is None else "tokens do not spell the text" if pieces is None
                   else "no per-token activations")
            self.problems[f"prompts shown unshaded ({why})"] = self.problems.get(
                f"prompts shown unshaded ({why})", 0) + 1
        return context_html(pieces, acts, str(row.get("text", "")), row.get("trimmed_activation",
                            row.get("activation")), peak)


def unit_peaks(res: RunTables) -> dict[str, float]:
    """unit_id → its largest activation over its contexts (the shading scale of its prompts)."""
    peaks: dict[str, float] = {}
    for c in res.rows("contexts"):
        for key in ("activation", "trimmed_activation"):
            value = number(c.get(key))
            if value is not None:
                peaks[c["unit_id"]] = max(peaks.get(c["unit_id"], 0.0), value)
    return peaks


def renderer_for(ctx: RunContext, res: RunTables) -> ContextRenderer:
    """A renderer with the run's tokenizer when there are contexts to show (the model is loaded only then)."""
    if not res.rows("contexts"):
        return ContextRenderer(ctx.out)
    try:
        return ContextRenderer(ctx.out, run_tokenizer(ctx))
    except (UserError, OSError) as e:
        return ContextRenderer(ctx.out, None, f"tokens not shaded: the model's tokenizer could not be loaded ({e})")


def run_tokenizer(ctx: RunContext) -> Any:
    """The run's tokenizer: the loaded model's, else the tokenizer alone for HF directories and hub models
    (a report should not load billions of weights to decode tokens), else the model's after loading it."""
    if "model" in ctx.__dict__ or ctx.model_object is not None:
        return ctx.model.tokenizer

    source, where = resolve_source(ctx.config.model.model_name)
    if source == "hub":  # the cache's own directory, so that a local folder of the same name never shadows it
        where = cached_snapshot(hub_id(str(where))) or hub_id(str(where))
    if source in ("hf-directory", "hub"):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(where))
    return ctx.model.tokenizer


# -- pages ---------------------------------------------------------------------------------------


def unit_anchor(unit_id: str) -> str:
    return f"unit-{safe_name(unit_id)}"


def _img(folder: Path, rel: str | None) -> str | None:
    """A plot as a PNG data URI (None when it was not drawn)."""
    if not rel or not (folder / rel).is_file():
        return None
    return "data:image/png;base64," + base64.b64encode((folder / rel).read_bytes()).decode("ascii")


def _interval(low: Any, high: Any) -> Num:
    return Num(f"[{fmt(low)}, {fmt(high)}]")


def qk_section(report: Report, unit_id: str) -> Markup | None:
    """The QK block of a unit page (`templates/qk.html`, data from `qk.qk_blocks`), or None without QK records."""
    blocks = qk_blocks(report.res.out, unit_id)
    return render("qk.html", blocks=blocks) if blocks else None


EXTRA_SECTIONS: list[Callable[[Report, str], str | None]] = [qk_section]
"""Further sections of a unit page, after its look-ups: functions (report, unit_id) → an HTML block made by
a template of this package (`render`), or None. Each (unit, head) pair section added later goes here."""


class Report:
    """Builds the pages of one run's report: the data each template shows (the markup is in `templates/`)."""

    def __init__(self, res: RunTables, renderer: ContextRenderer, plots_dir: Path, plots: dict[str, str],
                 n_contexts: int):
        self.res, self.renderer, self.plots_dir, self.plots = res, renderer, plots_dir, plots
        self.n_contexts = n_contexts
        self.heads = res.grouped("heads")
        self.explanations = res.grouped("explanations")
        every = res.grouped("scores")
        self.scores = {u: [r for r in rows if r.get("control_kind") not in CONFOUND_CONTROLS] for u, rows in every.items()}
        self.comparison: dict[str, list[dict]] = {}
        for row in res.comparison():
            self.comparison.setdefault(row["unit_id"], []).append(row)
        self.peaks = unit_peaks(res)
        self.contexts: dict[str, list[tuple[int, dict]]] = {}
        for line, c in enumerate(res.rows("contexts")):
            self.contexts.setdefault(c["unit_id"], []).append((line, c))
        self.lookups = res.grouped("lookups")
        self.badges = res.badges()

    def ordered_units(self) -> list[dict]:
        return sorted(self.res.units, key=lambda u: (bool(u.get("control")), u.get("layer", 0), str(u.get("index")),
                                                     u["unit_id"]))

    def unit_list(self) -> str:
        rows = []
        for u in self.ordered_units():
            uid = u["unit_id"]
            relevant = [h["head"] for h in self.heads.get(uid, []) if h.get("relevant")]
            head_scores = [s["value"] for s in self.scores.get(uid, []) if s.get("head") is not None
                           and number(s.get("value")) is not None]
            link = render("link.html", href="#" + unit_anchor(uid), text=uid)
            rows.append([link, u.get("token"), Num(u.get("layer")), Num(u.get("congruence")),
                         "control" if u.get("control") else "selected", ", ".join(relevant) if relevant else "–",
                         Num(len(self.contexts.get(uid, []))), Num(max(head_scores) if head_scores else None)])
        return render("unit_list.html", rows=rows)

    def unit_page(self, u: dict) -> str:
        uid = u["unit_id"]
        text_keys = ("token", "hook_name", "kind")
        facts = [(k, u.get(k) if k in text_keys else fmt(u.get(k))) for k in (
            "kind", "hook_name", "layer", "index", "token", "congruence", "rank_in_layer", "kurtosis", "skew") if k in u]
        extra = [block for block in (f(self, uid) for f in EXTRA_SECTIONS) if block]
        return render("unit_page.html", u=u, anchor=unit_anchor(uid), facts=facts, heads=self._heads(uid),
                      contexts=self._contexts(uid), lookups=self._lookups(uid), extra=extra,
                      explanations=self._explanations(uid), scores=self._scores(uid), versus=self._versus(uid))

    def _heads(self, uid: str) -> dict | None:
        heads = self.heads.get(uid, [])
        if not heads:
            return None
        relevant = [h for h in heads if h.get("relevant")]
        others = sorted((h for h in heads if not h.get("relevant")),
                        key=lambda h: -abs(number(h.get("mean_attribution")) or 0.0))[:5]
        rows = [[h["head"], "relevant" if h.get("relevant") else "–", Num(h.get("active_fraction")),
                 Num(h.get("mean_attribution")), Num(h.get("ablation_effect")), Num(h.get("ablation_pvalue")),
                 Num(h.get("prob_drop_active")), Num(h.get("prob_drop_inactive"))] for h in relevant + others]
        return {"n_relevant": len(relevant), "n": len(heads), "rows": rows,
                "heatmap": _img(self.plots_dir, self.plots.get(f"heatmap:{uid}"))}

    def _contexts(self, uid: str) -> list[dict]:
        rows = [(line, c) for line, c in self.contexts.get(uid, [])
                if c.get("kind", "top") == "top" and c.get("split") == "train"]
        rows = sorted(rows, key=lambda lc: lc[1].get("rank", 0))[: self.n_contexts]
        active: dict[int, list[str]] = {}
        for h in self.heads.get(uid, []):
            if h.get("relevant"):
                for rank in h.get("active_train_ranks") or []:
                    active.setdefault(rank, []).append(h["head"])
        peak = self.peaks.get(uid, 0.0)
        return [{"prompt": self.renderer.html(c, line, peak), "activation": c.get("activation"),
                 "next_token": c.get("next_token"), "heads": active.get(c.get("rank"), [])} for line, c in rows]

    def _lookups(self, uid: str, per_head: int = 3) -> list[list]:
        """Per relevant head, its first active train prompts twice: shaded by the unit's activation and by
        the head's look-up contribution, with the first position's share (the attention sink)."""
        records = [r for r in self.lookups.get(uid, []) if r.get("split") == "train" and r.get("active")]
        rows_of = {c.get("rank"): (line, c) for line, c in self.contexts.get(uid, [])
                   if c.get("split") == "train" and c.get("kind", "top") == "top"}
        peak = self.peaks.get(uid, 0.0)
        shown: dict[str, int] = {}
        rows = []
        for r in sorted(records, key=lambda r: (r["head"], r["rank"])):
            if shown.get(r["head"], 0) >= per_head or r["rank"] not in rows_of:
                continue
            shown[r["head"]] = shown.get(r["head"], 0) + 1
            line, c = rows_of[r["rank"]]
            rows.append([r["head"], Num(r["rank"]), self.renderer.html(c, line, peak),
                         lookup_html(self.renderer.pieces(c), r), Num(r.get("attribution")),
                         Num(r.get("first_attention")), Num(r.get("first_contribution"))])
        return rows

    def _explanations(self, uid: str) -> list[list]:
        return [[e.get("head") or "(unit)", e.get("explainer"), e.get("text"), e.get("status", "ok"),
                 " / ".join(str(e.get(k)) for k in ("backend", "model") if e.get(k)), Num(e.get("cost_usd"))]
                for e in self.explanations.get(uid, [])]

    def _scores(self, uid: str) -> list[list]:
        """A unit's score records, one row each: what was scored, by which explainer and scorer, and for a
        per-token simulation its tier and tokens (scores of different tiers are never pooled, so the page
        names the tier of each, docs/simulation.md)."""
        return [[s.get("head") or "(unit)", s.get("explainer"), s.get("scorer"), s.get("tier") or "",
                 Num(s.get("value")), _interval(s.get("ci_low"), s.get("ci_high")), Num(s.get("n")),
                 Num(s.get("n_tokens")), "well explained" if self.well_explained_badge(uid, s) else ""]
                for s in self.scores.get(uid, [])]

    def well_explained_badge(self, uid: str, s: dict) -> bool:
        """The "well explained" badge as the score stage decided it (`RunTables.badges`, summary.json):
        an E score at or above the threshold whose difference to each of its controls has its whole
        interval above 0, never on a point value (E = 0.75 [0.5, 1] over 10 prompts gets none)."""
        return self.badges.get((uid, s.get("head"), s.get("scorer"), s.get("explainer")), False)

    def headline(self) -> str:
        """The report's first screen (`first_screen.html`): what the run found and one verdict per
        (explainer, scorer) (`findings.py`); collapsed below them, every real − control comparison of
        summary.json's `headline` with the verdict in words, its confound warnings, its flags
        (near-identical explanations, a one-sided judge) and how many E scores are well explained."""
        summary = self.res.side.get("summary") or {}
        h = summary.get("headline") or {}
        comparisons = []
        for scorer in ("E", "auroc", "unit_E", "unit_auroc", "unit_sim_correlation"):
            block = h.get(scorer) or {}
            real = (block.get("real") or {}).get("mean")
            for name, label in (("random_units", "random units"), ("shuffled", "shuffled explanations"),
                                ("length", "length-only judge"), ("token", "token-present judge")):
                c = block.get(f"real_minus_{name}")
                if c is None:
                    continue
                comparisons.append([scorer, Num(real), label, Num(c.get("difference")),
                                    _interval(c.get("ci_low"), c.get("ci_high")), c.get("verdict")])
        notes = list(summary.get("confound_warnings") or []) + list((summary.get("flags") or {}).get("messages") or [])
        return render("first_screen.html", f=findings(self.res), anchor=unit_anchor, comparisons=comparisons,
                      notes=notes, well=summary.get("well_explained"))

    def _versus(self, uid: str) -> list[list]:
        return [[r["scorer"], Num(r["unit_score"]), Num(r["head_score_mean"]), Num(r["head_score_max"]), r["best_head"],
                 Num(r["n_heads"])] for r in self.comparison.get(uid, [])]

    def summary(self, metrics: dict[str, Any]) -> str:
        order = ["units", "contexts", "heads", "explanations", "scores", "cost"]
        groups: dict[str, list[list]] = {}
        for key, value in sorted(metrics.items(), key=lambda kv: (order.index(kv[0].split("/")[0])
                                                                  if kv[0].split("/")[0] in order else 99, kv[0])):
            if key.endswith("_control") and key.removesuffix("_control") in metrics:
                continue  # shown beside its selected-units number
            group, _, name = key.partition("/")
            groups.setdefault(group, []).append([name, Num(value), Num(metrics.get(f"{key}_control"))])
        attribute = self.res.side.get("attribute") or {}
        skipped = [[s.get("unit_id"), s.get("reason")] for s in attribute.get("skipped_units") or []]
        plots = [(src, title) for src, title in ((_img(self.plots_dir, self.plots.get(name)), title) for name, title in (
            ("unit_layers", "units per layer"), ("score_histograms", "explanation scores"),
            ("ablation_boxplot", "ablation"), ("head_vs_neuron", "head vs neuron"))) if src]
        model = self.res.side.get("model") or {}
        facts = [(k, model.get(k)) for k in ("model_name", "model_class", "weights", "architecture", "n_layers",
                                             "n_heads", "d_mlp") if k in model]
        notes = [f"{k}: {n}" if n else k for k, n in self.renderer.problems.items()]
        return render("summary.html", facts=facts, groups=list(groups.items()), skipped=skipped, plots=plots,
                      notes=notes)

    def render(self, metrics: dict[str, Any]) -> str:
        model = (self.res.side.get("model") or {}).get("model_name", "")
        return render("report.html", model=model, css=Markup(CSS), first_screen=self.headline(),
                      unit_list=self.unit_list(), unit_pages=[self.unit_page(u) for u in self.ordered_units()],
                      summary=self.summary(metrics))


# -- the stage -----------------------------------------------------------------------------------


def run_stage(ctx: RunContext) -> None:
    """`sae-lens-ctx report`: plots into `plots/`, the HTML report into `report/index.html`, `report.json`."""
    res = RunTables.load(ctx.out)
    if "units" not in res.tables:
        raise UserError(f"{ctx.out} has no units.jsonl, so there is nothing to report: "
                        f"run `sae-lens-ctx run --out {ctx.out}` first")
    lc = ctx.config.logging
    plots_dir = ctx.path("plots")
    if plots_dir.is_dir():
        shutil.rmtree(plots_dir)  # heatmaps of units no longer in the run must not linger
    plots_dir.mkdir(parents=True)
    plots = write_plots(res, plots_dir, lc.well_explained)
    renderer = renderer_for(ctx, res)
    metrics = res.metrics()
    report = Report(res, renderer, plots_dir, plots, lc.report_contexts)
    atomic_write(ctx.path(REPORT_FILE), report.render(metrics))
    summary = {
        "report": REPORT_FILE, "tables": {t.table: len(res.rows(t.table)) for t in TABLES if t.table in res.tables},
        "missing_tables": [t.name for t in TABLES if t.table not in res.tables],
        "plots": {name: f"plots/{rel}" for name, rel in plots.items()},
        "metrics": metrics, "fallbacks": renderer.problems,
        "pages": {u["unit_id"]: f"{REPORT_FILE}#{unit_anchor(u['unit_id'])}" for u in res.units},
    }
    atomic_write(ctx.path("report.json"), json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    log.info("report: %s (%d units, %d plots)", ctx.path(REPORT_FILE), len(res.units), len(plots))
