"""The HTML report of one run (`sae-lens-ctx report`): one static, self-contained file, no JavaScript.

`report/index.html` holds every page; CSS `:target` shows one at a time, so it works from `file://`
with no server: the unit list (`#units`), a page per unit (`#unit-<id>`: token, congruence, top
contexts with tokens shaded by activation, heads with attribution and ablation, explanations, scores
with CIs, head vs neuron) and the run summary (`#summary`: headline numbers with controls beside, cost,
plots). Plots are embedded as PNG data URIs.

Everything that comes from the corpus, the tokenizer, the model or an LLM goes through `html.escape`;
the only unescaped values are numbers this module formats itself. The same `context_html` renders the
prompts of the W&B contexts table.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from ...core.errors import UserError
from ...inputs.context import RunContext
from ...inputs.model import cached_snapshot, hub_id, resolve_source
from .plots import write_plots
from .qk import qk_section
from ...core.records import CONFOUND_CONTROLS, atomic_write
from ...core.layout import TABLES
from .tables import RunTables, number, safe_name
from ...inputs.tokens import token_pieces  # per-token pieces that spell the prompt (also used by W&B's HTML cells)

log = logging.getLogger(__name__)

REPORT_FILE = "report/index.html"
SHADE = "255,140,0"
"""RGB of the activation shading (alpha = activation / the unit's peak activation)."""

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:10px 24px}header a{color:#cfe8ff;margin-right:16px}
h1{font-size:20px;margin:4px 0}main{padding:8px 24px}
.page{display:none}.page:target{display:block}body:not(:has(.page:target)) #units{display:block}
table{border-collapse:collapse;margin:6px 0 14px;background:#fff}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}th{background:#eceff1}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.ctx{font-family:ui-monospace,monospace;white-space:pre-wrap;background:#fff;border:1px solid #e0e0e0;
padding:4px 6px;display:block;margin:2px 0}
.tok{border-radius:2px}.tok.last{outline:1px solid #d62728}.next{color:#2e7d32;font-weight:600}
.badge{display:inline-block;background:#e3f2fd;border:1px solid #90caf9;border-radius:8px;padding:0 6px;margin:0 2px;
font-size:12px}.badge.on{background:#ffe0b2;border-color:#fb8c00}
code{white-space:pre;background:#eceff1;padding:0 3px}.control{color:#777}.muted{color:#777}
img{max-width:100%;background:#fff;border:1px solid #ddd;margin:4px 0}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px}dt{font-weight:600}dd{margin:0}
"""




def esc(value: Any) -> str:
    """Any value as inert HTML text (quotes included)."""
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    x = number(value)
    if x is None:
        return "–" if value is None else esc(value)
    if isinstance(value, int):
        return str(value)
    return f"{x:.{digits}g}"


# -- prompts with shaded tokens --------------------------------------------------------------------


def _span(text: str, activation: float | None, peak: float, last: bool = False) -> str:
    act = number(activation)
    alpha = 0.0 if act is None or peak <= 0 else max(0.0, min(1.0, act / peak))
    title = "" if act is None else f' title="activation {act:.4g}"'
    cls = "tok last" if last else "tok"
    return f'<span class="{cls}" style="background:rgba({SHADE},{alpha:.2f})"{title}>{esc(text)}</span>'


def context_html(pieces: list[str] | None, acts: list[float] | None, text: str, activation: float | None,
                 peak: float) -> str:
    """A prompt as HTML: each token shaded by the unit's activation on it (relative to `peak`).

    Without per-token pieces and activations that match (no tokenizer, no `context_acts.safetensors`,
    or tokens that do not spell `text`), the whole text is one span shaded by its final activation.
    """
    if pieces is None or acts is None or len(pieces) != len(acts) or not pieces:
        return f'<span class="ctx">{_span(text, activation, peak, last=True)}</span>'
    spans = [_span(p, a, peak, last=i == len(pieces) - 1) for i, (p, a) in enumerate(zip(pieces, acts))]
    return f'<span class="ctx">{"".join(spans)}</span>'


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
        alpha = 0.0 if s is None or peak <= 0 else min(1.0, abs(s["contribution"]) / peak)
        title = "" if s is None else f' title="attention {s["attention"]:.3g}, contribution {s["contribution"]:.4g}"'
        under = ";text-decoration:underline" if s is not None and s["contribution"] < 0 else ""
        spans.append(f'<span class="tok" style="background:rgba({LOOKUP_SHADE},{alpha:.2f}){under}"{title}>'
                     f"{esc(piece)}</span>")
    return f'<span class="ctx">{"".join(spans)}</span>'


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


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """`rows` hold HTML already escaped by the caller."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(rows_i) + "</tr>" for rows_i in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _td(value: Any, number: bool = False) -> str:
    return f'<td class="num">{fmt(value)}</td>' if number else f"<td>{esc(value)}</td>"


def _img(folder: Path, rel: str | None, alt: str) -> str:
    if not rel or not (folder / rel).is_file():
        return ""
    data = base64.b64encode((folder / rel).read_bytes()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


class Report:
    """Builds the pages of one run's report."""

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
            rows.append([
                f'<td><a href="#{esc(unit_anchor(uid))}">{esc(uid)}</a></td>', _td(u.get("token")),
                _td(u.get("layer"), True), _td(u.get("congruence"), True),
                _td("control" if u.get("control") else "selected"),
                _td(", ".join(relevant) if relevant else "–"), _td(len(self.contexts.get(uid, [])), True),
                _td(max(head_scores) if head_scores else None, True)])
        table = _table(["unit", "token", "layer", "congruence", "kind", "relevant heads", "contexts",
                        "best head score"], rows)
        return f'<section id="units" class="page"><h2>Units ({len(rows)})</h2>{table}</section>'

    def unit_page(self, u: dict) -> str:
        uid = u["unit_id"]
        text_keys = ("token", "hook_name", "kind")
        facts = "".join(f"<dt>{esc(k)}</dt><dd>{esc(u.get(k)) if k in text_keys else fmt(u.get(k))}</dd>"
                        for k in ("kind", "hook_name", "layer", "index", "token", "congruence", "rank_in_layer",
                                  "kurtosis", "skew") if k in u)
        control = ' <span class="control">(control unit)</span>' if u.get("control") else ""
        parts = [f'<section id="{esc(unit_anchor(uid))}" class="page unit">',
                 '<p><a href="#units">← all units</a> · <a href="#summary">run summary</a></p>',
                 f"<h2>{esc(uid)} → <code>{esc(u.get('token'))}</code>{control}</h2><dl>{facts}</dl>",
                 self._heads(uid), self._contexts(uid), self._lookups(uid), qk_section(self.res.out, uid),
                 self._explanations(uid), self._scores(uid),
                 self._versus(uid), "</section>"]
        return "".join(parts)

    def _heads(self, uid: str) -> str:
        heads = self.heads.get(uid, [])
        if not heads:
            return "<h3>Heads</h3><p class=muted>No head attribution for this unit.</p>"
        relevant = [h for h in heads if h.get("relevant")]
        others = sorted((h for h in heads if not h.get("relevant")),
                        key=lambda h: -abs(number(h.get("mean_attribution")) or 0.0))[:5]
        rows = [[_td(h["head"]), _td("relevant" if h.get("relevant") else "–"), _td(h.get("active_fraction"), True),
                 _td(h.get("mean_attribution"), True), _td(h.get("ablation_effect"), True),
                 _td(h.get("ablation_pvalue"), True), _td(h.get("prob_drop_active"), True),
                 _td(h.get("prob_drop_inactive"), True)] for h in relevant + others]
        table = _table(["head", "relevant", "active fraction", "mean attribution", "ablation effect", "p (KS)",
                        "prob. drop, active", "prob. drop, inactive"], rows, "heads")
        note = (f"<p class=muted>{len(relevant)} relevant of {len(heads)} upstream heads; "
                "the 5 strongest others shown.</p>")
        return "<h3>Heads</h3>" + note + table + _img(self.plots_dir, self.plots.get(f"heatmap:{uid}"),
                                                      f"attribution heatmap of {uid}")

    def _contexts(self, uid: str) -> str:
        rows = [(line, c) for line, c in self.contexts.get(uid, [])
                if c.get("kind", "top") == "top" and c.get("split") == "train"]
        rows = sorted(rows, key=lambda lc: lc[1].get("rank", 0))[: self.n_contexts]
        if not rows:
            return "<h3>Top contexts</h3><p class=muted>No contexts mined for this unit.</p>"
        active: dict[int, list[str]] = {}
        for h in self.heads.get(uid, []):
            if h.get("relevant"):
                for rank in h.get("active_train_ranks") or []:
                    active.setdefault(rank, []).append(h["head"])
        items = []
        peak = self.peaks.get(uid, 0.0)
        for line, c in rows:
            badges = "".join(f'<span class="badge on">{esc(h)}</span>' for h in active.get(c.get("rank"), []))
            nxt = f' <span class="next">→ {esc(c.get("next_token"))}</span>' if c.get("next_token") is not None else ""
            items.append(f'<li>{self.renderer.html(c, line, peak)}<span class="muted">activation '
                         f'{fmt(c.get("activation"))}{nxt}</span> {badges}</li>')
        return f"<h3>Top contexts (train)</h3><ol class=contexts>{''.join(items)}</ol>"

    def _lookups(self, uid: str, per_head: int = 3) -> str:
        """Per relevant head, its first active train prompts twice: shaded by the unit's activation and by
        the head's look-up contribution, with the first position's share (the attention sink)."""
        records = [r for r in self.lookups.get(uid, []) if r.get("split") == "train" and r.get("active")]
        if not records:
            return ""
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
            rows.append([_td(r["head"]), _td(r["rank"], True), f"<td>{self.renderer.html(c, line, peak)}</td>",
                         f"<td>{lookup_html(self.renderer.pieces(c), r)}</td>", _td(r.get("attribution"), True),
                         _td(r.get("first_attention"), True), _td(r.get("first_contribution"), True)])
        return ("<h3>Look-ups</h3><p class=muted>What each relevant head drew from the context on its active train "
                "prompts: orange, the unit's activation; blue, the head's contribution from each token (exact: "
                "they sum to the head's attribution; the top recorded positions shaded).</p>"
                + _table(["head", "prompt", "unit activation", "look-up contribution", "head attribution",
                          "first position: attention", "first position: contribution"], rows, "lookups"))

    def _explanations(self, uid: str) -> str:
        ex = self.explanations.get(uid, [])
        if not ex:
            return ""
        rows = [[_td(e.get("head") or "(unit)"), _td(e.get("explainer")), _td(e.get("text")),
                 _td(e.get("status", "ok")), _td(" / ".join(str(e.get(k)) for k in ("backend", "model") if e.get(k))),
                 _td(e.get("cost_usd"), True)] for e in ex]
        return "<h3>Explanations</h3>" + _table(["head", "explainer", "explanation", "status", "backend / model",
                                                 "cost (USD)"], rows)

    def _scores(self, uid: str) -> str:
        sc = self.scores.get(uid, [])
        if not sc:
            return ""
        rows = [[_td(s.get("head") or "(unit)"), _td(s.get("scorer")), _td(s.get("value"), True),
                 f'<td class="num">[{fmt(s.get("ci_low"))}, {fmt(s.get("ci_high"))}]</td>', _td(s.get("n"), True),
                 _td("well explained" if self.well_explained_badge(uid, s) else "")]
                for s in sc]
        return "<h3>Scores</h3>" + _table(["head", "scorer", "value", "95% CI", "n", ""], rows)

    def well_explained_badge(self, uid: str, s: dict) -> bool:
        """The "well explained" badge as the score stage decided it (`RunTables.badges`, summary.json):
        an E score at or above the threshold whose difference to each of its controls has its whole
        interval above 0, never on a point value (E = 0.75 [0.5, 1] over 10 prompts gets none)."""
        return self.badges.get((uid, s.get("head"), s.get("scorer"), s.get("explainer")), False)

    def headline(self) -> str:
        """The box the report opens with: per scorer, real versus each control, the difference with its
        CI and the verdict in words (summary.json's `headline`), then its confound warnings, its flags
        (near-identical explanations, a one-sided judge) and how many E scores are well explained."""
        summary = self.res.side.get("summary") or {}
        h = summary.get("headline") or {}
        rows = []
        for scorer in ("E", "auroc", "unit_E", "unit_auroc", "unit_sim_correlation"):
            block = h.get(scorer) or {}
            real = (block.get("real") or {}).get("mean")
            for name, label in (("random_units", "random units"), ("shuffled", "shuffled explanations"),
                                ("length", "length-only judge"), ("token", "token-present judge")):
                c = block.get(f"real_minus_{name}")
                if c is None:
                    continue
                rows.append([_td(scorer), _td(real, True), _td(label), _td(c.get("difference"), True),
                             f'<td class="num">[{fmt(c.get("ci_low"))}, {fmt(c.get("ci_high"))}]</td>',
                             f'<td class="verdict">{esc(c.get("verdict"))}</td>'])
        notes = list(summary.get("confound_warnings") or []) + list((summary.get("flags") or {}).get("messages") or [])
        warn = "".join(f"<li>{esc(w)}</li>" for w in notes)
        well = summary.get("well_explained")
        if well:
            warn += (f'<li class="badges">well explained: {int(well["n_badges"])} of {int(well["n_scores"])} E scores '
                     f'(E ≥ {fmt(well["threshold"])} and the interval of the difference to every control above 0)</li>')
        if not rows and not warn:
            return ""
        table = _table(["scorer", "real (mean)", "control", "real − control", "95% CI", "verdict"], rows) if rows else ""
        return ('<section id="headline" class="headline"><h2>Headline: real scores against their controls</h2>'
                + table + (f'<ul class="warnings">{warn}</ul>' if warn else "") + "</section>")

    def _versus(self, uid: str) -> str:
        rows = self.comparison.get(uid, [])
        if not rows:
            return ""
        body = [[_td(r["scorer"]), _td(r["unit_score"], True), _td(r["head_score_mean"], True),
                 _td(r["head_score_max"], True), _td(r["best_head"]), _td(r["n_heads"], True)] for r in rows]
        return "<h3>Head vs neuron</h3>" + _table(["scorer", "unit's own", "heads (mean)", "heads (max)",
                                                   "best head", "heads scored"], body)

    def summary(self, metrics: dict[str, Any]) -> str:
        order = ["units", "contexts", "heads", "explanations", "scores", "cost"]
        groups: dict[str, list[list[str]]] = {}
        for key, value in sorted(metrics.items(), key=lambda kv: (order.index(kv[0].split("/")[0])
                                                                  if kv[0].split("/")[0] in order else 99, kv[0])):
            if key.endswith("_control") and key.removesuffix("_control") in metrics:
                continue  # shown beside its selected-units number
            group, _, name = key.partition("/")
            groups.setdefault(group, []).append([_td(name), _td(value, True), _td(metrics.get(f"{key}_control"), True)])
        tables = "".join(f"<h3>{esc(g)}</h3>" + _table(["metric", "selected units", "control units"], rows)
                         for g, rows in groups.items())
        attribute = self.res.side.get("attribute") or {}
        skipped = attribute.get("skipped_units") or []
        skipped_html = ""
        if skipped:
            skipped_html = "<h3>Skipped units</h3>" + _table(
                ["unit", "reason"], [[_td(s.get("unit_id")), _td(s.get("reason"))] for s in skipped])
        plots = "".join(_img(self.plots_dir, self.plots.get(name), title) for name, title in (
            ("unit_layers", "units per layer"), ("score_histograms", "explanation scores"),
            ("ablation_boxplot", "ablation"), ("head_vs_neuron", "head vs neuron")))
        model = self.res.side.get("model") or {}
        facts = "".join(f"<dt>{esc(k)}</dt><dd>{esc(model.get(k))}</dd>" for k in (
            "model_name", "model_class", "weights", "architecture", "n_layers", "n_heads", "d_mlp") if k in model)
        notes = "".join(f"<li>{esc(k)}{': ' + str(n) if n else ''}</li>" for k, n in self.renderer.problems.items())
        return (f'<section id="summary" class="page"><p><a href="#units">← all units</a></p><h2>Run summary</h2>'
                f"<dl>{facts}</dl><p class=muted>Control units are random units of the same layers, carried "
                f"through every stage like the selected ones (the paper's random baseline).</p>"
                f"{tables}{skipped_html}{plots}"
                + (f"<h3>Notes</h3><ul>{notes}</ul>" if notes else "") + "</section>")

    def render(self, metrics: dict[str, Any]) -> str:
        model = (self.res.side.get("model") or {}).get("model_name", "")
        pages = [self.headline(), self.unit_list()] + [self.unit_page(u) for u in self.ordered_units()] + [
            self.summary(metrics)]
        return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<meta name=\"viewport\" content=\"width=device-width\"><title>sae-lens-ctx: {esc(model)}</title>"
                f"<style>{CSS}</style></head><body><header><h1>sae-lens-ctx report: {esc(model)}</h1>"
                "<nav><a href=\"#units\">Units</a><a href=\"#summary\">Run summary</a></nav></header><main>"
                + "\n".join(pages) + "</main></body></html>\n")


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
