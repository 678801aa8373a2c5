"""The explain stage: LLM explanations of every relevant (unit, head) pair and of every unit.

Reads `units.jsonl`, `contexts.jsonl` (+ `context_acts.safetensors`) and `heads.jsonl` from the run
directory; writes `explanations.jsonl` (one `ExplanationRecord` per pair and per unit, failures
included as failed) and `explain.json` (counts, failures by reason, tokens and cost).

Modules: `heads` (the paper's head explanations) and `units` (neuron-explainer's unit explanations);
the look-up explanations (no LLM) come from `core.lookups`, the prompts from `core.prompts`, the LLM
call layer from `clients.llm`. Inputs are read as typed records (`core.records`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter

from ...clients.llm import LLM, token_counter
from ...core.layout import require_inputs
from ...core.prompts import mark_tokens
from ...core.lookups import EXPLAINER as LOOKUP
from ...core.lookups import LookupRecord, QkRecord, explain_lookups, looked_up_positions
from ...core.records import (ContextRecord, ExplanationRecord, HeadRecord, UnitRecord, atomic_write, read_jsonl,
                             write_jsonl)
from ...inputs.context import RunContext
from ...inputs.tokens import token_strings
from . import heads as head_mod
from . import units as unit_mod
from .lookups import unit_lookup_explanations
from .sample import llm_sample

log = logging.getLogger(__name__)

INPUTS = ("units.jsonl", "contexts.jsonl", "heads.jsonl")
"""The files this stage reads (`core.layout` names the stage that writes each)."""


def run_stage(ctx: RunContext) -> None:
    """`sae-lens-ctx explain`: write `explanations.jsonl` and `explain.json`; print a summary."""
    cfg = ctx.config.explain
    require_inputs(ctx.out, INPUTS)
    units = read_jsonl(ctx.path("units.jsonl"), UnitRecord)
    contexts = read_jsonl(ctx.path("contexts.jsonl"), ContextRecord)
    heads = read_jsonl(ctx.path("heads.jsonl"), HeadRecord)
    start = time.perf_counter()
    llm = LLM.from_config(cfg, ctx.out)
    window = getattr(llm.client, "context_window", None)
    if window and window < cfg.context_window:  # an in-process model's own limit (clients.llama_cpp_client.local_n_ctx)
        cfg = dataclasses.replace(cfg, context_window=window)
    try:
        count = token_counter(llm.client)
        lookup_rows = (read_jsonl(ctx.path("lookups.jsonl"), LookupRecord) if ctx.path("lookups.jsonl").is_file()
                       else [])
        marked = marked_examples(contexts, lookup_rows, ctx.model.tokenizer, cfg) if cfg.mark_lookups else None
        head_jobs = head_mod.build_jobs(units, contexts, heads, cfg, count, seed=ctx.config.seed, marked=marked)
        unit_jobs = []
        if cfg.explain_units:
            unit_jobs = unit_mod.build_jobs(units, contexts, ctx.path("context_acts.safetensors"),
                                            ctx.model.tokenizer, cfg)
        sampled = llm_sample(units, cfg.llm_units, ctx.config.seed)  # explain.llm_units (0: every unit)
        head_jobs = [j for j in head_jobs if j.unit_id in sampled]
        unit_jobs = [j for j in unit_jobs if j.unit_id in sampled]
        # Heads first, then units: in-process backends reuse a shared prompt prefix between consecutive calls.
        head_records = head_mod.explain_heads(llm, head_jobs, cfg)
        unit_records = unit_mod.explain_units(llm, unit_jobs, cfg, count) if unit_jobs else []
    finally:
        llm.close()
    # no LLM, seconds; none from a run directory without look-ups (attribute.lookups=false)
    qk_rows = read_jsonl(ctx.path("qk.jsonl"), QkRecord) if ctx.path("qk.jsonl").is_file() else []
    lookup_records = explain_lookups(units, contexts, heads, lookup_rows, cfg, qk_rows) if lookup_rows else []
    unit_lookups = unit_lookup_explanations(ctx, units, contexts)  # occlusion (N2G-style), no LLM
    records = ordered(units, head_records + lookup_records, unit_records + unit_lookups)
    write_jsonl(ctx.path("explanations.jsonl"), records)
    summary = summarize([r for r in records if r.explainer != LOOKUP], llm)
    c = Counter(r.status for r in lookup_records)
    summary["lookup"] = {"total": len(lookup_records), "ok": c["ok"], "skipped": c["skipped"],
                         "reasons": dict(sorted(Counter(r.error.split(":", 1)[0] for r in lookup_records
                                                        if r.error).items())),
                         "source": "lookups.jsonl" if lookup_rows else "none (attribute.lookups is off)"}
    c = Counter(r.status for r in unit_lookups)
    summary["lookup"]["units"] = {
        "total": len(unit_lookups), "ok": c["ok"], "skipped": c["skipped"],
        "reasons": dict(sorted(Counter(r.error.split(":", 1)[0] for r in unit_lookups if r.error).items())),
        "source": "occlusions.jsonl" if unit_lookups else "none (attribute.occlusion is off)"}
    atomic_write(ctx.path("explain.json"), json.dumps(summary, indent=2) + "\n")
    ctx.this_run.update(llm=llm.summary(), seconds=round(time.perf_counter() - start, 1))
    print(summary_text(summary, ctx.this_run))


def marked_examples(contexts: list[ContextRecord], lookup_rows: list[LookupRecord], tokenizer,
                    cfg) -> dict[tuple[str, str, int], str]:
    """(unit, head, train rank) → the active prompt's text with the tokens the head looked up marked
    (`prompts.mark_tokens`), for `explain.mark_lookups`."""

    tokens_of = {(c.unit_id, c.rank): c.tokens for c in contexts if c.split == "train" and c.kind == "top"}
    return {(u, h, r): mark_tokens(token_strings(tokenizer, tokens_of[(u, r)]), positions)
            for (u, h, r), positions in looked_up_positions(lookup_rows, cfg.lookup_min_share).items()
            if (u, r) in tokens_of}


def ordered(units: list[UnitRecord], head_records: list[ExplanationRecord],
            unit_records: list[ExplanationRecord]) -> list[ExplanationRecord]:
    """Per unit (units.jsonl order): its own explanation, then its heads (heads.jsonl order)."""
    by_unit: dict[str, list[ExplanationRecord]] = {u.unit_id: [] for u in units}
    for r in unit_records + head_records:
        by_unit.setdefault(r.unit_id, []).append(r)
    return [r for rs in by_unit.values() for r in rs]


def summarize(records: list[ExplanationRecord], llm) -> dict:
    """explain.json: what the explanations hold, the same on every re-run (what this invocation did, calls
    made versus answered from the cache, is the stage's `this_run` in `stages.json`)."""

    def counts(rs: list[ExplanationRecord]) -> dict:
        c = Counter(r.status for r in rs)
        return {"total": len(rs), "ok": c["ok"], "failed": c["failed"], "skipped": c["skipped"]}

    ok = [r for r in records if r.status == "ok"]
    return {
        "backend": llm.backend,
        "model": llm.model,
        "explanations": {**counts(records), "heads": counts([r for r in records if r.head is not None]),
                         "units": counts([r for r in records if r.head is None])},
        "failures": dict(sorted(Counter(r.error.split(":", 1)[0] for r in records
                                        if r.status == "failed" and r.error).items())),
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "completion_tokens": sum(r.completion_tokens for r in ok),
        "cost_usd": round(sum(r.cost_usd or 0.0 for r in ok), 6),
        "unpriced": sum(r.cost_usd is None for r in ok),
        "cut_off": sum(r.finish_reason == "length" for r in ok),
        "prompts_with_dropped_examples": sum(r.n_dropped > 0 for r in records),
        "dropped_examples": sum(r.n_dropped for r in records),
    }


def summary_text(s: dict, this_run: dict) -> str:
    e, run = s["explanations"], {**this_run["llm"], "seconds": this_run["seconds"]}
    lines = [f"explained {e['ok']}/{e['total']} ({e['heads']['ok']} head pairs, {e['units']['ok']} units) with "
             f"{s['backend']} ({s['model']}); {e['failed']} failed, {e['skipped']} skipped",
             f"  tokens {s['prompt_tokens']} prompt + {s['completion_tokens']} completion, cost ${s['cost_usd']:.4f}"
             + (f" ({s['unpriced']} unpriced)" if s["unpriced"] else ""),
             f"  this run: {run['backend_calls']} backend calls, {run['cache_hits']} cache hits, "
             f"{run['failed']} failed calls in {run['seconds']}s"]
    if s["failures"]:
        lines.append("  failures: " + ", ".join(f"{k} {v}" for k, v in s["failures"].items()))
    if "lookup" in s:
        lk = s["lookup"]
        lines.append(f"  look-up explanations (no LLM): {lk['ok']}/{lk['total']} relevant pairs"
                     + ("; skipped: " + ", ".join(f"{k} {v}" for k, v in lk["reasons"].items()) if lk["reasons"] else ""))
        if "units" in lk:
            lu = lk["units"]
            lines.append(f"  unit look-up explanations (no LLM, occlusion): {lu['ok']}/{lu['total']} units"
                         + ("; skipped: " + ", ".join(f"{k} {v}" for k, v in lu["reasons"].items())
                            if lu["reasons"] else ""))
    return "\n".join(lines)
