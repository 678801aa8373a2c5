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
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import save_file
from scipy import stats as scipy_stats
from ..core.progress import tqdm  # a bar on a terminal, progress lines in a log

from ..core.config import AttributeConfig
from ..core.errors import UserError
from ..core.records import ContextRecord, HeadRecord, UnitRecord, atomic_path, atomic_write, read_jsonl, write_jsonl
from ..core.lookups import SINK_SHARE, LookupRecord
from ..core.rules import parse_rule
from ..inputs.tokens import token_strings
from ..inputs.context import RunContext
from ..inputs.view import ModelView, optional_bias, pad_batch, pad_id
from ..inputs.sae import SaeSource

log = logging.getLogger(__name__)


# -- active-head rules ---------------------------------------------------------------------------


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


# -- how a unit reads the residual stream ---------------------------------------------------------


@dataclass
class UnitRead:
    """A unit's linear read of the residual stream, per branch, and which heads feed it directly."""

    unit: UnitRecord
    head_layers: list[int]
    """Layers whose heads write directly into what the unit reads."""
    directions: dict[str, torch.Tensor]
    """branch → `[d_model]` read direction (gain folded in; centred for LayerNorm)."""
    bias: dict[str, float]
    """branch → constant term of the pre-activation."""
    rank_branch: str
    """The branch whose attributions rank heads."""
    scale_kind: str | None
    """Hook kind of the norm scale the unit divides by (`ln2_scale`), or None."""
    resid_kind: str
    """Hook kind of the residual stream the unit reads (`resid_mid`, `resid_pre`, `resid_post`)."""
    sae: SaeSource | None = None

    @property
    def labels(self) -> list[str]:
        return [head_label(layer, h) for layer in self.head_layers for h in range(self._n_heads)]

    _n_heads: int = field(default=0, repr=False)


def unit_read(view: ModelView, unit: UnitRecord, cfg: AttributeConfig, saes: dict[str, SaeSource]) -> UnitRead:
    """The read of a neuron (through its layer's ln2) or of an SAE latent on a residual-stream hook."""
    center = view.normalization == "LN"
    if unit.kind == "neuron":
        read = view.mlp_read(unit.layer)
        dirs = {b: w[:, unit.index] for b, w in read.weights.items()}
        bias = {b: float(v[unit.index]) for b, v in read.bias.items()}
        # In a parallel block the MLP reads resid_pre: heads of its own layer never feed it.
        layers = list(range(unit.layer + (1 if cfg.include_same_layer and not view.parallel else 0)))
        rank = cfg.gated_branch if view.gated else "in"
        out = UnitRead(unit, layers, dirs, bias, rank, f"{view.mlp_norm(unit.layer)}_scale",
                       view.mlp_input(unit.layer))
    else:
        sae = saes.get(unit.sae_id or "")
        if sae is None:
            raise UserError(f"unit {unit.unit_id} comes from SAE {unit.sae_id}, which is not in discover.saes")
        kinds = {"hook_resid_pre": ("resid_pre", 0), "hook_resid_mid": ("resid_mid", 1),
                 "hook_resid_post": ("resid_post", 1)}
        if sae.hook_kind not in kinds:
            raise UserError(f"SAE latents on {sae.hook_name} have no direct path from attention heads: "
                            "attribution supports SAEs on hook_resid_pre/mid/post")
        if str(getattr(sae.sae.cfg, "normalize_activations", "none")) != "none":
            raise UserError(f"SAE {sae.sae_id} normalises its input; attribution needs normalize_activations='none'")
        w_enc = sae.sae.W_enc.detach()[:, unit.index].to(view.device, view.dtype)
        b = float(sae.sae.b_enc.detach()[unit.index])
        if getattr(sae.sae.cfg, "apply_b_dec_to_input", False):
            b -= float(sae.sae.b_dec.detach().to(w_enc) @ w_enc)
        kind, extra = kinds[sae.hook_kind]
        layers = list(range(sae.layer + extra))
        out = UnitRead(unit, layers, {"latent": w_enc}, {"latent": b}, "latent", None, kind, sae=sae)
        center = False
    if center:
        out.directions = {b: d - d.mean() for b, d in out.directions.items()}
    out._n_heads = view.n_heads
    return out


def folded_heads(view: ModelView, read: UnitRead) -> dict[str, torch.Tensor]:
    """branch → `[n_head_layers, n_heads, d_head]`: `W_O[h] @ read`, once per unit (in a sandwich block
    `(W_O[h] ⊙ post-attention gain) @ read`; the post-attention scale is divided out per prompt)."""
    if not read.head_layers:
        return {b: torch.zeros(0, view.n_heads, view.d_head, device=view.device) for b in read.directions}
    w_o = torch.stack([view.post_gain(view.model.W_O[l].detach(), l, "ln1_post") for l in read.head_layers])
    return {b: torch.einsum("lhdm,m->lhd", w_o, d) for b, d in read.directions.items()}


def _post_scale_hooks(view: ModelView, layers: list[int], save) -> list:
    """Hooks on the post-attention norm scale of each of `layers` (sandwich blocks only), saved as `post{l}`."""
    return [(view.hook_name("ln1_post_scale", l), save(f"post{l}")) for l in layers] if view.sandwich else []


# -- forward passes --------------------------------------------------------------------------------


def pad_prompts(prompts: list[list[int]], view: ModelView) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `[B, max_len]` token ids (`inputs.model.pad_batch`) and each row's last position `[B]`."""
    return pad_batch(prompts, pad_id(view.tokenizer)), torch.tensor([len(p) - 1 for p in prompts])


@torch.inference_mode()
def attribute_prompts(view: ModelView, read: UnitRead, prompts: list[list[int]], batch_size: int = 32,
                      divide_by_scale: bool = True, sources: dict[str, torch.Tensor] | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per branch: `[n_prompts, n_upstream_heads]` attributions, and `[n_prompts]` pre-activations.

    Given a dict `sources`, the same forward also hooks `hook_pattern` (the last position's row) and
    `hook_v` and fills it with the exact per-source split of every attribution (`lookups.py`):
    'attention' and, per branch, the contributions, each `[n_prompts, n_upstream_heads, longest prompt]`
    (zero past a prompt's end); a branch's contributions sum over the last axis to its attributions."""

    folded = folded_heads(view, read)
    per_source: dict[str, list[torch.Tensor]] = defaultdict(list)
    width = max((len(p) for p in prompts), default=0)
    layer = read.unit.layer if read.sae is None else read.sae.layer
    attributions: dict[str, list[torch.Tensor]] = defaultdict(list)
    pre: dict[str, list[torch.Tensor]] = defaultdict(list)
    for b0 in range(0, len(prompts), batch_size):
        tokens, last = pad_prompts(prompts[b0:b0 + batch_size], view)
        rows = torch.arange(len(last))
        got: dict[str, torch.Tensor] = {}

        def save(key):
            def hook(x, hook):
                got[key] = x[rows, last.to(x.device)].detach()
            return hook

        hooks = [(view.hook_name("z", l), save(f"z{l}")) for l in read.head_layers]
        hooks += _post_scale_hooks(view, read.head_layers, save)
        if sources is not None:
            for l in read.head_layers:
                hooks.append((view.hook_name("pattern", l), lambda x, hook, l=l: got.__setitem__(
                    f"pattern{l}", x[rows, :, last.to(x.device)].detach())))  # [batch, head, key] at T
                hooks.append((view.hook_name("v", l), lambda x, hook, l=l: got.__setitem__(f"v{l}", x.detach())))
        hooks.append((view.hook_name(read.resid_kind, layer), save("resid")))
        if read.scale_kind:
            hooks.append((view.hook_name(read.scale_kind, layer), save("scale")))
        view.run_with_hooks(tokens, hooks, stop_at_layer=layer + 1)
        scale = got["scale"].reshape(-1, 1).float() if read.scale_kind else torch.ones(len(last), 1)
        resid = got["resid"].float()
        if view.normalization == "LN" and read.scale_kind:
            resid = resid - resid.mean(-1, keepdim=True)
        z = torch.stack([got[f"z{l}"] for l in read.head_layers], dim=1) if read.head_layers else None
        if z is not None and view.sandwich:  # each layer's heads pass through its post-attention norm scale
            post = torch.stack([got[f"post{l}"].reshape(-1) for l in read.head_layers], dim=1)
            z = z / post[:, :, None, None].to(z)
        for branch, f in folded.items():
            if z is None:
                a = torch.zeros(len(last), 0)
            else:
                a = torch.einsum("blhd,lhd->blh", z.float(), f.float()).flatten(1)
            attributions[branch].append((a / scale if divide_by_scale else a).cpu())
            pre[branch].append(((resid / scale) @ read.directions[branch].float() + read.bias[branch]).cpu())
            if sources is not None:
                c = torch.cat([source_contributions(got[f"pattern{l}"], got[f"v{l}"], f[i])
                               for i, l in enumerate(read.head_layers)], dim=1) if z is not None \
                    else torch.zeros(len(last), 0, tokens.shape[1])
                c = c / scale[:, :, None] if divide_by_scale else c
                per_source[branch].append(torch.nn.functional.pad(c.cpu(), (0, width - c.shape[-1])))
        if sources is not None:
            att = torch.cat([got[f"pattern{l}"].float() for l in read.head_layers], dim=1) if z is not None \
                else torch.zeros(len(last), 0, tokens.shape[1])
            per_source["attention"].append(torch.nn.functional.pad(att.cpu(), (0, width - att.shape[-1])))
    if sources is not None:
        sources.update({k: torch.cat(v) for k, v in per_source.items()})
    return ({b: torch.cat(v) for b, v in attributions.items()}, {b: torch.cat(v) for b, v in pre.items()})


@torch.inference_mode()
def decompose_pre_activation(view: ModelView, read: UnitRead, tokens: torch.Tensor,
                             branch: str | None = None) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Every direct component of the unit's pre-activation at every position of one unbatched prompt.

    Returns (labels, `[n_components, pos]` contributions, `[pos]` hooked pre-activation). Components:
    'embed' (token and positional embeddings: `resid_pre` of layer 0), each head, each layer's
    attention bias, each earlier MLP, and 'const' (biases of the read). For a neuron the reference is
    the hook of its branch (`mlp_pre` / `mlp_pre_linear`); for an SAE latent, the SAE's own encoder
    pre-activation on the hooked input.
    """
    branch = branch or read.rank_branch
    layer = read.unit.layer if read.sae is None else read.sae.layer
    all_head_layers = list(range(layer + (read.resid_kind != "resid_pre")))
    got: dict[str, torch.Tensor] = {}

    def save(key):
        def hook(x, hook):
            got[key] = x[0].detach().float()
        return hook

    hooks = [(view.hook_name("resid_pre", 0), save("embed"))]
    hooks += [(view.hook_name("z", l), save(f"z{l}")) for l in all_head_layers]
    hooks += _post_scale_hooks(view, all_head_layers, save)
    mlp_layers = list(range(layer + (read.resid_kind == "resid_post")))
    hooks += [(view.hook_name("mlp_out", l), save(f"mlp{l}")) for l in mlp_layers]
    hooks.append((view.hook_name(read.resid_kind, layer), save("resid")))
    if read.scale_kind:
        hooks.append((view.hook_name(read.scale_kind, layer), save("scale")))
    ref_kind = {"in": "mlp_pre", "gate": "mlp_pre", "up": "mlp_pre_linear"}.get(branch)
    if ref_kind:
        hooks.append((view.hook_name(ref_kind, layer), save("ref")))
    view.run_with_hooks(tokens.reshape(1, -1), hooks, stop_at_layer=layer + 1)
    labels, parts = ["embed"], [got["embed"]]
    w_o = view.model.W_O.detach()
    for l in all_head_layers:
        # a sandwich block's post-attention norm: its gain on every write, its scale at every position
        post = got[f"post{l}"].reshape(-1, 1) if view.sandwich else 1.0
        for h in range(view.n_heads):
            labels.append(head_label(l, h))
            parts.append(got[f"z{l}"][:, h] @ view.post_gain(w_o[l, h], l, "ln1_post").float() / post)
        labels.append(f"L{l}.b_O")
        b_o = optional_bias(view.model, "b_O", l, view.d_model, w_o)
        parts.append(view.post_gain(b_o, l, "ln1_post").float().expand_as(got["embed"]) / post)
    for l in mlp_layers:
        labels.append(f"L{l}.mlp")
        parts.append(got[f"mlp{l}"])
    stack = torch.stack(parts)  # [n, pos, d_model]
    if not torch.allclose(stack.sum(0), got["resid"], atol=1e-3, rtol=1e-3):
        raise AssertionError("the residual-stream components do not sum to the hooked residual stream")
    if view.normalization == "LN" and read.scale_kind:
        stack = stack - stack.mean(-1, keepdim=True)
    scale = got["scale"].reshape(1, -1) if read.scale_kind else torch.ones(1, stack.shape[1])
    contrib = (stack @ read.directions[branch].float()) / scale
    labels.append("const")
    contrib = torch.cat([contrib, torch.full((1, contrib.shape[1]), read.bias[branch])])
    reference = got["ref"][:, read.unit.index] if ref_kind else _sae_pre(read.sae.sae, got["resid"], read.unit.index)
    return labels, contrib, reference


def _sae_pre(sae, x: torch.Tensor, index: int) -> torch.Tensor:
    """The SAE's encoder pre-activation of latent `index`, computed the way SAE-Lens encodes."""
    sae_in = x - sae.b_dec * (1.0 if getattr(sae.cfg, "apply_b_dec_to_input", False) else 0.0)
    return sae_in @ sae.W_enc[:, index] + sae.b_enc[index]


# -- the causal check ------------------------------------------------------------------------------


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
    at each prompt's last position, one ablated head per batch row next to a clean row per prompt."""
    unit = read.unit
    rows = [(p, None) for p in range(len(prompts))] + [(p, j) for p in range(len(prompts)) for j in range(len(heads))]
    probs = torch.zeros(len(rows))
    acts = torch.zeros(len(rows))
    for r0 in range(0, len(rows), batch_size):
        chunk = rows[r0:r0 + batch_size]
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
        probs[r0:r0 + len(chunk)] = logits[idx, last.to(logits.device)].float().softmax(-1)[:, unit.token_id].cpu()
        act = got["act"]
        if read.sae is None:
            act = act[:, unit.index]
        else:
            act = read.sae.sae.encode(act.to(read.sae.sae.W_enc))[:, unit.index].float()
        acts[r0:r0 + len(chunk)] = act.cpu()
    n = len(prompts)
    clean_p, clean_a = probs[:n], acts[:n]
    prob_drop = (clean_p[:, None] - probs[n:].reshape(n, len(heads))) if heads else torch.zeros(n, 0)
    act_drop = (clean_a[:, None] - acts[n:].reshape(n, len(heads))) if heads else torch.zeros(n, 0)
    return prob_drop, act_drop


def _mean(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    return float(values[mask].mean()) if bool(mask.any()) else None


# -- the stage -----------------------------------------------------------------------------------


def _top_prompts(contexts: list[ContextRecord]) -> dict[tuple[str, str], list[ContextRecord]]:
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
    to the context tokens, 1 for BOS)."""
    rule = parse_rule(cfg.rule)
    src_train: dict | None = {} if lookups is not None else None
    src_test: dict | None = {} if lookups is not None else None
    a_train, pre_train = attribute_prompts(view, read, train, cfg.batch_size, cfg.divide_by_scale, src_train)
    a_test, _ = attribute_prompts(view, read, test, cfg.batch_size, cfg.divide_by_scale, src_test) \
        if test else ({}, {})
    branch = read.rank_branch
    labels = read.labels
    active_train = rule.mask(a_train[branch])
    active_test = rule.mask(a_test[branch]) if test else torch.zeros(0, len(labels), dtype=torch.bool)
    fraction = active_train.float().mean(0)
    relevant = (fraction >= cfg.band_low) & (fraction <= cfg.band_high)
    heads = [(int(lab[1:].split("H")[0]), int(lab.split("H")[1])) for lab in labels]
    chosen = [j for j in range(len(labels)) if relevant[j]]
    drops = None
    if chosen and test and cfg.ablation != "none":
        drops = ablation_drops(view, read, test, [heads[j] for j in chosen], cfg.ablation, mean_z, cfg.batch_size)
    records = []
    for j, label in enumerate(labels):
        ablation: dict = {}
        if drops is not None and j in chosen:
            k = chosen.index(j)
            prob, act, on = drops[0][:, k], drops[1][:, k], active_test[:, j]
            ablation = dict(prob_drop_active=_mean(prob, on), prob_drop_inactive=_mean(prob, ~on),
                            act_drop_active=_mean(act, on), act_drop_inactive=_mean(act, ~on))
            if on.any() and (~on).any():
                ablation["ablation_effect"] = ablation["prob_drop_active"] - ablation["prob_drop_inactive"]
                ablation["ablation_pvalue"] = float(_ks_2samp(prob[on].numpy(), prob[~on].numpy()).pvalue)
        records.append(HeadRecord(
            unit_id=read.unit.unit_id, head=label, layer=heads[j][0], head_index=heads[j][1],
            active_fraction=float(fraction[j]), mean_attribution=float(a_train[branch][:, j].mean()),
            relevant=bool(relevant[j]),
            active_train_ranks=[train_ranks[p] for p in range(len(train)) if active_train[p, j]],
            inactive_train_ranks=[train_ranks[p] for p in range(len(train)) if not active_train[p, j]],
            active_test_ranks=[test_ranks[p] for p in range(len(test)) if active_test[p, j]],
            inactive_test_ranks=[test_ranks[p] for p in range(len(test)) if not active_test[p, j]],
            branch=branch, branch_mean_attribution={b: float(a[:, j].mean()) for b, a in a_train.items()},
            **ablation,
        ))
    if lookups is not None:

        for split, prompts_, ranks, active, src in (("train", train, train_ranks, active_train, src_train),
                                                    ("test", test, test_ranks, active_test, src_test)):
            if prompts_:
                lookups += lookup_records(view.tokenizer, read.unit.unit_id, labels, chosen, prompts_, ranks, split,
                                          active, src.pop("attention"), src, branch, offset, cfg.lookup_top_k)
    matrices = {f"{read.unit.unit_id}/{split}/{b}": a.contiguous()
                for split, per_branch in (("train", a_train), ("test", a_test)) for b, a in per_branch.items()}
    matrices[f"{read.unit.unit_id}/train/ranks"] = torch.tensor(train_ranks)
    matrices[f"{read.unit.unit_id}/test/ranks"] = torch.tensor(test_ranks)
    explained = float(a_train[branch].sum()) / max(abs(float((pre_train[branch] - read.bias[branch]).sum())), 1e-12)
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
    units = read_jsonl(ctx.path("units.jsonl"), UnitRecord)
    prompts = _top_prompts(read_jsonl(ctx.path("contexts.jsonl"), ContextRecord))
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
    for unit in tqdm(units, desc="attribute", unit="unit", disable=None):
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
        recs, mats, summary = attribute_unit(
            view, read, [bos + c.tokens for c in train], [bos + c.tokens for c in test],
            [c.rank for c in train], [c.rank for c in test], cfg, mean_z, lookups, len(bos))
        summary["control"] = unit.control
        records += recs
        matrices.update(mats)
        per_unit.append(summary)
    write_jsonl(ctx.path("heads.jsonl"), records)
    write_jsonl(ctx.path("lookups.jsonl"), lookups or [])
    _save_matrices(ctx.path("attributions.safetensors"), matrices)
    report = attribution_summary(records, per_unit, skipped, units)
    atomic_write(ctx.path("attribute.json"), json.dumps(report, indent=2) + "\n")
    print(summary_text(report))


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


def source_contributions(pattern_t: torch.Tensor, v: torch.Tensor, folded: torch.Tensor) -> torch.Tensor:
    """Per-source split of `z_h[T] · f_h` for one layer.

    `pattern_t` `[batch, n_heads, pos]` (the attention row of each prompt's last position), `v`
    `[batch, pos, n_kv_heads, d_head]` (hooked, bias included), `folded` `[n_heads, d_head]` (`W_O[h] @ read`)
    → `[batch, n_heads, pos]`, which sums over `pos` to `einsum(z[T], folded)` exactly (fp round-off)."""
    group = pattern_t.shape[1] // v.shape[2]
    vf = torch.einsum("bskd,khd->bkhs", v.float(), folded.float().reshape(v.shape[2], group, -1))
    return pattern_t.float() * vf.reshape(pattern_t.shape)


def lookup_records(tokenizer, unit_id: str, labels: Sequence[str], chosen: Sequence[int], prompts: Sequence[list[int]],
                   ranks: Sequence[int], split: str, active: torch.Tensor, attention: torch.Tensor,
                   contributions: dict[str, torch.Tensor], branch: str, offset: int, top_k: int) -> list[LookupRecord]:
    """Records of the heads `chosen` (indices into `labels`) on every prompt. `attention` and
    `contributions[b]` are `[n_prompts, n_heads, width]` (zero past each prompt's end), `active`
    `[n_prompts, n_heads]`."""
    records = []
    for p, tokens in enumerate(prompts):
        n = len(tokens)
        text = token_strings(tokenizer, tokens)
        for j in chosen:
            c = contributions[branch][p, j, :n]
            a = attention[p, j, :n]
            order = sorted(range(n), key=lambda s: (-abs(float(c[s])), s))[:top_k]
            sources = []
            for s in order:
                entry = {"position": s, "token_id": int(tokens[s]), "token": text[s], "attention": float(a[s]),
                         "contribution": float(c[s])}
                if len(contributions) > 1:
                    entry["branches"] = {b: float(v[p, j, s]) for b, v in contributions.items()}
                sources.append(entry)
            status = "one_position" if n == 1 else "first_position_only" if float(a[0]) >= SINK_SHARE else "ok"
            records.append(LookupRecord(
                unit_id=unit_id, head=labels[j], split=split, rank=int(ranks[p]), active=bool(active[p, j]),
                branch=branch, attribution=float(c.sum()), n_positions=n, offset=offset,
                first_attention=float(a[0]), first_contribution=float(c[0]), sources=sources, status=status))
    return records
