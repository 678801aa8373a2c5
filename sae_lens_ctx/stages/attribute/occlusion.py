"""Occlusion of a unit's train prompts: the unit's activation at the last token with each earlier context
token replaced, batched over tokens and prompts (N2G's saliency step, Foote et al. 2023; the rule and
its use are in `core/unit_lookups.py`).

Every variant of every prompt (the prompt itself, then one row per occluded position) is one row; rows of
similar length share a batch (`inputs.view.length_batches`), right-padded (`direct.pad_prompts`: nothing at or
before a row's last position sees the padding); a batch may hold rows of many units (`occlusion_jobs`), and
its forward stops after the deepest of their layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...core.unit_lookups import OcclusionRecord
from ...inputs.tokens import token_strings
from ...inputs.view import ModelView, length_batches, pad_id

from .direct import TOKENS_PER_BATCH, UnitRead, activation_hook, pad_prompts, unit_activation, unit_layer

@torch.inference_mode()
def occluded_activations(view: ModelView, read: UnitRead, prompts: Sequence[list[int]], offset: int,
                         batch_size: int = 32) -> list[tuple[float, list[float]]]:
    """Per prompt (token ids as run, `offset` tokens such as BOS in front): the unit's activation at the
    last position, and with each context position `offset .. len − 2` replaced by `pad_id` in turn
    (`[len − offset − 1]` activations, in position order). One unit's `occlusion_jobs`."""
    return occlusion_jobs(view, [(read, prompts)], offset, batch_size)[0]


@torch.inference_mode()
def occlusion_jobs(view: ModelView, jobs: Sequence[tuple[UnitRead, Sequence[list[int]]]], offset: int,
                   batch_size: int = 32) -> list[list[tuple[float, list[float]]]]:
    """`occluded_activations` for many (unit read, prompts) jobs at once (#28): every variant of every prompt of
    every unit is one row, and a forward (stopped after the deepest unit's layer) serves every unit in it."""
    replacement = pad_id(view.tokenizer)
    rows = [(u, p, None) for u, (_, prompts) in enumerate(jobs) for p in range(len(prompts))]
    rows += [(u, p, s) for u, (_, prompts) in enumerate(jobs) for p, prompt in enumerate(prompts)
             for s in range(offset, len(prompt) - 1)]
    values: dict[tuple[int, int, int | None], float] = {}
    for batch in length_batches([len(jobs[u][1][p]) for u, p, _ in rows], batch_size * TOKENS_PER_BATCH, batch_size):
        chunk = [rows[r] for r in batch]
        variants = []
        for u, p, s in chunk:
            tokens = list(jobs[u][1][p])
            if s is not None:
                tokens[s] = replacement
            variants.append(tokens)
        tokens, last = pad_prompts(variants, view)
        reads = {u: jobs[u][0] for u, _, _ in chunk}
        got: dict[str, torch.Tensor] = {}
        index = torch.arange(len(last))

        def save(name):
            def hook(x, hook):
                got[name] = x[index, last.to(x.device)].detach()
            return hook

        names = sorted({activation_hook(view, r) for r in reads.values()})
        view.run_with_hooks(tokens, [(name, save(name)) for name in names],
                            stop_at_layer=max(unit_layer(r) for r in reads.values()) + 1)
        for u, read in reads.items():
            mine = [i for i, (uu, _, _) in enumerate(chunk) if uu == u]
            for i, value in zip(mine, unit_activation(read, got[activation_hook(view, read)][mine]).tolist()):
                values[chunk[i]] = value
    return [[(values[(u, p, None)], [values[(u, p, s)] for s in range(offset, len(prompt) - 1)])
             for p, prompt in enumerate(prompts)] for u, (_, prompts) in enumerate(jobs)]


def occlusion_records(tokenizer, unit_id: str, prompts: Sequence[list[int]], ranks: Sequence[int], offset: int,
                      measured: Sequence[tuple[float, list[float]]], replacement_id: int,
                      split: str = "train") -> list[OcclusionRecord]:
    """An `OcclusionRecord` per prompt from `occluded_activations`' results."""
    out = []
    for prompt, rank, (clean, occluded) in zip(prompts, ranks, measured):
        context = list(prompt[offset:])
        text = token_strings(tokenizer, context) if context else []
        entries = [{"position": s, "token_id": int(context[s]), "token": text[s], "activation": a, "drop": clean - a}
                   for s, a in enumerate(occluded)]
        status = "inactive" if not clean > 0 else "one_token" if len(context) <= 1 else "ok"
        out.append(OcclusionRecord(
            unit_id=unit_id, split=split, rank=int(rank), n_tokens=len(context), offset=offset,
            last_token_id=int(context[-1]) if context else -1, last_token=text[-1] if context else "",
            activation=float(clean), replacement_id=int(replacement_id), tokens=entries, status=status))
    return out
