"""The mine stage: top-activating contexts per unit in one streaming scan (`scan.py`), trimmed (`trim.py`), with
held-out positives and length-matched negatives (`negatives.py`); shards across jobs or ranks (`shards.py`).

Writes `contexts.jsonl`, `context_acts.safetensors`, `windows.jsonl` (`windows.py`) and `mine.json` (what was kept, the scans' sizes, the
trimming's work and each held-out class's lengths).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ...core.digest import digest
from ...core.errors import UserError
from ...core.records import ContextRecord, UnitRecord, atomic_write, read_jsonl, save_tensors, write_jsonl
from ...inputs.context import RunContext
from ...inputs.corpus import SPLITS, TokenContext
from ...inputs.distributed import Distributed
from .negatives import length_summary
from .scan import (EMPTY, NEGATIVE_POOLS, POOL_FACTOR, RANDOM_TRACKS, SORT_WINDOW, ScanResult, TopK,  # noqa: F401
                   UnitReader, batches, build_records, collect_prompts, merge_results, random_keys, run_until_hooks,
                   scan, scan_identity, with_matched_negatives)
from .precision import Bf16Reader, candidate_share, resolve_precision, scan_checked
from .trim import trim_prompts
from .windows import window_records

log = logging.getLogger(__name__)


_fault_injection_after_batch: Callable[[str, int], None] | None = None
"""Test seam: called as (split, batches done) after every scanned batch; raising here simulates a kill."""


def load_units(path: Path) -> list[UnitRecord]:
    if not path.is_file():
        raise UserError(f"{path.parent} has no {path.name}: run the discover stage first (sae-lens-ctx discover)")
    units = read_jsonl(path, UnitRecord)
    if not units:
        raise UserError(f"{path} holds no units: discovery selected none; loosen the discover settings and re-run it")
    return units


def run_stage(ctx: RunContext) -> None:
    """`sae-lens-ctx mine`: write `contexts.jsonl`, `context_acts.safetensors` and `mine.json`.

    Under torchrun (WORLD_SIZE > 1) each process scans its shard and rank 0 merges and writes
    (`shards.py`); `sae-lens-ctx mine --shard i/n` and `sae-lens-ctx merge` do it in separate jobs."""
    dist = Distributed.from_env()  # before the model loads (it picks this rank's GPU)
    units, reader, splits = prepare_stage(ctx)
    if dist is None:
        finish_stage(ctx, units, reader, splits, scan_splits(ctx, reader, splits))
        return
    with dist:
        parts = dist.gather(scan_splits(ctx, reader, splits, shard=dist.shard))
        if parts is not None:
            finish_stage(ctx, units, reader, splits, merge_results(parts))
        dist.barrier()
        remove_checkpoints(ctx, dist.shard)


def prepare_stage(ctx: RunContext) -> tuple[list[UnitRecord], UnitReader, dict[str, list[TokenContext]]]:
    """The units, their reader and the corpus splits, checked."""
    cfg = ctx.config.mine
    units = load_units(ctx.path("units.jsonl"))
    saes = {s.sae_id: s for s in ctx.sae_sources()}
    reader = UnitReader(ctx.model, units, saes, compile=cfg.compile)
    splits = {name: ctx.corpus.split(name) for name in SPLITS}
    for name, need, key in (("train", cfg.top_k, "top_k"), ("test", cfg.n_test_prompts, "n_test_prompts")):
        if len(splits[name]) < need:
            raise UserError(f"the {name} side of the corpus has {len(splits[name])} contexts, fewer than "
                            f"mine.{key}={need}: lower mine.{key} or give a larger corpus")
    return units, reader, splits


def _scan_args(ctx: RunContext) -> tuple[int, dict[str, dict[str, int]], str]:
    cfg, run = ctx.config.mine, ctx.config
    bos = 1 if run.corpus.prepend_bos else 0
    sizes = {"train": {"top": cfg.top_k, "random": cfg.n_random},
             "test": {"top": cfg.n_test_prompts, "low": cfg.n_test_prompts, "random": cfg.n_test_prompts,
                      "pool": POOL_FACTOR * cfg.n_test_prompts}}
    return bos, sizes, digest([run.model.__dict__, run.corpus.__dict__])


def scan_identities(ctx: RunContext, reader: UnitReader, splits: dict[str, list[TokenContext]]) -> dict[str, str]:
    """Per split, the identity `scan_splits` gives its results (what shards must match to be merged)."""
    bos, sizes, identity = _scan_args(ctx)
    return {name: scan_identity(identity, reader.unit_ids, sizes[name], bos, ctx.config.seed,
                                ctx.config.mine.batch_size, SORT_WINDOW, splits[name]) for name in SPLITS}


def scan_splits(ctx: RunContext, reader: UnitReader, splits: dict[str, list[TokenContext]],
                shard: tuple[int, int] = (0, 1)) -> dict[str, ScanResult]:
    """Scan every split (or shard i of n of each), with checkpoints in the run directory."""
    cfg = ctx.config.mine
    bos, sizes, identity = _scan_args(ctx)
    tag = "" if tuple(shard) == (0, 1) else f".shard{shard[0]}of{shard[1]}"
    results = {}
    for name in SPLITS:
        share = candidate_share(reader.n_units, sizes[name], len(splits[name]))
        bf16 = resolve_precision(cfg.scan_precision, ctx.model, share) == "bfloat16"
        seam = _fault_injection_after_batch
        args = dict(bos=bos, seed=ctx.config.seed, batch_size=cfg.batch_size,
                    checkpoint=ctx.path(f"mine.ckpt.{name}{tag}.safetensors"), checkpoint_every=cfg.checkpoint_every,
                    identity=identity, desc=f"mine {name}{tag}",
                    on_batch=(lambda n, s=name, f=seam: f(s, n)) if seam else None, shard=shard)
        results[name] = (scan_checked(reader, Bf16Reader(reader), splits[name], sizes[name], **args) if bf16
                         else scan(reader, splits[name], sizes[name], **args))
    return results


def remove_checkpoints(ctx: RunContext, shard: tuple[int, int] = (0, 1)) -> None:
    tag = "" if tuple(shard) == (0, 1) else f".shard{shard[0]}of{shard[1]}"
    for name in SPLITS:
        ctx.path(f"mine.ckpt.{name}{tag}.safetensors").unlink(missing_ok=True)


def finish_stage(ctx: RunContext, units: list[UnitRecord], reader: UnitReader,
                 splits: dict[str, list[TokenContext]], results: dict[str, ScanResult]) -> None:
    """From the scans' tracks: prompts, batched trimming, records; write the stage's files."""
    cfg, run = ctx.config.mine, ctx.config
    bos = 1 if run.corpus.prepend_bos else 0
    bos_ids = [int(ctx.model.tokenizer.bos_token_id)] if bos and cfg.trim_with_bos else []
    prompts = []
    for name in SPLITS:
        prompts += collect_prompts(results[name], name, splits[name], bos, cfg.max_prompt_tokens)
    width = max(len(c.tokens) for c in ctx.corpus.contexts)
    t0 = time.perf_counter()
    trim = trim_prompts(reader, prompts, cfg, bos, bos_ids, width)
    trim_seconds = round(time.perf_counter() - t0, 3)
    prompts, unmatched = with_matched_negatives(reader, prompts, bos, bos_ids, cfg.batch_size * width, run.seed,
                                                cfg.max_prompt_tokens)
    trim["n_positives_without_negative"] = unmatched
    records, acts, dropped = build_records(prompts, units, ctx.model.tokenizer, ctx.corpus.text, bos,
                                           cfg.max_prompt_tokens)
    write_jsonl(ctx.path("contexts.jsonl"), records)
    save_tensors(ctx.path("context_acts.safetensors"), {f"row{i}": a for i, a in enumerate(acts)})
    write_jsonl(ctx.path("windows.jsonl"), window_records(prompts, units, records, ctx.model.tokenizer, bos))
    report = mine_report(units, records, results, {**trim, "n_dropped_long": dropped})
    atomic_write(ctx.path("mine.json"), json.dumps(report, indent=2) + "\n")
    ctx.this_run.update(scan_log(results), trim_seconds=trim_seconds)
    remove_checkpoints(ctx)
    print(summary_text(report, ctx.this_run))


def mine_report(units: Sequence[UnitRecord], records: Sequence[ContextRecord], results: dict[str, ScanResult],
                trim: dict) -> dict:
    """`mine.json`: per-unit counts, units that never fired, the scans' sizes and the trimming's work (what
    the scan took in time and where it resumed is `scan_log`, kept in `stages.json`)."""
    counts: dict[str, dict[str, int]] = {u.unit_id: {} for u in units}
    for r in records:
        key = f"{r.split}_{r.kind}"
        counts[r.unit_id][key] = counts[r.unit_id].get(key, 0) + 1
    lengths: dict[str, dict[str, list[int]]] = {u.unit_id: {} for u in units}
    for r in records:
        if r.split == "test":
            lengths[r.unit_id].setdefault(r.kind, []).append(len(r.tokens))
    best = results["train"].tracks["top"].values[:, 0].tolist()
    per_unit = [{"unit_id": u.unit_id, "control": u.control, "fired": best[j] > 0,
                 "max_train_activation": best[j] if np.isfinite(best[j]) else None,
                 **{f"{s}_{k}": counts[u.unit_id].get(f"{s}_{k}", 0) for s in SPLITS for k in results[s].tracks
                    if k != "pool"},
                 "test_lengths": {k: length_summary(lengths[u.unit_id].get(k, [])) for k in ("top", "low", "random")}}
                for j, u in enumerate(units)]
    every = {k: [n for per in lengths.values() for n in per.get(k, [])] for k in ("top", "low", "random")}
    return {
        "n_units": len(units), "n_records": len(records),
        "never_fired": [u["unit_id"] for u in per_unit if not u["fired"]],
        "splits": {name: {"n_contexts": r.n_contexts, "n_tokens": r.n_tokens, "n_skipped_contexts": r.n_skipped}
                   for name, r in results.items()},
        "trim": trim,
        "test_lengths": {k: {f: v for f, v in length_summary(n).items() if f != "lengths"} for k, n in every.items()},
        "per_unit": per_unit,
    }


def scan_log(results: dict[str, ScanResult]) -> dict:
    """What the scans did in this process: tokens scanned, seconds, tokens/s, where each resumed."""
    scanned = sum(r.tokens_scanned for r in results.values())
    seconds = sum(r.seconds for r in results.values())
    return {"tokens_scanned": scanned, "tokens_per_s": round(scanned / seconds, 1) if seconds else None,
            "splits": {name: {"seconds": round(r.seconds, 3), "tokens_scanned": r.tokens_scanned,
                              "tokens_per_s": round(r.tokens_per_s, 1), "resumed_at_context": r.resumed_at,
                              "precision": r.precision, "n_recomputed": r.n_recomputed,
                              "n_units_rescanned": r.n_units_rescanned}
                       for name, r in results.items()}}


def summary_text(report: dict, this_run: dict) -> str:
    """One screen: what was kept, what it cost, and the units that never fired."""
    t, tr = report["trim"], report["splits"]["train"]
    lines = [f"mined {report['n_records']} prompts for {report['n_units']} units; scanned "
             f"{this_run['tokens_scanned']:,} tokens at {this_run['tokens_per_s']} tokens/s",
             f"trimmed {t['n_prompts']} top prompts in {t['rounds']} batched rounds ({t['candidates']} candidates): "
             f"{t['mean_tokens_before']} -> {t['mean_tokens_after']} tokens on average; "
             f"{t['n_dropped_long']} dropped as too long",
             f"train: {tr['n_contexts']} contexts; test: {report['splits']['test']['n_contexts']} contexts"]
    skipped = sum(s["n_skipped_contexts"] for s in report["splits"].values())
    if skipped:
        lines.append(f"warning: {skipped} contexts had no token after BOS and were skipped")
    if report["never_fired"]:
        shown = ", ".join(report["never_fired"][:10]) + (" ..." if len(report["never_fired"]) > 10 else "")
        lines.append(f"warning: {len(report['never_fired'])} units never fired on the train side: {shown}")
    lines.append(f"{'unit':<24}{'train top':>10}{'test top':>10}{'test low':>10}{'max act':>10}")
    for u in report["per_unit"][:10]:
        act = "-" if u["max_train_activation"] is None else f"{u['max_train_activation']:.3g}"
        lines.append(f"{u['unit_id'] + (' (control)' if u['control'] else ''):<24}{u['train_top']:>10}"
                     f"{u['test_top']:>10}{u['test_low']:>10}{act:>10}")
    if len(report["per_unit"]) > 10:
        lines.append(f"... and {len(report['per_unit']) - 10} more units in mine.json")
    return "\n".join(lines)
