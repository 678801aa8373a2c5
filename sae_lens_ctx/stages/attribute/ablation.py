"""The causal check: a unit's activation and token probability with one query head's output removed (zeroed
or mean-ablated), batched over prompts and heads."""

from __future__ import annotations

import logging
from collections import defaultdict

import torch

from ...inputs.view import ModelView, length_batches

from .direct import TOKENS_PER_BATCH, UnitRead, pad_prompts

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
    similar length batched together, `inputs.view.length_batches`)."""
    unit = read.unit
    rows = [(p, None) for p in range(len(prompts))] + [(p, j) for p in range(len(prompts)) for j in range(len(heads))]
    probs = torch.zeros(len(rows))
    acts = torch.zeros(len(rows))
    for batch in length_batches([len(prompts[p]) for p, _ in rows], batch_size * TOKENS_PER_BATCH, batch_size):
        chunk = [rows[r] for r in batch]
        tokens, last = pad_prompts([prompts[p] for p, _ in chunk], view)
        idx = torch.arange(len(chunk))
        ablate: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for i, (_, j) in enumerate(chunk):
            if j is not None:
                ablate[heads[j][0]].append((i, heads[j][1]))
        got: dict[str, torch.Tensor] = {}

        def ablate_hook(layer):
            def hook(x, hook):
                for i, h in ablate[layer]:
                    if mode == "mean":
                        x[i, :, h] = mean_z[layer][h].to(x)
                    else:
                        x[i, :, h] = 0.0
                return x
            return hook

        def save_act(x, hook):
            got["act"] = x[idx, last.to(x.device)].detach().float()

        # 'v' of one query head is zeroed where that head alone reads it, its hook_z (see AttributeConfig.ablation)
        hooks = [(view.hook_name("z", l), ablate_hook(l)) for l in ablate]
        layer = unit.layer if read.sae is None else read.sae.layer
        if read.sae is None:
            hooks.append((view.hook_name("mlp_post", layer), save_act))
        else:
            hooks.append((read.sae.hook_name, save_act))
        logits = view.run_with_hooks(tokens, hooks, return_type="logits")
        probs[batch] = logits[idx, last.to(logits.device)].float().softmax(-1)[:, unit.token_id].cpu()
        act = got["act"]
        if read.sae is None:
            act = act[:, unit.index]
        else:
            act = read.sae.sae.encode(act.to(read.sae.sae.W_enc))[:, unit.index].float()
        acts[batch] = act.cpu()
    n = len(prompts)
    clean_p, clean_a = probs[:n], acts[:n]
    prob_drop = (clean_p[:, None] - probs[n:].reshape(n, len(heads))) if heads else torch.zeros(n, 0)
    act_drop = (clean_a[:, None] - acts[n:].reshape(n, len(heads))) if heads else torch.zeros(n, 0)
    return prob_drop, act_drop


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    return float(values[mask].mean()) if bool(mask.any()) else None
