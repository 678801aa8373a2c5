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
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from .corpus import TokenContext
from .mine import UnitReader, batches, run_until_hooks, scan
from .trim import pad_batch
from .model import ModelView
from .units import SaeSource, UnitRecord


def bench_scan(view: ModelView, contexts: Sequence[TokenContext], units: Sequence[UnitRecord], *,
               saes: dict[str, SaeSource] | None = None, k: int = 20, batch_size: int = 32, bos: int = 1,
               repeats: int = 3) -> dict:
    """Tokens/s of the scan and its baselines over `contexts` (see the module docstring)."""
    reader = UnitReader(view, units, saes)
    pad_id = getattr(view.tokenizer, "pad_token_id", None) or 0
    plan = [[contexts[i].tokens for i in idxs] for idxs, _ in batches(contexts, batch_size)]
    tokens = [pad_batch(rows, pad_id).to(view.device) for rows in plan]
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
        "seconds": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
    }
