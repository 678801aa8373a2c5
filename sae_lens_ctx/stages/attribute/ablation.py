"""The causal check: a unit's activation and token probability with one query head's output removed (zeroed
or mean-ablated), batched over prompts and heads."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

import torch

from ...inputs.view import ModelView, length_batches

from .direct import TOKENS_PER_BATCH, UnitRead, activation_hook, pad_prompts, unit_activation

log = logging.getLogger(__name__)


@torch.inference_mode()
def mean_head_outputs(view: ModelView, contexts: list[list[int]], layers: list[int]) -> dict[int, torch.Tensor]:
    """layer → `[n_heads, d_head]` mean of `hook_z` over the given contexts (for mean-ablation)."""
    sums = {l: torch.zeros(view.n_heads, view.d_head) for l in layers}
    count = 0
    for b0 in range(0, len(contexts), 16):
        chunk = contexts[b0:b0 + 16]
        tokens, last = pad_prompts(chunk, view)
        mask = torch.arange(tokens.shape[1])[None, :] <= last[:, None]

        def add(layer):
            def hook(x, hook):
                sums[layer] += (x.float().cpu() * mask[..., None, None]).sum((0, 1))
            return hook

        view.run_with_hooks(tokens, [(view.hook_name("z", l), add(l)) for l in layers], stop_at_layer=max(layers) + 1)
        count += int(mask.sum())
    return {l: s / max(count, 1) for l, s in sums.items()}


@torch.inference_mode()
def ablation_drops(view: ModelView, read: UnitRead, prompts: list[list[int]], heads: list[tuple[int, int]],
                   mode: str = "z", mean_z: dict[int, torch.Tensor] | None = None,
                   batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """`[n_prompts, n_heads]` drops (clean − ablated) of the unit's token probability and of its activation
    at each prompt's last position, one ablated head per batch row next to a clean row per prompt (rows of
    similar length batched together, `inputs.view.length_batches`). One unit's `ablation_jobs`."""
    return ablation_jobs(view, [(read, prompts, heads)], mode, mean_z, batch_size)[0]


@torch.inference_mode()
def ablation_jobs(view: ModelView, jobs: Sequence[tuple[UnitRead, Sequence[list[int]], Sequence[tuple[int, int]]]],
                  mode: str = "z", mean_z: dict[int, torch.Tensor] | None = None,
                  batch_size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`ablation_drops` for many (unit read, prompts, heads) jobs at once (#28): every (unit, prompt, ablated
    head or none) row of every job is one batch row, so a forward serves many units (each reads its own hook
    and token). Per job: `[n_prompts, n_heads]` probability and activation drops."""
    rows = [(u, p, None) for u, (_, prompts, _) in enumerate(jobs) for p in range(len(prompts))]
    rows += [(u, p, j) for u, (_, prompts, heads) in enumerate(jobs) for p in range(len(prompts))
             for j in range(len(heads))]
    probs, acts = torch.zeros(len(rows)), torch.zeros(len(rows))
    lengths = [len(jobs[u][1][p]) for u, p, _ in rows]
    for batch in length_batches(lengths, batch_size * TOKENS_PER_BATCH, batch_size):
        chunk = [rows[r] for r in batch]
        tokens, last = pad_prompts([jobs[u][1][p] for u, p, _ in chunk], view)
        ablate: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for i, (u, _, j) in enumerate(chunk):
            if j is not None:
                layer, head = jobs[u][2][j]
                ablate[layer].append((i, head))
        got: dict[str, torch.Tensor] = {}

        def ablate_hook(layer):
            def hook(x, hook):
                for i, h in ablate[layer]:
                    x[i, :, h] = mean_z[layer][h].to(x) if mode == "mean" else 0.0
                return x
            return hook

        def save(name):
            def hook(x, hook):
                got[name] = x.detach()
            return hook

        # 'v' of one query head is zeroed where that head alone reads it, its hook_z (see AttributeConfig.ablation)
        hooks = [(view.hook_name("z", l), ablate_hook(l)) for l in sorted(ablate)]
        reads = {u: jobs[u][0] for u, _, _ in chunk}
        names = sorted({activation_hook(view, r) for r in reads.values()})
        hooks += [(name, save(name)) for name in names]
        logits = view.run_with_hooks(tokens, hooks, return_type="logits")
        at_last = logits[torch.arange(len(chunk)), last.to(logits.device)].float().softmax(-1)
        for u, read in reads.items():
            mine = torch.tensor([i for i, (uu, _, _) in enumerate(chunk) if uu == u])
            probs[torch.tensor(batch)[mine]] = at_last[mine, read.unit.token_id].cpu()
            acts[torch.tensor(batch)[mine]] = unit_activation(
                read, got[activation_hook(view, read)][mine, last[mine].to(logits.device)])
    out, r0 = [], 0
    n_clean = sum(len(p) for _, p, _ in jobs)
    c0 = 0
    for read, prompts, heads in jobs:
        n, k = len(prompts), len(heads)
        clean_p, clean_a = probs[c0:c0 + n], acts[c0:c0 + n]
        ablated = slice(n_clean + r0, n_clean + r0 + n * k)
        prob_drop = clean_p[:, None] - probs[ablated].reshape(n, k) if k else torch.zeros(n, 0)
        act_drop = clean_a[:, None] - acts[ablated].reshape(n, k) if k else torch.zeros(n, 0)
        out.append((prob_drop, act_drop))
        c0, r0 = c0 + n, r0 + n * k
    return out


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    return float(values[mask].mean()) if bool(mask.any()) else None
