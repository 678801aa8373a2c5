"""Occlusion of a unit's train prompts: the unit's activation at the last token with each earlier context
token replaced, batched over tokens and prompts (N2G's saliency step, Foote et al. 2023; the rule and
its use are in `core/unit_lookups.py`).

Every variant of every prompt (the prompt itself, then one row per occluded position) is one row; rows of
similar length share a batch (`inputs.view.length_batches`), right-padded (`direct.pad_prompts`: nothing at or
before a row's last position sees the padding), and the forward stops as soon as the unit's hook has fired.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...core.unit_lookups import OcclusionRecord
from ...inputs.tokens import token_strings
from ...inputs.view import ModelView, length_batches, pad_id

from .direct import TOKENS_PER_BATCH, UnitRead, pad_prompts

class _Fired(Exception):
    """Raised by the unit's hook to end the forward there (nothing after it is needed)."""


def _read_activation(view: ModelView, read: UnitRead, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """`[batch]` the unit's activation at each row's last position (neurons: `mlp_post`; SAE latents: the
    SAE's encoding of its hook), from a forward that stops at that hook."""
    got: dict[str, torch.Tensor] = {}
    rows = torch.arange(len(last))

    def save(x, hook):
        got["act"] = x[rows, last.to(x.device)].detach()
        raise _Fired

    if read.sae is None:
        name = view.hook_name("mlp_post", read.unit.layer)
    else:
        name = read.sae.hook_name
    try:
        view.run_with_hooks(tokens, [(name, save)])
    except _Fired:
        pass
    act = got["act"]
    if read.sae is None:
        return act[:, read.unit.index].float().cpu()
    sae = read.sae
    x = act.flatten(-2) if sae.hook_kind == "attn.hook_z" else act
    return sae.sae.encode(x.to(sae.sae.W_enc)).detach()[:, read.unit.index].float().cpu()


@torch.inference_mode()
def occluded_activations(view: ModelView, read: UnitRead, prompts: Sequence[list[int]], offset: int,
                         batch_size: int = 32) -> list[tuple[float, list[float]]]:
    """Per prompt (token ids as run, `offset` tokens such as BOS in front): the unit's activation at the
    last position, and with each context position `offset .. len − 2` replaced by `pad_id` in turn
    (`[len − offset − 1]` activations, in position order)."""
    replacement = pad_id(view.tokenizer)
    rows = [(p, None) for p in range(len(prompts))]
    rows += [(p, s) for p, prompt in enumerate(prompts) for s in range(offset, len(prompt) - 1)]
    values: dict[tuple[int, int | None], float] = {}
    for batch in length_batches([len(prompts[p]) for p, _ in rows], batch_size * TOKENS_PER_BATCH, batch_size):
        chunk = [rows[r] for r in batch]
        variants = []
        for p, s in chunk:
            tokens = list(prompts[p])
            if s is not None:
                tokens[s] = replacement
            variants.append(tokens)
        tokens, last = pad_prompts(variants, view)
        for key, value in zip(chunk, _read_activation(view, read, tokens, last).tolist()):
            values[key] = value
    return [(values[(p, None)], [values[(p, s)] for s in range(offset, len(prompt) - 1)])
            for p, prompt in enumerate(prompts)]


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
