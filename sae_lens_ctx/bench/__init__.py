"""Throughput benchmarks against in-process baselines (ARCHITECTURE §6): `sae-lens-ctx bench`.

The package: `shapes` (models of named shapes with random weights, synthetic contexts and units),
`timings` (each timed part against its baseline), and here the command that runs them and prints ratios.

`bench_scan` times the mining scan and its baselines in one process, on the same batches, interleaved
`repeats` times (the median of each is reported), so machine load affects them alike:

* `scan`: `mine.scan`: hooks only on the units' layers, forward stopped after the last, per-context
  max on the device, running top-k merged batch by batch;
* `forward`: the model's plain forward with logits, no hooks (the ceiling the issue compares with);
* `forward_until_hooks`: the forward stopped where the scan stops it (right after the last hook it
  needs), with no-op hooks (so `scan / forward_until_hooks` is the cost of the reductions alone);
* `run_with_cache_topk`: TransformerLens `run_with_cache` on the needed hooks (full forward, the
  activations cached), then each unit's per-context max, kept for every context, and one top-k at
  the end (the straightforward way);
* `scan_bf16` (fp32 models): `mine.scan_precision=bfloat16`, the bf16-autocast scan of candidates and
  their fp32 recomputation (`stages/mine/precision.py`); `bf16_native` says whether the hardware has
  bf16 matmuls (elsewhere autocast emulates them, slowly).

Throughput counts real tokens (padding excluded), the same number for every method.

`run_bench` (`sae-lens-ctx bench`) adds, on a model of a named shape with random weights (`SHAPES`,
built from a `HookedTransformerConfig`, no hub) or a real one, on synthetic token contexts:

* `paper_scan`: the paper-style scan: batch 1, one hook per neuron (each takes its neuron's max to
  the host), the full forward with logits, a heap per neuron. Timed on a few contexts and
  extrapolated per token;
* attribution: `attribute.attribute_prompts` (folded `W_O @ read`, `hook_z` at the last position
  only, batched, forward stopped at the unit's layer) against the paper-style path: per (unit,
  prompt), batch 1, `run_with_cache` of every hook, `stack_head_results` at the last position,
  `apply_ln_to_stack` and a dot with the unit's read weights (timed on a few pairs, extrapolated);
* trimming: `trim.trim_prompts` (batched rounds) against the serial per-prompt binary search
  (`trim.trim_serial`, batch 1, the same reader; timed on a few prompts, extrapolated, and checked to
  give the same starts);
* memory: the host's peak RSS during a scan of N and of 10 N corpus tokens at fixed units and k
  (units on layer 0, so the forward stops early: what is measured is the scan's own state); the
  contexts of both corpora exist before either scan. `growth` = (peak(10 N) - peak(N)) / peak(N)
  of the process's peak RSS; `scan_peak_delta_bytes` = peak minus RSS before each scan;
  `tracemalloc_growth` the same for Python allocations;
* discovery: `discover.congruence_stats` over the last `discover_layers` layers' neurons: seconds,
  units/s, peak RSS.

Ratios are ours over the baseline, in tokens/s or prompts/s (above 1: ours is faster).
"""

from __future__ import annotations

import gc
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..inputs.view import ModelView
from ..stages.mine.scan import UnitReader, scan
from .shapes import DEFAULT_SHAPES, SHAPES, neuron_units, shape_model, synthetic_contexts  # noqa: F401
from .timings import (PeakRss, attribution_units, bench_attribute_parts, bench_attribution, bench_discover, bench_memory,  # noqa: F401
                      bench_paper_scan, bench_scan, bench_trim)


# -- `sae-lens-ctx bench` -----------------------------------------------------------------------

RATIO_KEYS = ("scan_over_forward", "scan_over_tl_cache", "scan_over_paper", "attribution_over_paper",
              "trim_over_serial", "scan_bf16_over_forward", "scan_bf16_over_scan")
"""The keys of `ratios` in the JSON `bench --out` writes (ours over the baseline, > 1: ours is faster)."""


def bench_model(view: ModelView, *, n_contexts: int = 12, context_len: int = 64, n_units: int = 64, k: int = 8,
                batch_size: int = 16, repeats: int = 2, paper_contexts: int = 2, attr_units: int = 2,
                n_prompts: int = 8, paper_pairs: int = 2, trim_prompts_n: int = 6, serial_prompts: int = 2,
                memory_tokens: int = 512, discover_layers: int = 1, seed: int = 0, compile: bool = False,
                log=print) -> dict:
    """Every measurement of `sae-lens-ctx bench` on one model; returns its JSON record."""
    from ..stages.mine.scan import collect_prompts

    t0 = time.perf_counter()
    tok = view.tokenizer
    bos_id = int(tok.bos_token_id) if tok is not None and tok.bos_token_id is not None else 0
    bos_ids = [bos_id]
    contexts = synthetic_contexts(n_contexts, min(context_len, view.n_ctx), view.d_vocab, bos_id, seed=seed)
    last = view.n_layers - 1
    units = neuron_units(view, n_units, [max(0, last - 1), last], seed=seed)
    out: dict = {"model": view.name, "shape": view.name.removeprefix("random:") if view.source == "random" else None,
                 "device": str(view.device), "dtype": str(view.dtype).removeprefix("torch."),
                 "n_layers": view.n_layers, "d_model": view.d_model, "d_mlp": view.d_mlp, "d_vocab": view.d_vocab}

    log(f"[{view.name}] scan vs forward vs run_with_cache+topk: {len(contexts)} contexts, {n_units} units, k={k}")
    scan_figs = bench_scan(view, contexts, units, k=k, batch_size=batch_size, repeats=repeats, compile=compile)
    log(f"[{view.name}] paper-style scan (batch 1, per-neuron hooks) on {paper_contexts} contexts")
    paper = bench_paper_scan(view, contexts[:max(1, paper_contexts)], units, k=k)
    rates = {**scan_figs["tokens_per_s"], "paper_scan": paper["tokens_per_s"]}

    log(f"[{view.name}] attribution: ours vs full-cache batch 1")
    prompts = [list(c.tokens) for c in synthetic_contexts(n_prompts, min(context_len, view.n_ctx), view.d_vocab,
                                                          bos_id, seed=seed + 3)]
    attribution = bench_attribution(view, attribution_units(view, attr_units, seed), prompts,
                                    batch_size=batch_size, paper_pairs=paper_pairs)

    log(f"[{view.name}] trimming: batched vs serial binary search")
    reader = UnitReader(view, units)
    result = scan(reader, contexts, {"top": max(1, -(-trim_prompts_n // n_units))}, batch_size=batch_size)
    top = [p for p in collect_prompts(result, "train", contexts, 1, 10**9) if p.end >= 3][:trim_prompts_n]
    width = max(len(c.tokens) for c in contexts)
    trim = bench_trim(reader, top, batch_size=batch_size, bos_ids=bos_ids, width=width,
                      serial_prompts=serial_prompts) if top else None

    log(f"[{view.name}] memory: scan of {memory_tokens} vs {10 * memory_tokens} tokens")
    memory = bench_memory(view, memory_tokens, n_units=n_units, k=k, batch_size=batch_size,
                          context_len=min(context_len, view.n_ctx), bos_id=bos_id, seed=seed)
    log(f"[{view.name}] discovery: congruence of the last {discover_layers} layer(s)")
    discover = bench_discover(view, discover_layers)

    out.update({
        "scan": scan_figs, "paper_scan": paper, "attribution": attribution, "trim": trim, "memory": memory,
        "discover": discover,
        "tokens_per_s": rates,
        "prompts_per_s": {"attribution": attribution["prompts_per_s"],
                          "trim": trim["prompts_per_s"] if trim else None},
        "ratios": {
            "scan_over_forward": round(rates["scan"] / rates["forward"], 3),
            "scan_over_tl_cache": round(rates["scan"] / rates["run_with_cache_topk"], 3),
            "scan_over_paper": round(rates["scan"] / rates["paper_scan"], 3),
            "attribution_over_paper": attribution["ratio"],
            "trim_over_serial": trim["ratio"] if trim else None,
            "scan_bf16_over_forward": scan_figs.get("scan_bf16_vs_forward"),
            "scan_bf16_over_scan": scan_figs.get("scan_bf16_vs_scan"),
        },
        "seconds": round(time.perf_counter() - t0, 1),
    })
    return out


def format_model(r: dict) -> str:
    """A few lines per model: tokens/s, prompts/s, ratios, memory, discovery."""
    t, a, m, d = r["tokens_per_s"], r["attribution"], r["memory"], r["discover"]
    lines = [f"== {r['model']} ({r['n_layers']} layers, d_model {r['d_model']}, {r['device']}, {r['dtype']}; "
             f"{r['seconds']}s)",
             "  tokens/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in t.items()),
             f"  attribution prompts/s: ours {a['prompts_per_s']['ours']:,} vs paper-style {a['prompts_per_s']['paper']:,}"
             f" (max |difference| {a['max_abs_difference']:.2e})"]
    if r["trim"]:
        tr = r["trim"]
        lines.append(f"  trimming prompts/s: batched {tr['prompts_per_s']['batched']:,} vs serial "
                     f"{tr['prompts_per_s']['serial']:,} (same starts: {tr['serial_agrees']})")
    lines.append("  ratios: " + ", ".join(f"{k} {v}" for k, v in r["ratios"].items()))
    lines.append(f"  memory: peak RSS {m['peak_rss_bytes'][0] / 2**20:.1f} MiB at {m['n_tokens'][0]:,} tokens, "
                 f"{m['peak_rss_bytes'][1] / 2**20:.1f} MiB at {m['n_tokens'][1]:,} (growth {m['growth']:+.2%}; "
                 f"scan deltas {m['scan_peak_delta_bytes'][0] / 2**20:.1f} / {m['scan_peak_delta_bytes'][1] / 2**20:.1f} MiB)")
    lines.append(f"  discover: {d['n_units']:,} units x {d['d_vocab']:,} tokens in {d['seconds']}s "
                 f"({d['units_per_s']:,.0f} units/s, peak RSS {d['peak_rss_bytes'] / 2**20:.0f} MiB)")
    return "\n".join(lines)


def run_bench(views: Sequence, *, out: Path | None = None, log=print, **kwargs) -> dict:
    """`sae-lens-ctx bench`: `bench_model` on each model (a `ModelView` or a zero-argument function that
    builds one, so only one is held at a time); top-level `ratios` are the worst (smallest) across models,
    `memory.growth` the largest, `discover` per model; every model's full record is under `runs`."""
    start = time.perf_counter()
    runs = []
    for make in views:
        view = make() if callable(make) else make
        runs.append(bench_model(view, log=log, **kwargs))
        log(format_model(runs[-1]))
        del view
        gc.collect()
    worst = {key: min((r["ratios"][key] for r in runs if r["ratios"][key] is not None), default=None)
             for key in RATIO_KEYS}
    result = {
        "version": 1, "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "settings": kwargs,
        "ratios": worst,
        "memory": {"growth": max(r["memory"]["growth"] for r in runs),
                   "tracemalloc_growth": max(r["memory"]["tracemalloc_growth"] for r in runs),
                   "by_model": {r["model"]: r["memory"] for r in runs}},
        "discover": {r["model"]: r["discover"] for r in runs},
        "runs": runs,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _attribute_parts_cli(run_dir: Path, repeats: int, out: Path | None) -> int:
    from ..core.config import RunConfig
    from ..core.errors import UserError
    from ..inputs.model import load_model

    for name in ("config.yaml", "units.jsonl", "contexts.jsonl"):
        if not (run_dir / name).is_file():
            raise UserError(f"--attribute-run {run_dir}: no {name} (run `sae-lens-ctx run --out {run_dir} --until mine` first)")
    view = load_model(RunConfig.from_yaml(run_dir / "config.yaml").model)
    result = bench_attribute_parts(view, run_dir, repeats=repeats)
    s = result["seconds"]
    print(f"attribute stage on {result['n_units']} units of {run_dir} (median of {repeats}): without look-ups "
          f"{s['without_lookups']}s, with look-ups {s['with_lookups']}s (+{result['lookups_overhead']:.1%}), "
          f"occlusion {s['occlusion']}s (+{result['occlusion_overhead']:.1%}), QK split {s['qk']}s (stage with / "
          f"without it: {result['qk_ratio']:.2f}x)")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def bench_cli(argv: list[str]) -> int:
    """`sae-lens-ctx bench [--shape S ...] [--model NAME ...] [--out FILE] [sizes]`."""
    import argparse

    from ..core.config import ModelConfig
    from ..inputs.model import load_model

    p = argparse.ArgumentParser(
        prog="sae-lens-ctx bench",
        description="Throughput of mining, attribution, trimming and discovery against in-process baselines "
                    "(TL forward, run_with_cache + top-k, the paper's batch-1 paths), on the same batches. "
                    f"With no model: random weights at the shapes {', '.join(DEFAULT_SHAPES)} on the CPU.")
    p.add_argument("--shape", action="append", choices=list(SHAPES), help="a model shape with random weights "
                   "(repeatable)")
    p.add_argument("--model", action="append", help="a real model: 'embedded', a hub id, a directory or a .gguf "
                   "(repeatable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    p.add_argument("--contexts", type=int, default=12, help="contexts in the scan benchmark")
    p.add_argument("--context-len", type=int, default=64, help="tokens per context (at most; at least half)")
    p.add_argument("--units", type=int, default=64, help="neurons scanned at once (last two layers)")
    p.add_argument("--k", type=int, default=8, help="top-k kept per unit")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the scan methods (median)")
    p.add_argument("--paper-contexts", type=int, default=2, help="contexts the paper-style scan is timed on")
    p.add_argument("--attr-units", type=int, default=2, help="units attributed (last layer)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per attributed unit")
    p.add_argument("--paper-pairs", type=int, default=2, help="(unit, prompt) pairs the paper-style path is timed on")
    p.add_argument("--trim-prompts", type=int, default=6, help="top prompts trimmed")
    p.add_argument("--serial-prompts", type=int, default=2, help="prompts the serial search is timed on")
    p.add_argument("--memory-tokens", type=int, default=512, help="N: memory is measured at N and 10 N tokens")
    p.add_argument("--discover-layers", type=int, default=1, help="last layers whose neurons discovery scores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="also time the scan under torch.compile (mine.compile)")
    p.add_argument("--attribute-run", type=Path, metavar="RUN_DIR",
                   help="instead: time the attribute stage's parts (without and with look-ups, occlusion, QK split) on this run "
                        "directory's units and prompts (after mine), with its model")
    p.add_argument("--contention", action="store_true",
                   help="instead: the scan and attribution parts alone, then beside a second copy of themselves "
                        "(subprocesses; the first --shape, default smollm2): each copy's time as a multiple of its "
                        "time alone (goal <= 2.5x; a fair share of the cores is 2x)")
    a = p.parse_args(argv)
    if a.contention:
        from .contention import bench_contention

        result = bench_contention(shape=(a.shape or ["smollm2"])[0], batch_size=a.batch_size)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    if a.attribute_run is not None:
        return _attribute_parts_cli(a.attribute_run, a.repeats, a.out)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        from ..core.errors import UserError

        raise UserError("--device cuda: no CUDA device is available")
    makers = [lambda s=s: shape_model(s, device=a.device, dtype=a.dtype, seed=a.seed) for s in a.shape or []]
    makers += [lambda m=m: load_model(ModelConfig(model_name=m, device=a.device, dtype=a.dtype)) for m in a.model or []]
    if not makers:
        makers = [lambda s=s: shape_model(s, device=a.device, dtype=a.dtype, seed=a.seed) for s in DEFAULT_SHAPES]
    sizes = dict(n_contexts=a.contexts, context_len=a.context_len, n_units=a.units, k=a.k, batch_size=a.batch_size,
                 repeats=a.repeats, paper_contexts=a.paper_contexts, attr_units=a.attr_units, n_prompts=a.prompts,
                 paper_pairs=a.paper_pairs, trim_prompts_n=a.trim_prompts, serial_prompts=a.serial_prompts,
                 memory_tokens=a.memory_tokens, discover_layers=a.discover_layers, seed=a.seed, compile=a.compile)
    result = run_bench(makers, out=a.out, **sizes)
    print("ratios (worst across models): " + ", ".join(f"{k} {v}" for k, v in result["ratios"].items()))
    print(f"memory growth N -> 10 N: {result['memory']['growth']:+.2%}; wall {result['wall_s']}s")
    if a.out:
        print(f"figures in {a.out}")
    return 0
