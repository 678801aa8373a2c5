"""Throughput benchmarks against in-process baselines (ARCHITECTURE §6).

`bench_scan` times the mining scan and its baselines in one process, on the same batches, interleaved
`repeats` times (the median of each is reported), so machine load affects them alike:

* `scan`: `mine.scan`: hooks only on the units' layers, forward stopped after the last, per-context
  max on the device, running top-k merged batch by batch;
* `forward`: the model's plain forward with logits, no hooks (the ceiling the issue compares with);
* `forward_until_hooks`: the forward stopped where the scan stops it (right after the last hook it
  needs), with no-op hooks (so `scan / forward_until_hooks` is the cost of the reductions alone);
* `run_with_cache_topk`: TransformerLens `run_with_cache` on the needed hooks (full forward, the
  activations cached), then each unit's per-context max, kept for every context, and one top-k at
  the end (the straightforward way).

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
import heapq
import json
import os
import platform
import random
import statistics
import threading
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import torch

from .inputs.corpus import TokenContext
from .stages.mine.scan import UnitReader, batches, run_until_hooks, scan
from .inputs.view import ModelView, pad_batch, pad_id
from .inputs.sae import SaeSource
from .core.records import UnitRecord


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
    return {
        "model": view.name, "device": str(view.device), "n_units": len(units), "k": k,
        "n_contexts": len(contexts), "n_tokens": n_tokens, "batch_size": batch_size, "repeats": repeats,
        "stop_at_layer": reader.stop_at_layer, "n_layers": view.n_layers,
        "tokens_per_s": {name: round(r, 1) for name, r in rates.items()},
        "scan_vs_forward": round(rates["scan"] / rates["forward"], 3),
        "scan_vs_forward_until_hooks": round(rates["scan"] / rates["forward_until_hooks"], 3),
        "scan_vs_run_with_cache_topk": round(rates["scan"] / rates["run_with_cache_topk"], 3),
        **({"compiled_vs_scan": round(rates["scan_compiled"] / rates["scan"], 3), "compile_seconds": compile_seconds,
            "compile_error": compiled.compile_error} if compile else {}),
        "seconds": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
    }


# -- `sae-lens-ctx bench` -----------------------------------------------------------------------

RATIO_KEYS = ("scan_over_forward", "scan_over_tl_cache", "scan_over_paper", "attribution_over_paper",
              "trim_over_serial")
"""The keys of `ratios` in the JSON `bench --out` writes (ours over the baseline, > 1: ours is faster)."""

_GPT2 = dict(d_head=64, d_vocab=50257, n_ctx=1024, act_fn="gelu_new", normalization_type="LN")
SHAPES: dict[str, dict] = {
    "gpt2-small": dict(n_layers=12, d_model=768, n_heads=12, d_mlp=3072, **_GPT2),
    "gpt2-medium": dict(n_layers=24, d_model=1024, n_heads=16, d_mlp=4096, **_GPT2),
    "gpt2-large": dict(n_layers=36, d_model=1280, n_heads=20, d_mlp=5120, **_GPT2),
    "pythia-160m": dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50304, n_ctx=2048,
                        act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary", rotary_dim=16,
                        parallel_attn_mlp=True),
    "smollm2": dict(n_layers=30, d_model=576, n_heads=9, n_key_value_heads=3, d_head=64, d_mlp=1536, d_vocab=49152,
                    n_ctx=2048, act_fn="silu", normalization_type="RMS", gated_mlp=True, final_rms=True,
                    positional_embedding_type="rotary", rotary_dim=64, rotary_base=100000),
    "tiny": dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, d_vocab=512, n_ctx=128, act_fn="gelu_new",
                 normalization_type="LN"),
}
"""Named shapes for `bench --shape` (random weights). `smollm2` is the embedded model's shape
(SmolLM2-135M: gated SiLU MLP, RMSNorm, rotary, grouped-query attention)."""

DEFAULT_SHAPES = ("gpt2-small", "smollm2")


def shape_model(shape: str, *, device: str = "cpu", dtype: str = "float32", seed: int = 0) -> ModelView:
    """A `HookedTransformer` of a named shape with random weights (no tokenizer, no hub)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from .core.errors import UserError, did_you_mean

    if shape not in SHAPES:
        raise UserError(f"unknown shape '{shape}'{did_you_mean(shape, SHAPES)}: choose one of {', '.join(SHAPES)}")
    cfg = HookedTransformerConfig(**SHAPES[shape], seed=seed, device=device, dtype=getattr(torch, dtype))
    model = HookedTransformer(cfg)
    model.eval()
    return ModelView(model, name=f"random:{shape}", source="random", weights="raw")


def synthetic_contexts(n: int, length: int, d_vocab: int, bos_id: int, seed: int = 0,
                       min_length: int | None = None) -> list[TokenContext]:
    """`n` token contexts of `min_length..length` tokens (BOS first), random ids; 3 contexts a document."""
    rng = random.Random(seed)
    lo = max(2, min_length if min_length is not None else length // 2)
    return [TokenContext(f"doc{i // 3}", "train", i % 3, 0,
                         (bos_id, *(rng.randrange(d_vocab) for _ in range(rng.randint(lo, length) - 1))))
            for i in range(n)]


def neuron_units(view: ModelView, n_units: int, layers: Sequence[int], seed: int = 0) -> list[UnitRecord]:
    """`n_units` neurons spread over `layers` (seeded choice of indices)."""
    rng = random.Random(seed)
    out = []
    for j in range(n_units):
        layer = layers[j % len(layers)]
        index = rng.randrange(view.d_mlp)
        out.append(UnitRecord(unit_id=f"L{layer}N{index}", kind="neuron", layer=layer, index=index,
                              hook_name=view.hook_name("mlp_post", layer), token_id=0, token="", congruence=0.0,
                              control=False, direction="promote", rank_in_layer=j + 1))
    return out


def _sync(view: ModelView) -> None:
    if view.device.type == "cuda":
        torch.cuda.synchronize()


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
    _sync(view)
    seconds = time.perf_counter() - start
    return {"n_contexts": len(contexts), "n_tokens": n_tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(n_tokens / seconds, 1)}


def _attribution_units(view: ModelView, n: int, seed: int) -> list[UnitRecord]:
    layer = view.n_layers - 1
    return neuron_units(view, n, [layer], seed=seed + 1)


def bench_attribution(view: ModelView, units: Sequence[UnitRecord], prompts: list[list[int]], *,
                      batch_size: int = 32, paper_pairs: int = 2) -> dict:
    """Ours (`attribute_prompts`, every prompt of every unit) against the paper-style full-cache batch-1
    path on the first `paper_pairs` (unit, prompt) pairs; prompts/s counts (unit, prompt) pairs."""
    from .stages.attribute import attribute_prompts, unit_read
    from .core.config import AttributeConfig

    cfg = AttributeConfig()
    reads = [unit_read(view, u, cfg, {}) for u in units]
    attribute_prompts(view, reads[0], prompts[:2], batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    ours = [attribute_prompts(view, r, prompts, batch_size=batch_size)[0] for r in reads]
    _sync(view)
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
    _sync(view)
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
    from .core.config import MineConfig
    from .stages.mine.trim import trim_prompts, trim_serial

    cfg = MineConfig(batch_size=batch_size, trim_ratio=ratio)
    start = time.perf_counter()
    stats = trim_prompts(reader, prompts, cfg, bos, bos_ids, width)
    _sync(reader.view)
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
    from .stages.discover import congruence_stats

    layers = list(range(max(0, view.n_layers - n_layers), view.n_layers))
    unembed = view.unembed()
    write = torch.cat([view.mlp_write(layer) for layer in layers])
    with PeakRss() as rss:
        start = time.perf_counter()
        stats = congruence_stats(write, unembed)
        _sync(view)
        seconds = time.perf_counter() - start
    return {"layers": layers, "n_units": int(write.shape[0]), "d_vocab": int(unembed.shape[1]),
            "seconds": round(seconds, 3), "units_per_s": round(write.shape[0] / seconds, 1),
            "peak_rss_bytes": rss.peak, "peak_rss_delta_bytes": rss.peak - rss.before,
            "finite": bool(torch.isfinite(torch.from_numpy(stats.kurtosis)).all())}


def bench_model(view: ModelView, *, n_contexts: int = 12, context_len: int = 64, n_units: int = 64, k: int = 8,
                batch_size: int = 16, repeats: int = 2, paper_contexts: int = 2, attr_units: int = 2,
                n_prompts: int = 8, paper_pairs: int = 2, trim_prompts_n: int = 6, serial_prompts: int = 2,
                memory_tokens: int = 512, discover_layers: int = 1, seed: int = 0, compile: bool = False,
                log=print) -> dict:
    """Every measurement of `sae-lens-ctx bench` on one model; returns its JSON record."""
    from .stages.mine.scan import collect_prompts

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
    attribution = bench_attribution(view, _attribution_units(view, attr_units, seed), prompts,
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


def bench_cli(argv: list[str]) -> int:
    """`sae-lens-ctx bench [--shape S ...] [--model NAME ...] [--out FILE] [sizes]`."""
    import argparse

    from .core.config import ModelConfig
    from .inputs.model import load_model

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
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        from .core.errors import UserError

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
