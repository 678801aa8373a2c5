"""The timed parts of `sae-lens-ctx bench`: ours against an in-process baseline, on the same inputs
(see the package docstring for what each measures)."""

from __future__ import annotations

import gc
import heapq
import os
import statistics
import threading
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import torch

from ..inputs.corpus import TokenContext
from ..stages.mine.scan import UnitReader, batches, run_until_hooks, scan
from ..inputs.view import ModelView, pad_batch, pad_id
from ..inputs.sae import SaeSource
from ..core.records import UnitRecord
from .shapes import neuron_units, sync, synthetic_contexts


def bench_scan(view: ModelView, contexts: Sequence[TokenContext], units: Sequence[UnitRecord], *,
               saes: dict[str, SaeSource] | None = None, k: int = 20, batch_size: int = 32, bos: int = 1,
               repeats: int = 3, compile: bool = False) -> dict:
    """Tokens/s of the scan and its baselines over `contexts` (see the module docstring); with `compile`,
    also `scan_compiled` (`mine.compile`: the reader under `torch.compile`) and the compilation's seconds."""
    reader = UnitReader(view, units, saes)
    plan = [[contexts[i].tokens for i in idxs] for idxs, _ in batches(contexts, batch_size)]
    tokens = [pad_batch(rows, pad_id(view.tokenizer)).to(view.device) for rows in plan]
    lengths = [torch.tensor([len(r) for r in rows], device=view.device) for rows in plan]
    n_tokens = sum(len(c.tokens) for c in contexts)

    @torch.inference_mode()
    def forward() -> None:
        for t in tokens:
            view.model(t, return_type="logits")

    @torch.inference_mode()
    def forward_until_hooks() -> None:
        for t in tokens:
            run_until_hooks(view, t, [(name, lambda act, hook: None) for name in reader.hook_names])

    @torch.inference_mode()
    def run_with_cache_topk() -> None:
        maxima: list[torch.Tensor] = []
        for t, n in zip(tokens, lengths):
            _, cache = view.model.run_with_cache(t, names_filter=reader.hook_names)
            pos = torch.arange(t.shape[1], device=t.device)
            invalid = (pos[None, :] < bos) | (pos[None, :] >= n[:, None])
            cols = []
            for u in units:
                hook = view.hook_name("mlp_post", u.layer) if u.kind == "neuron" else saes[u.sae_id].hook_name
                act = cache[hook]
                if u.kind != "neuron":
                    act = saes[u.sae_id].sae.encode(act.flatten(-2) if act.dim() == 4 else act)
                cols.append(act[..., u.index].masked_fill(invalid, -torch.inf).max(dim=1).values)
            maxima.append(torch.stack(cols, dim=1))
        torch.cat(maxima).topk(min(k, len(contexts)), dim=0)

    def mining_scan() -> None:
        scan(reader, contexts, {"top": k}, bos=bos, batch_size=batch_size)

    methods = {"scan": mining_scan, "forward": forward, "forward_until_hooks": forward_until_hooks,
               "run_with_cache_topk": run_with_cache_topk}
    if view.dtype == torch.float32:  # mine.scan_precision=bfloat16: bf16 candidates, survivors again in fp32
        from ..stages.mine.precision import Bf16Reader, scan_checked

        methods["scan_bf16"] = lambda: scan_checked(reader, Bf16Reader(reader), contexts, {"top": k}, bos=bos,
                                                    batch_size=batch_size)
    compile_seconds = None
    if compile:
        compiled = UnitReader(view, units, saes, compile=True)
        start = time.perf_counter()
        for t in {tuple(t.shape): t for t in tokens}.values():  # compile (and specialise) on every batch shape
            compiled(t)
        compile_seconds = round(time.perf_counter() - start, 1)
        methods["scan_compiled"] = lambda: scan(compiled, contexts, {"top": k}, bos=bos, batch_size=batch_size)
    times: dict[str, list[float]] = {name: [] for name in methods}
    forward_until_hooks()  # warm-up (lazy initialisation, allocator)
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            if view.device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    rates = {name: n_tokens / statistics.median(ts) for name, ts in times.items()}
    from ..core.threads import bf16_available
    return {
        "model": view.name, "device": str(view.device), "n_units": len(units), "k": k,
        "n_contexts": len(contexts), "n_tokens": n_tokens, "batch_size": batch_size, "repeats": repeats,
        "stop_at_layer": reader.stop_at_layer, "n_layers": view.n_layers,
        "tokens_per_s": {name: round(r, 1) for name, r in rates.items()},
        "scan_vs_forward": round(rates["scan"] / rates["forward"], 3),
        "scan_vs_forward_until_hooks": round(rates["scan"] / rates["forward_until_hooks"], 3),
        "scan_vs_run_with_cache_topk": round(rates["scan"] / rates["run_with_cache_topk"], 3),
        **({"scan_bf16_vs_forward": round(rates["scan_bf16"] / rates["forward"], 3),
            "scan_bf16_vs_scan": round(rates["scan_bf16"] / rates["scan"], 3),
            "bf16_native": bf16_available(view.device)} if "scan_bf16" in rates else {}),
        **({"compiled_vs_scan": round(rates["scan_compiled"] / rates["scan"], 3), "compile_seconds": compile_seconds,
            "compile_error": compiled.compile_error} if compile else {}),
        "seconds": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
    }


@torch.inference_mode()
def bench_paper_scan(view: ModelView, contexts: Sequence[TokenContext], units: Sequence[UnitRecord], *,
                     k: int = 20, bos: int = 1) -> dict:
    """The paper-style scan over `contexts`: batch 1, one hook per neuron, full forward, heaps on the host."""
    heaps: list[list[tuple[float, int]]] = [[] for _ in units]

    def hook_for(j: int, index: int):
        def fn(act: torch.Tensor, hook) -> None:
            value = float(act[0, bos:, index].max())
            if len(heaps[j]) < k:
                heapq.heappush(heaps[j], (value, current[0]))
            else:
                heapq.heappushpop(heaps[j], (value, current[0]))
        return fn

    current = [0]
    hooks = [(view.hook_name("mlp_post", u.layer), hook_for(j, u.index)) for j, u in enumerate(units)]
    n_tokens = 0
    start = time.perf_counter()
    for i, c in enumerate(contexts):
        current[0] = i
        view.model.run_with_hooks(torch.tensor([c.tokens], device=view.device), fwd_hooks=hooks,
                                  return_type="logits")
        n_tokens += len(c.tokens)
    sync(view)
    seconds = time.perf_counter() - start
    return {"n_contexts": len(contexts), "n_tokens": n_tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(n_tokens / seconds, 1)}


def attribution_units(view: ModelView, n: int, seed: int) -> list[UnitRecord]:
    layer = view.n_layers - 1
    return neuron_units(view, n, [layer], seed=seed + 1)


def bench_attribution(view: ModelView, units: Sequence[UnitRecord], prompts: list[list[int]], *,
                      batch_size: int = 32, paper_pairs: int = 2) -> dict:
    """Ours (`attribute_jobs`: every prompt of every unit, batched across units as the stage does) against the
    paper-style full-cache batch-1 path on the first `paper_pairs` (unit, prompt) pairs; prompts/s counts
    (unit, prompt) pairs."""
    from ..stages.attribute import attribute_jobs, attribute_prompts, unit_read
    from ..core.config import AttributeConfig

    cfg = AttributeConfig()
    reads = [unit_read(view, u, cfg, {}) for u in units]
    attribute_prompts(view, reads[0], prompts[:2], batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    ours = [a for a, _, _ in attribute_jobs(view, [(r, prompts) for r in reads], batch_size)]
    sync(view)
    ours_s = time.perf_counter() - start

    pairs = [(j, p) for j in range(len(units)) for p in range(len(prompts))][:max(1, paper_pairs)]
    max_err = 0.0
    start = time.perf_counter()
    with torch.inference_mode():
        for j, p in pairs:
            u, read = units[j], reads[j]
            _, cache = view.model.run_with_cache(torch.tensor([prompts[p]], device=view.device))
            stack = cache.stack_head_results(layer=u.layer, pos_slice=-1)          # [heads, 1, d_model]
            stack = cache.apply_ln_to_stack(stack, layer=u.layer, mlp_input=True, pos_slice=-1)
            branch = read.rank_branch
            w = view.mlp_read(u.layer).weights[branch][:, u.index]
            if view.normalization == "LN":
                w = w - w.mean()
            paper = (stack[:, 0].float() @ w.float()).cpu()
            ours_row = ours[j][branch][p]
            max_err = max(max_err, float((paper[:len(ours_row)] - ours_row).abs().max()) if len(ours_row) else 0.0)
    sync(view)
    paper_s = time.perf_counter() - start
    n_pairs = len(units) * len(prompts)
    ours_rate, paper_rate = n_pairs / ours_s, len(pairs) / paper_s
    return {"n_units": len(units), "n_prompts": len(prompts), "prompt_tokens": sum(map(len, prompts)) / len(prompts),
            "ours_seconds": round(ours_s, 3), "paper_pairs": len(pairs), "paper_seconds": round(paper_s, 3),
            "prompts_per_s": {"ours": round(ours_rate, 2), "paper": round(paper_rate, 2)},
            "max_abs_difference": max_err, "ratio": round(ours_rate / paper_rate, 3)}


def bench_trim(reader: UnitReader, prompts: list, *, batch_size: int = 32, bos: int = 1, bos_ids: list[int],
               width: int, serial_prompts: int = 4, ratio: float = 0.8) -> dict:
    """Batched trimming of every top prompt against the serial binary search on the first few."""
    from ..core.config import MineConfig
    from ..stages.mine.trim import trim_prompts, trim_serial

    cfg = MineConfig(batch_size=batch_size, trim_ratio=ratio)
    start = time.perf_counter()
    stats = trim_prompts(reader, prompts, cfg, bos, bos_ids, width)
    sync(reader.view)
    batched_s = time.perf_counter() - start
    batched = [p.start for p in prompts]
    subset = prompts[:max(1, serial_prompts)]
    start = time.perf_counter()
    serial = []
    for p in subset:
        tokens = list(p.context.tokens[bos:p.end + 1])
        serial.append(trim_serial(lambda s, t=tokens, u=p.unit: float(reader(
            torch.tensor([bos_ids + t[s:]], device=reader.view.device))[0, -1, u]), len(tokens), p.activation, ratio))
    serial_s = time.perf_counter() - start
    ours_rate, serial_rate = len(prompts) / batched_s, len(subset) / serial_s
    return {"n_prompts": len(prompts), "rounds": stats["rounds"], "candidates": stats["candidates"],
            "batched_seconds": round(batched_s, 3), "serial_prompts": len(subset), "serial_seconds": round(serial_s, 3),
            "serial_agrees": serial == batched[:len(subset)],
            "prompts_per_s": {"batched": round(ours_rate, 2), "serial": round(serial_rate, 2)},
            "ratio": round(ours_rate / serial_rate, 3)}


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRss:
    """Peak resident set size of this process inside a `with` block (a sampling thread, every 2 ms)."""

    def __enter__(self) -> PeakRss:
        self.before = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def bench_memory(view: ModelView, n_tokens: int, *, n_units: int = 64, k: int = 20, batch_size: int = 32,
                 context_len: int = 64, bos_id: int = 0, seed: int = 0) -> dict:
    """Peak host memory of the scan over N and 10 N corpus tokens, units (on layer 0) and k fixed."""
    units = neuron_units(view, n_units, [0], seed=seed)
    reader = UnitReader(view, units)
    n_small = max(2, -(-n_tokens // context_len))  # contexts of exactly `context_len` tokens: 10 N is 10 x N
    small = synthetic_contexts(n_small, context_len, view.d_vocab, bos_id, seed=seed + 7, min_length=context_len)
    big = synthetic_contexts(10 * n_small, context_len, view.d_vocab, bos_id, seed=seed + 8, min_length=context_len)
    tracks = {"top": k, "random": k}
    scan(reader, small[:batch_size], tracks, batch_size=batch_size)  # warm-up: one-time caches

    cuda = view.device.type == "cuda"

    def measure(contexts) -> tuple[int, int, int, int, int | None]:
        gc.collect()
        if cuda:
            torch.cuda.reset_peak_memory_stats(view.device)
        tracemalloc.start()
        with PeakRss() as rss:
            result = scan(reader, contexts, tracks, batch_size=batch_size)
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        device_peak = torch.cuda.max_memory_allocated(view.device) if cuda else None
        return result.n_tokens, rss.peak, rss.peak - rss.before, traced, device_peak

    a, b = measure(small), measure(big)
    return {"n_units": n_units, "k": k, "layer": 0, "n_tokens": [a[0], b[0]],
            "device_peak_bytes": [a[4], b[4]] if cuda else None,
            "peak_rss_bytes": [a[1], b[1]], "scan_peak_delta_bytes": [a[2], b[2]],
            "tracemalloc_peak_bytes": [a[3], b[3]],
            "growth": round((b[1] - a[1]) / a[1], 4),
            "tracemalloc_growth": round((b[3] - a[3]) / max(a[3], 1), 4)}


def bench_discover(view: ModelView, n_layers: int = 1) -> dict:
    """`discover.congruence_stats` over every neuron of the last `n_layers` layers: seconds, units/s, peak RSS."""
    from ..stages.discover import congruence_stats

    layers = list(range(max(0, view.n_layers - n_layers), view.n_layers))
    unembed = view.unembed()
    write = torch.cat([view.mlp_write(layer) for layer in layers])
    with PeakRss() as rss:
        start = time.perf_counter()
        stats = congruence_stats(write, unembed)
        sync(view)
        seconds = time.perf_counter() - start
    return {"layers": layers, "n_units": int(write.shape[0]), "d_vocab": int(unembed.shape[1]),
            "seconds": round(seconds, 3), "units_per_s": round(write.shape[0] / seconds, 1),
            "peak_rss_bytes": rss.peak, "peak_rss_delta_bytes": rss.peak - rss.before,
            "finite": bool(torch.isfinite(torch.from_numpy(stats.kurtosis)).all())}


def bench_attribute_parts(view: ModelView, run_dir: Path, *, repeats: int = 2) -> dict:
    """The attribute stage's parts on a real run directory (after `mine`), in one process, batched across units
    as the stage batches them: for every neuron unit with train prompts, `attribute_units` without look-ups
    (attribution, relevance, ablation: the stage before the look-ups issue), the same with look-up attribution
    and records, the units' occlusion (`occlusion_jobs`), and the QK split of all the look-ups
    (`stages/attribute/qk.py`, a splitter built per repeat). Seconds are each part's, the median of `repeats`
    interleaved repeats; `lookups_overhead` = with / without − 1, `occlusion_overhead` = occlusion / without,
    `qk_ratio` = the stage with the QK split over the stage without it ((with look-ups + occlusion + qk) /
    (with look-ups + occlusion))."""
    from dataclasses import replace

    from ..core.config import RunConfig
    from ..core.records import ContextRecord, UnitRecord, read_jsonl
    from ..stages.attribute import UnitPrompts, attribute_units, top_prompts, unit_read
    from ..stages.attribute.occlusion import occlusion_jobs
    from ..stages.attribute.qk import QkSplitter, qk_records

    config = RunConfig.from_yaml(run_dir / "config.yaml")
    cfg = config.attribute
    units = [u for u in read_jsonl(run_dir / "units.jsonl", UnitRecord) if u.sae_id is None]
    prompts = top_prompts(read_jsonl(run_dir / "contexts.jsonl", ContextRecord))
    bos = [view.tokenizer.bos_token_id] if config.corpus.prepend_bos and view.tokenizer.bos_token_id is not None else []
    items = []
    for u in units:
        train = prompts.get((u.unit_id, "train"), [])[:cfg.n_prompts]
        test = prompts.get((u.unit_id, "test"), [])
        if train:
            items.append(UnitPrompts(unit_read(view, u, cfg, {}), [bos + c.tokens for c in train],
                                     [bos + c.tokens for c in test], [c.rank for c in train], [c.rank for c in test]))
    run_as = {(it.read.unit.unit_id, split, r): p for it in items
              for split, ranks, ps in (("train", it.train_ranks, it.train), ("test", it.test_ranks, it.test))
              for r, p in zip(ranks, ps)}
    base = replace(cfg, lookups=False)
    times: dict[str, list[float]] = {"without_lookups": [], "with_lookups": [], "occlusion": [], "qk": []}
    n_qk = 0
    for _ in range(repeats):
        start = time.perf_counter()
        attribute_units(view, items, base)
        times["without_lookups"].append(time.perf_counter() - start)
        start = time.perf_counter()
        lookups: list = []
        attribute_units(view, items, cfg, lookups=lookups, offset=len(bos))
        times["with_lookups"].append(time.perf_counter() - start)
        start = time.perf_counter()
        n_qk = len(qk_records(QkSplitter(view), lookups, run_as, view.tokenizer, cfg.qk_sources, cfg.qk_components,
                              cfg.batch_size))
        times["qk"].append(time.perf_counter() - start)
        start = time.perf_counter()
        occlusion_jobs(view, [(it.read, it.train[:cfg.occlusion_prompts]) for it in items], len(bos), cfg.batch_size)
        times["occlusion"].append(time.perf_counter() - start)
    seconds = {k: round(statistics.median(v), 3) for k, v in times.items()}
    without = max(seconds["without_lookups"], 1e-9)
    return {"run_dir": str(run_dir), "n_units": len(items), "repeats": repeats, "seconds": seconds,
            "each_repeat": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "lookups_overhead": round(seconds["with_lookups"] / without - 1, 3),
            "occlusion_overhead": round(seconds["occlusion"] / without, 3),
            "qk_records": n_qk,
            "qk_ratio": round(1 + seconds["qk"] / max(seconds["with_lookups"] + seconds["occlusion"], 1e-9), 3)}