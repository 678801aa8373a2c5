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
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import save_file
from scipy import stats as scipy_stats
from tqdm.auto import tqdm

from .config import AttributeConfig
from .errors import UserError
from .model import ModelView, _optional_bias
from .pipeline import RunContext
from .records import ContextRecord, HeadRecord, atomic_path, atomic_write, read_jsonl, write_jsonl
from .units import SaeSource, UnitRecord

log = logging.getLogger(__name__)


# -- active-head rules ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ActiveRule:
    """Marks the heads active on each prompt from that prompt's attributions."""

    kind: str
    """'topk' or 'zscore'."""
    value: float

    def mask(self, attributions: torch.Tensor) -> torch.Tensor:
        """`[n_prompts, n_heads]` attributions → boolean mask of active heads.

        `topk` marks the k largest attributions of a prompt that are positive: a head whose direct
        contribution is zero or negative does not switch the unit on (on real models the top heads are
        positive, so this is the paper's top-3; on exact zeros it stops ties from being picked at random).
        Values within 1e-6 of the prompt's largest magnitude count as zero.
        """
        if attributions.shape[1] == 0:  # a unit with no upstream heads (layer 0, resid_pre)
            return torch.zeros_like(attributions, dtype=torch.bool)
        floor = 1e-6 * attributions.abs().amax(dim=1, keepdim=True)
        if self.kind == "topk":
            k = min(int(self.value), attributions.shape[1])
            idx = attributions.topk(k, dim=1).indices
            top = torch.zeros_like(attributions, dtype=torch.bool).scatter_(1, idx, True)
            return top & (attributions > floor)
        mean = attributions.mean(dim=1, keepdim=True)
        std = attributions.std(dim=1, keepdim=True) if attributions.shape[1] > 1 else torch.zeros_like(mean)
        return (attributions > mean + self.value * std) & (attributions > floor)


_RULES = {"mean+2std": ActiveRule("zscore", 2.0), "top3": ActiveRule("topk", 3)}


def parse_rule(text: str) -> ActiveRule:
    """'mean+2std' | 'top3' | 'topk:N' | 'zscore:X'."""
    if text in _RULES:
        return _RULES[text]
    m = re.fullmatch(r"(topk|zscore):([0-9]*\.?[0-9]+)", text)
    if not m or (m.group(1) == "topk" and (not m.group(2).isdigit() or int(m.group(2)) < 1)):
        raise UserError(f"unknown active-head rule '{text}': use mean+2std, top3, topk:N or zscore:X")
    return ActiveRule(m.group(1), float(m.group(2)))


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
        layers = list(range(unit.layer + (1 if cfg.include_same_layer else 0)))
        rank = cfg.gated_branch if view.gated else "in"
        out = UnitRead(unit, layers, dirs, bias, rank, "ln2_scale", "resid_mid")
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
    """branch → `[n_head_layers, n_heads, d_head]`: `W_O[h] @ read`, once per unit."""
    if not read.head_layers:
        return {b: torch.zeros(0, view.n_heads, view.d_head, device=view.device) for b in read.directions}
    w_o = view.model.W_O[read.head_layers[0]: read.head_layers[-1] + 1].detach()
    return {b: torch.einsum("lhdm,m->lhd", w_o, d) for b, d in read.directions.items()}


# -- forward passes --------------------------------------------------------------------------------


def pad_batch(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists; return the batch and each row's last position."""
    width = max(len(p) for p in prompts)
    batch = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, : len(p)] = torch.tensor(p)
    return batch, torch.tensor([len(p) - 1 for p in prompts])


@torch.inference_mode()
def attribute_prompts(view: ModelView, read: UnitRead, prompts: list[list[int]], batch_size: int = 32,
                      divide_by_scale: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per branch: `[n_prompts, n_upstream_heads]` attributions, and `[n_prompts]` pre-activations."""
    folded = folded_heads(view, read)
    layer = read.unit.layer if read.sae is None else read.sae.layer
    attributions: dict[str, list[torch.Tensor]] = defaultdict(list)
    pre: dict[str, list[torch.Tensor]] = defaultdict(list)
    for b0 in range(0, len(prompts), batch_size):
        tokens, last = pad_batch(prompts[b0:b0 + batch_size], _pad_id(view))
        rows = torch.arange(len(last))
        got: dict[str, torch.Tensor] = {}

        def save(key):
            def hook(x, hook):
                got[key] = x[rows, last.to(x.device)].detach()
            return hook

        hooks = [(view.hook_name("z", l), save(f"z{l}")) for l in read.head_layers]
        hooks.append((view.hook_name(read.resid_kind, layer), save("resid")))
        if read.scale_kind:
            hooks.append((view.hook_name(read.scale_kind, layer), save("scale")))
        view.run_with_hooks(tokens, hooks, stop_at_layer=layer + 1)
        scale = got["scale"].reshape(-1, 1).float() if read.scale_kind else torch.ones(len(last), 1)
        resid = got["resid"].float()
        if view.normalization == "LN" and read.scale_kind:
            resid = resid - resid.mean(-1, keepdim=True)
        z = torch.stack([got[f"z{l}"] for l in read.head_layers], dim=1) if read.head_layers else None
        for branch, f in folded.items():
            if z is None:
                a = torch.zeros(len(last), 0)
            else:
                a = torch.einsum("blhd,lhd->blh", z.float(), f.float()).flatten(1)
            attributions[branch].append((a / scale if divide_by_scale else a).cpu())
            pre[branch].append(((resid / scale) @ read.directions[branch].float() + read.bias[branch]).cpu())
    return ({b: torch.cat(v) for b, v in attributions.items()}, {b: torch.cat(v) for b, v in pre.items()})


def _pad_id(view: ModelView) -> int:
    """Any id works (right padding is never seen by the positions that are read); prefer the pad token."""
    tok = view.tokenizer
    if tok is None:
        return 0
    for candidate in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


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
        for h in range(view.n_heads):
            labels.append(head_label(l, h))
            parts.append(got[f"z{l}"][:, h] @ w_o[l, h].float())
        labels.append(f"L{l}.b_O")
        b_o = _optional_bias(view.model, "b_O", l, view.d_model, w_o)
        parts.append(b_o.float().expand_as(got["embed"]))
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
        tokens, last = pad_batch(chunk, _pad_id(view))
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
    group = view.n_heads // view.n_kv_heads
    for r0 in range(0, len(rows), batch_size):
        chunk = rows[r0:r0 + batch_size]
        tokens, last = pad_batch([prompts[p] for p, _ in chunk], _pad_id(view))
        idx = torch.arange(len(chunk))
        ablate: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for i, (_, j) in enumerate(chunk):
            if j is not None:
                ablate[heads[j][0]].append((i, heads[j][1]))
        got: dict[str, torch.Tensor] = {}

        def ablate_hook(layer):
            def hook(x, hook):
                for i, h in ablate[layer]:
                    if mode == "v":
                        x[i, :, h // group] = 0.0
                    elif mode == "mean":
                        x[i, :, h] = mean_z[layer][h].to(x)
                    else:
                        x[i, :, h] = 0.0
                return x
            return hook

        def save_act(x, hook):
            got["act"] = x[idx, last.to(x.device)].detach().float()

        kind = "v" if mode == "v" else "z"
        hooks = [(view.hook_name(kind, l), ablate_hook(l)) for l in ablate]
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
                   mean_z: dict[int, torch.Tensor] | None = None) -> tuple[list[HeadRecord], dict, dict]:
    """Attribution, active heads, relevance band and ablation for one unit; returns its head records, the
    per-prompt matrices (for `attributions.safetensors`) and its summary line."""
    rule = parse_rule(cfg.rule)
    a_train, pre_train = attribute_prompts(view, read, train, cfg.batch_size, cfg.divide_by_scale)
    a_test, _ = attribute_prompts(view, read, test, cfg.batch_size, cfg.divide_by_scale) if test else ({}, {})
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
            [c.rank for c in train], [c.rank for c in test], cfg, mean_z)
        summary["control"] = unit.control
        records += recs
        matrices.update(mats)
        per_unit.append(summary)
    write_jsonl(ctx.path("heads.jsonl"), records)
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
