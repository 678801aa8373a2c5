"""Attribute: which upstream attention heads drive each unit, exactly, with the paper's rules and a causal check.

Direct attribution (paper §4.1, with the norm scale kept): for a unit read at layer `l` through the
norm (neurons) or straight from the residual stream (SAE latents on `hook_resid_*`), the contribution
of head `h` to the unit's pre-activation at the prompt's last position `T` is

    A[h] = z_h[T] · (W_O[h] @ read) / scale[T]

where `read` is the unit's read direction with the norm gain folded in (centred for LayerNorm, whose
centring the direction then absorbs), and `scale` the norm scale at the unit's input (1 for SAE latents
on the residual stream). `W_O[h] @ read` is folded once per unit, so a prompt costs only its `hook_z` at
`T` and the scale: no activation cache is kept. Summed with the embeddings, every earlier MLP, the
attention biases and the constant, the terms reproduce the hooked pre-activation exactly
(`decompose_pre_activation`, used by the tests and for the direct-path fraction in `attribute.json`).

Prompts are right-padded in a batch: with causal attention nothing at or before `T` sees the padding,
so every row is read at its own last position.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import save_file
from scipy import stats as scipy_stats
from ...core.progress import tqdm  # a bar on a terminal, progress lines in a log

from ...core.config import AttributeConfig
from ...core.errors import UserError
from ...core.records import (ContextRecord, HeadRecord, HeadTokensRecord, UnitRecord, atomic_path, atomic_write,
                              iter_jsonl, read_jsonl, write_jsonl)
from ...core.rules import parse_rule
from ...inputs.context import RunContext
from ...inputs.view import ModelView, pad_id

from .ablation import ablation_drops, ablation_jobs, masked_mean, mean_head_outputs  # noqa: F401
from .occlusion import occluded_activations, occlusion_jobs, occlusion_records  # noqa: F401
from .qk import QkSplitter, head_of, qk_records
from .direct import (UnitRead, attribute_jobs, attribute_prompts, decompose_pre_activation, folded_heads,  # noqa: F401
                     head_label, lookup_records, position_attributions, pad_prompts, source_contributions, unit_read)

log = logging.getLogger(__name__)


# -- the stage -----------------------------------------------------------------------------------


UNITS_PER_PASS = 16
"""Units whose forwards the attribute stage batches together (`attribute_units`, `occlusion.occlusion_jobs`):
enough rows for full batches, while what a pass holds (each unit's per-source split) stays bounded."""


def top_prompts(contexts: list[ContextRecord]) -> dict[tuple[str, str], list[ContextRecord]]:
    """(unit_id, split) → the unit's top prompts of that split, by rank."""
    grouped: dict[tuple[str, str], list[ContextRecord]] = defaultdict(list)
    for c in contexts:
        if c.kind == "top":
            grouped[(c.unit_id, c.split)].append(c)
    return {k: sorted(v, key=lambda c: c.rank) for k, v in grouped.items()}


def _ks_2samp(a, b):
    """Two-sample KS test (scipy's exact method, or its asymptotic one where exact fails, silently)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return scipy_stats.ks_2samp(a, b)


def attribute_unit(view: ModelView, read: UnitRead, train: list[list[int]], test: list[list[int]],
                   train_ranks: list[int], test_ranks: list[int], cfg: AttributeConfig,
                   mean_z: dict[int, torch.Tensor] | None = None, lookups: list | None = None,
                   offset: int = 0) -> tuple[list[HeadRecord], dict, dict]:
    """Attribution, active heads, relevance band and ablation for one unit; returns its head records, the
    per-prompt matrices (for `attributions.safetensors`) and its summary line. Given a list `lookups`,
    appends a `lookups.LookupRecord` per relevant head and train/test prompt (`offset`: tokens prepended
    to the context tokens, 1 for BOS). One unit's `attribute_units`."""
    return attribute_units(view, [UnitPrompts(read, train, test, train_ranks, test_ranks)], cfg, mean_z, lookups,
                           offset)[0]


@dataclass
class UnitPrompts:
    """One unit's read and its prompts as run (BOS included), with their mining ranks."""

    read: UnitRead
    train: list[list[int]]
    test: list[list[int]]
    train_ranks: list[int]
    test_ranks: list[int]


def attribute_units(view: ModelView, items: list[UnitPrompts], cfg: AttributeConfig,
                    mean_z: dict[int, torch.Tensor] | None = None, lookups: list | None = None,
                    offset: int = 0) -> list[tuple[list[HeadRecord], dict, dict]]:
    """`attribute_unit` for many units, batched across them (#28): one pass of forwards computes every unit's
    train and test attributions (`direct.attribute_jobs`), one more every unit's ablation rows
    (`ablation.ablation_jobs`). Per unit, in order: (head records, matrices, summary); look-up records are
    appended unit by unit, as `attribute_unit` appends them."""
    rule = parse_rule(cfg.rule)
    jobs = [(it.read, p) for it in items for p in (it.train, it.test)]
    done = attribute_jobs(view, jobs, cfg.batch_size, cfg.divide_by_scale, lookups is not None)
    states = []
    for n, it in enumerate(items):
        (a_train, pre_train, src_train), (a_test, _, src_test) = done[2 * n], done[2 * n + 1]
        branch = it.read.rank_branch
        active_train = rule.mask(a_train[branch])
        fraction = active_train.float().mean(0)
        relevant = (fraction >= cfg.band_low) & (fraction <= cfg.band_high)
        states.append(_Attributed(
            a_train, pre_train, src_train, a_test, src_test, active_train,
            rule.mask(a_test[branch]) if it.test else torch.zeros(0, len(it.read.labels), dtype=torch.bool),
            fraction, relevant, [j for j in range(len(it.read.labels)) if relevant[j]]))
    ablate = [n for n, (it, st) in enumerate(zip(items, states)) if st.chosen and it.test and cfg.ablation != "none"]
    dropped = ablation_jobs(view, [(items[n].read, items[n].test, [head_of(items[n].read.labels[j])
                                                                   for j in states[n].chosen]) for n in ablate],
                            cfg.ablation, mean_z, cfg.batch_size) if ablate else []
    drops_of = dict(zip(ablate, dropped))
    return [_unit_results(it, st, drops_of.get(n), cfg, lookups, offset, view.tokenizer)
            for n, (it, st) in enumerate(zip(items, states))]


@dataclass
class _Attributed:
    """One unit's attributions (`direct.attribute_jobs`) and what the rule makes of them."""

    a_train: dict[str, torch.Tensor]
    pre_train: dict[str, torch.Tensor]
    src_train: dict[str, torch.Tensor] | None
    a_test: dict[str, torch.Tensor]
    src_test: dict[str, torch.Tensor] | None
    active_train: torch.Tensor
    active_test: torch.Tensor
    fraction: torch.Tensor
    relevant: torch.Tensor
    chosen: list[int]
    """Indices (into the read's labels) of the relevant heads."""


def _unit_results(it: UnitPrompts, st: _Attributed, drops, cfg: AttributeConfig, lookups: list | None, offset: int,
                  tokenizer) -> tuple[list[HeadRecord], dict, dict]:
    """One unit's head records, matrices and summary (and its look-up records appended to `lookups`)."""
    read, train, test, train_ranks, test_ranks = it.read, it.train, it.test, it.train_ranks, it.test_ranks
    a_train, active_train, active_test, chosen = st.a_train, st.active_train, st.active_test, st.chosen
    branch = read.rank_branch
    labels = read.labels
    records = []
    for j, label in enumerate(labels):
        layer, head_index = head_of(label)
        ablation: dict = {}
        if drops is not None and j in chosen:
            k = chosen.index(j)
            prob, act, on = drops[0][:, k], drops[1][:, k], active_test[:, j]
            ablation = dict(prob_drop_active=masked_mean(prob, on), prob_drop_inactive=masked_mean(prob, ~on),
                            act_drop_active=masked_mean(act, on), act_drop_inactive=masked_mean(act, ~on))
            if on.any() and (~on).any():
                ablation["ablation_effect"] = ablation["prob_drop_active"] - ablation["prob_drop_inactive"]
                ablation["ablation_pvalue"] = float(_ks_2samp(prob[on].numpy(), prob[~on].numpy()).pvalue)
        records.append(HeadRecord(
            unit_id=read.unit.unit_id, head=label, layer=layer, head_index=head_index,
            active_fraction=float(st.fraction[j]), mean_attribution=float(a_train[branch][:, j].mean()),
            relevant=bool(st.relevant[j]),
            active_train_ranks=[train_ranks[p] for p in range(len(train)) if active_train[p, j]],
            inactive_train_ranks=[train_ranks[p] for p in range(len(train)) if not active_train[p, j]],
            active_test_ranks=[test_ranks[p] for p in range(len(test)) if active_test[p, j]],
            inactive_test_ranks=[test_ranks[p] for p in range(len(test)) if not active_test[p, j]],
            branch=branch, branch_mean_attribution={b: float(a[:, j].mean()) for b, a in a_train.items()},
            **ablation,
        ))
    if lookups is not None:
        for split, prompts_, ranks, active, src in (("train", train, train_ranks, active_train, st.src_train),
                                                    ("test", test, test_ranks, active_test, st.src_test)):
            if prompts_:
                src = dict(src)
                lookups += lookup_records(tokenizer, read.unit.unit_id, labels, chosen, prompts_, ranks, split,
                                          active, src.pop("attention"), src, branch, offset, cfg.lookup_top_k)
    a_test = st.a_test if test else {}
    matrices = {f"{read.unit.unit_id}/{split}/{b}": a.contiguous()
                for split, per_branch in (("train", a_train), ("test", a_test)) for b, a in per_branch.items()}
    matrices[f"{read.unit.unit_id}/train/ranks"] = torch.tensor(train_ranks)
    matrices[f"{read.unit.unit_id}/test/ranks"] = torch.tensor(test_ranks)
    explained = float(a_train[branch].sum()) / max(abs(float((st.pre_train[branch] - read.bias[branch]).sum())), 1e-12)
    summary = {"unit_id": read.unit.unit_id, "n_train_prompts": len(train), "n_test_prompts": len(test),
               "n_relevant": len(chosen), "direct_head_fraction": explained, "branch": branch}
    return records, matrices, summary


def run_stage(ctx: RunContext) -> None:
    """`sae-lens-ctx attribute`: write `heads.jsonl`, `attributions.safetensors` and `attribute.json`."""
    cfg = ctx.config.attribute
    parse_rule(cfg.rule)
    for name in ("units.jsonl", "contexts.jsonl"):
        if not ctx.path(name).is_file():
            raise UserError(f"{ctx.out} has no {name}: run the discover and mine stages first")
    view = ctx.model
    qk = QkSplitter(view) if cfg.lookups and cfg.qk else None  # refuses an attention it cannot split, first
    units = read_jsonl(ctx.path("units.jsonl"), UnitRecord)
    prompts = top_prompts(read_jsonl(ctx.path("contexts.jsonl"), ContextRecord))
    bos = [view.tokenizer.bos_token_id] if ctx.config.corpus.prepend_bos and view.tokenizer.bos_token_id is not None else []
    saes = {s.sae_id: s for s in ctx.sae_sources()}
    mean_z = None
    if cfg.ablation == "mean":
        sample = [list(c.tokens) for c in ctx.corpus.split("train")[:64]]
        mean_z = mean_head_outputs(view, sample, list(range(view.n_layers)))
    records: list[HeadRecord] = []
    matrices: dict[str, torch.Tensor] = {}
    per_unit, skipped = [], []
    lookups: list | None = [] if cfg.lookups else None
    occlusions: list = []
    replacement = pad_id(view.tokenizer)
    todo: list[UnitPrompts] = []
    windows: dict[str, list[dict]] = defaultdict(list)  # unit → its held-out windows (mine's windows.jsonl)
    if ctx.path("windows.jsonl").is_file():
        for line, w in enumerate(iter_jsonl(ctx.path("windows.jsonl"))):
            windows[w["unit_id"]].append({**w, "line": line})
    head_tokens: list[HeadTokensRecord] = []
    for unit in units:
        train = prompts.get((unit.unit_id, "train"), [])[: cfg.n_prompts]
        test = prompts.get((unit.unit_id, "test"), [])
        if not train:
            skipped.append({"unit_id": unit.unit_id, "reason": "no train prompts (the unit never fired in mining)"})
            continue
        try:
            read = unit_read(view, unit, cfg, saes)
        except UserError as e:
            skipped.append({"unit_id": unit.unit_id, "reason": str(e)})
            continue
        todo.append(UnitPrompts(read, [bos + c.tokens for c in train], [bos + c.tokens for c in test],
                                [c.rank for c in train], [c.rank for c in test]))
    with tqdm(total=len(todo), desc="attribute", unit="unit", disable=None) as bar:
        for g0 in range(0, len(todo), UNITS_PER_PASS):
            group = todo[g0:g0 + UNITS_PER_PASS]
            group_records: list[HeadRecord] = []
            for it, (recs, mats, summary) in zip(group, attribute_units(view, group, cfg, mean_z, lookups, len(bos))):
                summary["control"] = it.read.unit.control
                group_records += recs
                matrices.update(mats)
                per_unit.append(summary)
            records += group_records
            head_tokens += _head_tokens(view, group, group_records, windows, bos, cfg.batch_size, cfg.divide_by_scale)
            if cfg.occlusion:
                occluded = [(it.read, it.train[:cfg.occlusion_prompts]) for it in group]
                for it, (_, run), measured in zip(group, occluded, occlusion_jobs(view, occluded, len(bos), cfg.batch_size)):
                    occlusions += occlusion_records(view.tokenizer, it.read.unit.unit_id, run, it.train_ranks[:len(run)],
                                                    len(bos), measured, replacement)
            bar.update(len(group))
    qk_rows: list = []
    if qk is not None and lookups:
        run_as = {(it.read.unit.unit_id, split, rank): tokens for it in todo
                  for split, ranks, runs in (("train", it.train_ranks, it.train), ("test", it.test_ranks, it.test))
                  for rank, tokens in zip(ranks, runs)}
        qk_rows = qk_records(qk, lookups, run_as, view.tokenizer, cfg.qk_sources, cfg.qk_components, cfg.batch_size)
    write_jsonl(ctx.path("heads.jsonl"), records)
    write_jsonl(ctx.path("lookups.jsonl"), lookups or [])
    write_jsonl(ctx.path("qk.jsonl"), qk_rows)
    write_jsonl(ctx.path("occlusions.jsonl"), occlusions)
    write_jsonl(ctx.path("head_tokens.jsonl"), head_tokens)
    _save_matrices(ctx.path("attributions.safetensors"), matrices)
    report = attribution_summary(records, per_unit, skipped, units)
    report["qk_records"] = dict(sorted(Counter(r.status for r in qk_rows).items())) if qk else None
    atomic_write(ctx.path("attribute.json"), json.dumps(report, indent=2) + "\n")
    print(summary_text(report))


def _head_tokens(view: ModelView, group: list[UnitPrompts], records: list[HeadRecord], windows: dict[str, list[dict]],
                 bos: list[int], batch_size: int, divide_by_scale: bool) -> list[HeadTokensRecord]:
    """Each relevant head's attribution at every token of its unit's held-out windows (issue #26: what head
    explanations are simulated against), for the units of one pass; `records` are the pass's head records."""
    relevant: dict[str, list[HeadRecord]] = defaultdict(list)
    for r in records:
        if r.relevant:
            relevant[r.unit_id].append(r)
    jobs, meta = [], []
    for it in group:
        unit = it.read.unit
        heads = relevant.get(unit.unit_id, [])
        mine = windows.get(unit.unit_id, [])
        if heads and mine:
            labels = it.read.labels
            jobs.append((it.read, [bos + [int(t) for t in w["token_ids"]] for w in mine],
                         [labels.index(h.head) for h in heads]))
            meta.append((unit.unit_id, [h.head for h in heads], mine))
    out = []
    for (unit_id, heads, mine), per_window in zip(meta, position_attributions(view, jobs, batch_size, divide_by_scale)):
        for w, a in zip(mine, per_window):
            for k, head in enumerate(heads):
                out.append(HeadTokensRecord(unit_id=unit_id, head=head, line=w["line"], kind=w["kind"], rank=w["rank"],
                                            attributions=[float(x) for x in a[len(bos):, k]]))
    return out


def _save_matrices(path, matrices: dict[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous().clone() for k, v in matrices.items()}, str(tmp))


def attribution_summary(records: list[HeadRecord], per_unit: list[dict], skipped: list[dict],
                        units: list[UnitRecord]) -> dict:
    """Heads per unit, layer gaps, heads recurring across units, and the paper's KS test across pairs."""
    layer_of = {u.unit_id: u.layer for u in units}
    relevant = [r for r in records if r.relevant]
    controls = {u.unit_id for u in units if u.control}
    counts = Counter(r.head for r in relevant if r.unit_id not in controls)
    measured = [r for r in relevant if r.prob_drop_active is not None and r.prob_drop_inactive is not None]
    ks = None
    if len(measured) >= 2:
        test = _ks_2samp([r.prob_drop_active for r in measured], [r.prob_drop_inactive for r in measured])
        ks = {"n_pairs": len(measured), "statistic": float(test.statistic), "pvalue": float(test.pvalue),
              "mean_drop_active": float(np.mean([r.prob_drop_active for r in measured])),
              "mean_drop_inactive": float(np.mean([r.prob_drop_inactive for r in measured]))}
    per_unit_relevant = [u["n_relevant"] for u in per_unit]
    return {
        "n_units": len(per_unit), "n_pairs": len(relevant),
        "units_without_relevant_head": [u["unit_id"] for u in per_unit if u["n_relevant"] == 0],
        "skipped_units": skipped,
        "heads_per_unit_mean": float(np.mean(per_unit_relevant)) if per_unit else 0.0,
        "heads_per_unit_max": int(max(per_unit_relevant, default=0)),
        "layer_gap_median": float(np.median([layer_of[r.unit_id] - r.layer for r in relevant])) if relevant else None,
        "recurring_heads": [{"head": h, "n_units": n} for h, n in counts.most_common(10)],
        "ablation_ks_across_pairs": ks,
        "units": per_unit,
    }


def summary_text(report: dict) -> str:
    lines = [f"attributed {report['n_units']} units: {report['n_pairs']} relevant (unit, head) pairs, "
             f"{len(report['units_without_relevant_head'])} units without one, {len(report['skipped_units'])} skipped"]
    if report["recurring_heads"]:
        lines.append("  recurring heads: " + ", ".join(f"{r['head']} ×{r['n_units']}" for r in report["recurring_heads"][:5]))
    ks = report["ablation_ks_across_pairs"]
    if ks:
        lines.append(f"  ablation: mean token-probability drop {ks['mean_drop_active']:.4f} where active vs "
                     f"{ks['mean_drop_inactive']:.4f} where inactive (KS p = {ks['pvalue']:.2g}, {ks['n_pairs']} pairs)")
    return "\n".join(lines)


