"""The score stage: a Yes/No judge on held-out prompts, metrics, controls and bootstrap intervals.

What is judged (every call is one `explain/prompts.py` judge prompt through the explain section's
backend and cache):

* **(unit, head) pairs** (paper-method §5.3): the pair's explanation against each of the unit's
  held-out 'top' prompts; the ground truth is whether attribution marked the head active on that
  prompt (`HeadRecord.active_test_ranks`). E = balanced accuracy; AUROC from the judge's P(Yes).
* **shuffled control**: the same prompts judged with another pair's explanation.
* **units**: the unit's own explanation against its held-out 'top' (positive) and 'low' (negative)
  prompts: E and AUROC, and neuron-explainer's `simulate_and_score` correlation over top, low and
  random held-out prompts (each prompt one record, the simulated activation at its last token
  10·P(Yes)); and the unit explanation joined with its best head's explanation (highest E), for the
  head-versus-neuron table.

Metrics are pure functions of labels and judge outputs (`balanced_accuracy`, `auroc`, `parse_answer`,
`p_yes`, `bootstrap_ci`, `compare`, `paper_statistics`) so that they are checked by hand in tests.
A failed call, or a reply with no standalone yes/no word (`parse_answer`), or whose Yes/No position
holds less than `MIN_YES_NO_MASS` of Yes/No probability, is counted (unparsed) and never scored.

Outputs: `scores.jsonl` (`ScoreRecord`s), `judgements.jsonl` (every judge call, to trace a score
back to the answers), `summary.json` (aggregates beside their controls).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import numpy as np

from ...clients.llm import LLM
from ...core.config import ScoreConfig
from ...core.records import CONFOUND_CONTROLS, ExplanationRecord, ScoreRecord, UnitRecord, atomic_write, write_jsonl
from ...inputs.context import RunContext
from ...core.lookups import EXPLAINER as LOOKUP
from .controls import confound_judgements, control_scores, length_gaps
from .lookups import SHUFFLED_TASK as SHUFFLED_UNIT
from .lookups import unit_lookup_judgements
from .jobs import (INPUTS, Inputs, Job, build_jobs, build_joined_jobs, lookup_judgements, read_inputs,  # noqa: F401
                   shuffled_partner, unit_job, unit_prompts)
from .judge import (MIN_YES_NO_MASS, Judgement, answer_position, p_yes, parse_answer, run_judgements,  # noqa: F401
                    unit_judge_messages)
from .metrics import (aggregate, auroc, auroc_along, balanced_accuracy, balanced_accuracy_along,  # noqa: F401
                      bootstrap_ci, compare, paper_statistics, pearson, pearson_along, score_group,
                      simulate_and_score_correlation, simulation_score)
from .simulation import (TIERS, probe_tier, read_head_sequences, read_sequences, simulation_scores, simulation_summary,  # noqa: F401
                         simulation_text)
from .verdicts import ONE_SIDED, SIMILAR_JACCARD, flags, one_sided_judge, well_explained  # noqa: F401

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def compute_scores(judgements: Sequence[Judgement], units: dict[str, UnitRecord], cfg: ScoreConfig,
                   seed: int, inp: Inputs | None = None) -> list[ScoreRecord]:
    """Every `ScoreRecord` from the judgements: per pair (own and shuffled), per unit, per unit+head;
    with `inp`, each record's `explainer` and the confound controls beside them (`controls.py`).
    `control_kind`: 'random_unit' for a random control unit's scores, 'shuffled' for `shuffled_*`."""

    groups: dict[tuple, list[Judgement]] = defaultdict(list)
    for j in judgements:
        groups[(j.task, j.unit_id, j.head, j.explainer)].append(j)
    prefix = {"head": "", "shuffled": "shuffled_", "unit": "unit_", "unit+head": "unit_plus_head_",
              SHUFFLED_UNIT: "shuffled_unit_"}
    records: list[ScoreRecord] = []
    for (task, unit_id, head, explainer), js in groups.items():
        control = bool(unit_id in units and units[unit_id].control)
        group = score_group(js, unit_id, head, prefix[task], control, cfg, seed)
        if task == "unit":
            group.append(simulation_score(js, unit_id, control, cfg, seed))
        kind = "shuffled" if task in ("shuffled", SHUFFLED_UNIT) else "random_unit" if control else None
        records += [replace(r, explainer=explainer, control_kind=kind) for r in group]
    if inp is not None:  # the confound controls of the LLM's explanations
        records += control_scores([j for j in judgements if j.explainer != LOOKUP], inp, cfg, seed)
    return records


def explainer_summary(scores: Sequence[ScoreRecord], explainer: str, cfg: ScoreConfig, seed: int,
                      well_explained: float) -> dict[str, Any]:
    """One explainer's E and AUROC (real pairs, random control units, shuffled explanations), the same
    aggregates and comparisons as the headline (`summarize`), and its paper statistics."""
    boot = dict(n_resamples=cfg.bootstrap_resamples, confidence=cfg.confidence, seed=seed)
    mine = [s for s in scores if s.explainer == explainer]
    out: dict[str, Any] = {}
    for scorer in ("E", "auroc", "unit_E", "unit_auroc"):
        real, ctrl = _values(mine, scorer, False), _values(mine, scorer, True)
        out[scorer] = {"real": aggregate(real, **boot), "random_units": aggregate(ctrl, **boot),
                       "real_minus_random_units": compare(real, ctrl, **boot)}
        paired_real, shuffled = _paired(mine, scorer, f"shuffled_{scorer}", False)
        out[scorer]["shuffled_explanations"] = aggregate([v for v in shuffled if v is not None], **boot)
        out[scorer]["real_minus_shuffled"] = compare(paired_real, shuffled, paired=True, **boot)
        if scorer.startswith("unit_"):  # the confound controls judge the same held-out prompts of each unit
            keys = [s.unit_id for s in mine if s.scorer == scorer and not s.control and s.control_kind is None]
            own = {s.unit_id: s.value for s in mine if s.scorer == scorer and not s.control and s.control_kind is None}
            for kind in CONFOUND_CONTROLS:
                other = {s.unit_id: s.value for s in scores if s.control_kind == kind and s.scorer == scorer
                         and not s.control}
                out[scorer][f"real_minus_{kind}"] = compare([own[k] for k in keys], [other.get(k) for k in keys],
                                                            paired=True, **boot)
    out["paper_statistics"] = paper_statistics(_values(mine, "E", False), well_explained)
    out["pairs_scored"] = len([s for s in mine if s.scorer == "E" and s.value is not None])
    return out


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _values(scores: Sequence[ScoreRecord], scorer: str, control: bool, kind: str | None = None) -> list[float]:
    """Values of one scorer on real (`control=False`) or random control units; `kind` picks a confound
    control's records instead of the judge's."""
    return [s.value for s in scores if s.scorer == scorer and s.control == control and s.value is not None
            and (s.control_kind if s.control_kind in CONFOUND_CONTROLS else None) == kind]


def _paired(scores: Sequence[ScoreRecord], a: str, b: str, control: bool, kind: str | None = None) -> tuple[list, list]:
    """Values of scorer `a` (the judge's) and `b` (of confound `kind`, or the judge's) per (unit, head)."""
    def key_of(s):
        return s.control_kind if s.control_kind in CONFOUND_CONTROLS else None
    by = {(s.unit_id, s.head, s.scorer): s.value for s in scores if s.control == control and key_of(s) == kind}
    keys = [(s.unit_id, s.head) for s in scores if s.scorer == a and s.control == control and key_of(s) is None]
    real = {(s.unit_id, s.head): s.value for s in scores if s.scorer == a and s.control == control and key_of(s) is None}
    return [real[k] for k in keys], [by.get((*k, b)) for k in keys]


def head_versus_neuron(scores: Sequence[ScoreRecord]) -> list[dict[str, Any]]:
    """One row per unit with relevant heads: its own explanation's E/AUROC on its held-out top-vs-low
    prompts, its head explanations' mean E/AUROC on head activity, and the best unit+head AUROC."""
    by_unit: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for s in scores:
        if s.control_kind not in CONFOUND_CONTROLS:
            by_unit[s.unit_id][s.scorer].append(s.value)
    rows = []
    for unit_id, m in by_unit.items():
        if not m.get("E"):
            continue

        def mean(name):
            v = [x for x in m.get(name, []) if x is not None]
            return float(np.mean(v)) if v else None

        def best(name):
            v = [x for x in m.get(name, []) if x is not None]
            return float(max(v)) if v else None

        unit_auc, joined = mean("unit_auroc"), best("unit_plus_head_auroc")
        rows.append({"unit_id": unit_id, "n_heads": len(m["E"]), "unit_E": mean("unit_E"), "unit_auroc": unit_auc,
                     "unit_sim_correlation": mean("unit_sim_correlation"), "head_E_mean": mean("E"),
                     "head_auroc_mean": mean("auroc"), "unit_plus_head_E_best": best("unit_plus_head_E"),
                     "unit_plus_head_auroc_best": joined,
                     "heads_add_auroc": None if unit_auc is None or joined is None else joined - unit_auc})
    return rows


def summarize(scores: Sequence[ScoreRecord], judgements: Sequence[Judgement], inp: Inputs, cfg: ScoreConfig,
              seed: int, well_explained_threshold: float) -> dict[str, Any]:
    """summary.json: headline aggregates with their controls beside them, tests and counts; the "well
    explained" badges and the flags (`verdicts.py`)."""
    boot = dict(n_resamples=cfg.bootstrap_resamples, confidence=cfg.confidence, seed=seed)
    headline: dict[str, Any] = {}
    for scorer in ("E", "auroc", "unit_E", "unit_auroc", "unit_sim_correlation", "unit_plus_head_auroc"):
        headline[scorer] = {"real": aggregate(_values(scores, scorer, False), **boot),
                            "random_units": aggregate(_values(scores, scorer, True), **boot)}
        headline[scorer]["real_minus_random_units"] = compare(
            _values(scores, scorer, False), _values(scores, scorer, True), **boot)
    for scorer in ("E", "auroc"):
        real, shuffled = _paired(scores, scorer, f"shuffled_{scorer}", False)
        headline[scorer]["shuffled_explanations"] = aggregate([v for v in shuffled if v is not None], **boot)
        headline[scorer]["real_minus_shuffled"] = compare(real, shuffled, paired=True, **boot)
    warnings_ = []
    for scorer in ("E", "auroc", "unit_E", "unit_auroc", "unit_sim_correlation"):
        for kind in CONFOUND_CONTROLS:
            real, other = _paired(scores, scorer, scorer, False, kind)
            headline[scorer][f"{kind}_control"] = aggregate([v for v in other if v is not None], **boot)
            headline[scorer][f"real_minus_{kind}"] = c = compare(real, other, paired=True, **boot)
            if c["n_real"] and not c["distinguishable"]:
                warnings_.append(f"{scorer}: the real score does not beat its {kind}-only control "
                                 f"(real − {kind} = {_num(c['difference'])}, CI [{_num(c['ci_low'])}, "
                                 f"{_num(c['ci_high'])}]): {c['verdict']}")
    head_js = [j for j in judgements if j.task == "head" and j.status == "ok" and j.explainer != LOOKUP]
    labels = [j.label for j in head_js]
    yes_rate = float(np.mean([j.answer for j in head_js])) if head_js else None
    headline["constant_judges"] = {
        "always_yes_E": 0.5, "always_no_E": 0.5,
        "note": "a constant judge has TPR + TNR = 1 on every two-class pair: E = 0.5 exactly",
        "class_balance_active": float(np.mean(labels)) if labels else None,
        "judge_yes_rate": yes_rate,
    }
    rows = head_versus_neuron(scores)
    counts = Counter(j.status for j in judgements)
    by_scorer = Counter((s.scorer if s.control_kind not in CONFOUND_CONTROLS else f"{s.scorer} ({s.control_kind} control)",
                         s.skipped) for s in scores if s.skipped)

    llm_judgements = [j for j in judgements if j.explainer != LOOKUP]
    flagged = flags(_explanations_read(inp), llm_judgements)
    judge = flagged["one_sided_judge"]
    headline["constant_judges"]["judge_yes_rate_all"] = judge["yes_share"] if judge else None

    gaps = length_gaps(judgements, inp)
    if gaps["gaps"]:
        warnings_.append(gaps["verdict"])
    return {
        "headline": headline,
        "confound_warnings": warnings_,
        "flags": flagged,
        "well_explained": well_explained(scores, llm_judgements, confound_judgements(llm_judgements, inp), cfg, seed,
                                         well_explained_threshold),
        "length_gaps": gaps,
        "paper_statistics": {"real": paper_statistics(_values(scores, "E", False), well_explained_threshold),
                             "random_units": paper_statistics(_values(scores, "E", True), well_explained_threshold)},
        "head_versus_neuron": rows,
        "counts": {"pairs_relevant": len(inp.pairs),
                   "pairs_scored": len([s for s in scores if s.scorer == "E" and s.value is not None
                                        and s.control_kind not in CONFOUND_CONTROLS]),
                   "not_scored": dict(inp.not_scored),
                   "skipped_scores": {f"{k}: {r}": v for (k, r), v in sorted(by_scorer.items())},
                   "judgements": len(judgements), "parsed": counts["ok"], "unparsed": counts["unparsed"],
                   "failed": counts["failed"]},
        "judge": {"prompt": cfg.judge_prompt, "max_tokens": cfg.max_tokens, "top_logprobs": cfg.top_logprobs},
    }


def _explanations_read(inp: Inputs) -> list[ExplanationRecord]:
    """The LLM's explanations that were read (status 'ok'), heads' and units' (`verdicts.flags` takes them)."""
    return [e for e in [*inp.head_explanations.values(), *inp.unit_explanations.values()] if e.text]


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def summary_line(s: dict) -> str:
    """The one line the stage prints: what was scored (the findings and verdicts follow at the end of the run,
    `stages.report.findings`; every number is in summary.json)."""
    c = s["counts"]
    return (f"scored {c['pairs_scored']}/{c['pairs_relevant']} relevant pairs from {c['judgements']} judgements "
            f"({c['unparsed']} unparsed, {c['failed']} failed)")


def summary_text(s: dict) -> str:
    """Every headline number, control and warning in words (the long form; `summary_line` is what is printed)."""
    h, c = s["headline"], s["counts"]

    def fmt(a: dict) -> str:
        if a["mean"] is None:
            return "n/a (n=0)"
        ci = f" [{a['ci_low']:.3f}, {a['ci_high']:.3f}]" if a["ci_low"] is not None else ""
        return f"{a['mean']:.3f}{ci} (n={a['n']})"

    lines = [f"scored {c['pairs_scored']}/{c['pairs_relevant']} relevant pairs from {c['judgements']} judgements "
             f"({c['unparsed']} unparsed, {c['failed']} failed)"]
    for scorer in ("E", "auroc", "unit_auroc", "unit_sim_correlation"):
        lines.append(f"  {scorer:<21} real {fmt(h[scorer]['real'])}; random units {fmt(h[scorer]['random_units'])}")
        lines.append(f"  {'':<21} vs random units: {h[scorer]['real_minus_random_units']['verdict']}")
        if "real_minus_shuffled" in h[scorer]:
            lines.append(f"  {'':<21} vs shuffled explanations: {h[scorer]['real_minus_shuffled']['verdict']}")
        for kind in CONFOUND_CONTROLS:
            if f"real_minus_{kind}" in h[scorer]:
                lines.append(f"  {'':<21} vs {kind}-only judge {fmt(h[scorer][f'{kind}_control'])}: "
                             f"{h[scorer][f'real_minus_{kind}']['verdict']}")
    lines += [f"warning: {w}" for w in s.get("confound_warnings", [])]
    lines += [f"flag: {m}" for m in s.get("flags", {}).get("messages", [])]
    if "well_explained" in s:
        w = s["well_explained"]
        lines.append(f"well explained: {w['n_badges']} of {w['n_scores']} E scores (E ≥ {w['threshold']:g} and the "
                     "interval of the difference to every control above 0)")
    for name, block in s.get("explainers", {}).items():
        for scorer in [k for k in ("E", "auroc", "unit_E", "unit_auroc") if k in block]:
            b = block[scorer]
            lines.append(f"  {name + ' ' + scorer:<21} real {fmt(b['real'])}; shuffled {fmt(b['shuffled_explanations'])}; "
                         f"random units {fmt(b['random_units'])}")
    if s.get("simulation"):
        lines.append(simulation_text(s["simulation"]))
    return "\n".join(lines)


def run_cost(ctx: RunContext, judgements: Sequence[Judgement]) -> dict[str, Any]:
    """What the run's results cost in LLM calls: the explanations' (explain.json) and the judgements'.
    Calls answered from the cache count at their price (what this invocation paid is in `stages.json`)."""
    explained = json.loads(ctx.path("explain.json").read_text()) if ctx.path("explain.json").is_file() else {}
    ok = [j for j in judgements if j.status != "failed"]
    out = {"explain_usd": explained.get("cost_usd"), "explain_prompt_tokens": explained.get("prompt_tokens"),
           "explain_completion_tokens": explained.get("completion_tokens"),
           "judge_usd": round(sum(j.cost_usd or 0.0 for j in ok), 6),
           "judge_unpriced": sum(j.cost_usd is None for j in ok),
           "judge_prompt_tokens": sum(j.prompt_tokens for j in ok),
           "judge_completion_tokens": sum(j.completion_tokens for j in ok)}
    out["total_usd"] = round(sum(v for k, v in out.items() if k.endswith("usd") and v is not None), 6)
    return out


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def simulation_tier(llm: LLM, cfg: ScoreConfig, sequences: dict) -> tuple[str | None, str]:
    """The LLM simulation tier of this run (`simulation.probe_tier`, asked once before any heavy work),
    announced in one line; None (only the deterministic tier) when off, without sequences, or unserved."""
    if cfg.simulate == "off" or not cfg.unit_scores:
        tier, why = None, "score.simulate is off" if cfg.simulate == "off" else "score.unit_scores is off"
    elif not sequences:
        tier, why = None, "no held-out sequences (windows.jsonl): re-run the mine stage"
    else:
        tier, why = probe_tier(llm, cfg.simulate)
    if tier is None:
        print(f"simulation: no LLM tier ({why}); look-up explanations and controls are simulated (deterministic)")
    else:
        print(f"simulation: {tier} tier ({why})")
    return tier, why


def _derangement(keys: list, seed: int) -> dict:
    """The shuffled control's partners (`jobs.shuffled_partner`) of unit ids or of (unit, head) pairs."""
    if not keys or not isinstance(keys[0], str):
        return shuffled_partner(keys, seed)
    return {k[0]: v[0] for k, v in shuffled_partner([(u, None) for u in keys], seed).items()}


def run_stage(ctx: RunContext) -> None:
    """`sae-lens-ctx score`: write `scores.jsonl`, `judgements.jsonl` and `summary.json`; print a summary."""
    cfg = ctx.config.score
    inp = read_inputs(ctx)
    jobs = build_jobs(inp, cfg, ctx.config.seed)
    start = time.perf_counter()
    llm = LLM.from_config(ctx.config.explain, ctx.out)
    sequences = read_sequences(ctx.path("windows.jsonl"), cfg) if cfg.unit_scores else {}
    head_sequences = read_head_sequences(ctx.path("windows.jsonl"), ctx.path("head_tokens.jsonl"), cfg) \
        if cfg.unit_scores else {}
    tier, why = simulation_tier(llm, cfg, sequences)
    try:
        judgements = run_judgements(llm, jobs, cfg)
        judgements += run_judgements(llm, build_joined_jobs(inp, judgements, cfg), cfg)
        sim_start = time.perf_counter()
        simulated = simulation_scores(llm, tier, inp, sequences, cfg, ctx.config.seed,
                                      partner=lambda keys: _derangement(keys, ctx.config.seed),
                                      head_sequences=head_sequences)
        sim_seconds = round(time.perf_counter() - sim_start, 1)
    finally:
        llm.close()
    looked_up = lookup_judgements(inp, cfg, ctx.config.seed) + unit_lookup_judgements(inp, cfg, ctx.config.seed)
    write_jsonl(ctx.path("judgements.jsonl"), [asdict(j) for j in judgements + looked_up])
    scores = compute_scores(judgements + looked_up, inp.units, cfg, ctx.config.seed, inp) + simulated.scores
    write_jsonl(ctx.path("scores.jsonl"), scores)
    llm_scores = [s for s in scores if s.explainer != LOOKUP]
    well = ctx.config.logging.well_explained
    summary = summarize(llm_scores, judgements + looked_up, inp, cfg, ctx.config.seed, well)
    summary["explainers"] = {LOOKUP: explainer_summary(scores, LOOKUP, cfg, ctx.config.seed, well)}
    by_unit = defaultdict(lambda: defaultdict(list))
    for s in scores:
        if s.explainer == LOOKUP and s.control_kind != "shuffled" and s.value is not None:
            by_unit[s.unit_id][s.scorer].append(s.value)
    for row in summary["head_versus_neuron"]:
        for scorer in ("E", "auroc"):
            v = by_unit[row["unit_id"]][scorer]
            row[f"lookup_{scorer}_mean"] = float(np.mean(v)) if v else None
        for scorer in ("unit_E", "unit_auroc"):  # the unit's own look-up pattern
            v = by_unit[row["unit_id"]][scorer]
            row[f"lookup_{scorer}"] = float(v[0]) if v else None
    summary["simulation"] = {**{k: v for k, v in simulated.info.items() if k != "prefix_cache"}, "probe": why,
                             "tiers": simulation_summary(simulated.scores, cfg, ctx.config.seed),
                             "heads": simulation_summary(simulated.scores, cfg, ctx.config.seed, target="head")}
    summary["cost"] = run_cost(ctx, judgements)
    atomic_write(ctx.path("summary.json"), json.dumps(summary, indent=2) + "\n")
    ctx.this_run.update(judge=llm.summary(), seconds=round(time.perf_counter() - start, 1),
                        simulation_seconds=sim_seconds, simulation_prefix_cache=simulated.info.get("prefix_cache"))
    print(summary_line(summary))
