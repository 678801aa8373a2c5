"""Exact direct attribution of a unit's pre-activation to upstream heads (the module doc of the stage gives
the formula), its exact decomposition, and the per-source split of each head's part (look-ups, `core/lookups.py`)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ...core.config import AttributeConfig
from ...core.errors import UserError
from ...core.records import UnitRecord
from ...core.lookups import SINK_SHARE, LookupRecord
from ...inputs.tokens import token_strings
from ...inputs.view import ModelView, length_batches, optional_bias, pad_batch, pad_id
from ...inputs.sae import SaeSource


log = logging.getLogger(__name__)


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


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
    w_o = torch.stack([view.post_gain(view.stacked("W_O")[l], l, "ln1_post") for l in read.head_layers])
    return {b: torch.einsum("lhdm,m->lhd", w_o, d) for b, d in read.directions.items()}


def _post_scale_hooks(view: ModelView, layers: list[int], save) -> list:
    """Hooks on the post-attention norm scale of each of `layers` (sandwich blocks only), saved as `post{l}`."""
    return [(view.hook_name("ln1_post_scale", l), save(f"post{l}")) for l in layers] if view.sandwich else []


def pad_prompts(prompts: list[list[int]], view: ModelView) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `[B, max_len]` token ids (`inputs.model.pad_batch`) and each row's last position `[B]`."""
    return pad_batch(prompts, pad_id(view.tokenizer)), torch.tensor([len(p) - 1 for p in prompts])


TOKENS_PER_BATCH = 64
"""Attribution, ablation and occlusion batches hold at most `attribute.batch_size × TOKENS_PER_BATCH` padded tokens (and
at least `batch_size` rows): their rows are trimmed prompts, mostly short, so a batch holds more of them
than of the stage's other forwards at the same memory."""


def unit_layer(read: UnitRead) -> int:
    """The layer whose block computes the unit (a neuron's MLP, an SAE's hook)."""
    return read.unit.layer if read.sae is None else read.sae.layer


def activation_hook(view: ModelView, read: UnitRead) -> str:
    """The hook whose output holds the unit's activation (neurons: `mlp_post`; SAE latents: the SAE's hook)."""
    return view.hook_name("mlp_post", read.unit.layer) if read.sae is None else read.sae.hook_name


def unit_activation(read: UnitRead, hooked: torch.Tensor) -> torch.Tensor:
    """`[rows]` the unit's activation from its hook's output at each row's last position (neurons: `mlp_post`;
    SAE latents: the SAE's encoding of its hook)."""
    if read.sae is None:
        return hooked[:, read.unit.index].float().cpu()
    sae = read.sae
    x = hooked.flatten(-2) if sae.hook_kind == "attn.hook_z" else hooked
    return sae.sae.encode(x.to(sae.sae.W_enc)).detach()[:, read.unit.index].float().cpu()


@torch.inference_mode()
def attribute_prompts(view: ModelView, read: UnitRead, prompts: list[list[int]], batch_size: int = 32,
                      divide_by_scale: bool = True, sources: dict[str, torch.Tensor] | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per branch: `[n_prompts, n_upstream_heads]` attributions, and `[n_prompts]` pre-activations.

    Given a dict `sources`, the same forward also hooks `hook_pattern` (the last position's row) and
    `hook_v` and fills it with the exact per-source split of every attribution (`lookups.py`):
    'attention' and, per branch, the contributions, each `[n_prompts, n_upstream_heads, longest prompt]`
    (zero past a prompt's end); a branch's contributions sum over the last axis to its attributions.
    One unit's `attribute_jobs`."""
    (a, pre, src), = attribute_jobs(view, [(read, prompts)], batch_size, divide_by_scale, sources is not None)
    if sources is not None:
        sources.update(src)
    return a, pre


@torch.inference_mode()
def attribute_jobs(view: ModelView, jobs: Sequence[tuple[UnitRead, Sequence[list[int]]]], batch_size: int = 32,
                   divide_by_scale: bool = True, sources: bool = False
                   ) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor] | None]]:
    """`attribute_prompts` for many (unit read, prompts) jobs at once (#28): every (job, prompt) row is one
    batch row, rows of similar length share a forward (`inputs.view.length_batches`, as many rows as `TOKENS_PER_BATCH`
    allows, at least `batch_size`), and one forward hooks each layer once for every unit in it; each unit's read is then a matmul over
    its rows' hooked `z`. Per job, in its prompts' order: (attributions, pre-activations, sources or None),
    as `attribute_prompts` returns them. A row's numbers do not depend on the other units of its batch
    beyond fp32 round-off (a batch's shape moves matmuls' last bits); one config always batches alike."""
    rows = [(j, p) for j, (_, prompts) in enumerate(jobs) for p in range(len(prompts))]
    by_read: dict[int, dict[str, torch.Tensor]] = {}  # a unit's train and test jobs share its read
    for read, _ in jobs:
        if id(read) not in by_read:
            by_read[id(read)] = folded_heads(view, read)
    folded = [by_read[id(read)] for read, _ in jobs]
    out_a: list[dict[str, dict[int, torch.Tensor]]] = [defaultdict(dict) for _ in jobs]
    out_pre: list[dict[str, dict[int, torch.Tensor]]] = [defaultdict(dict) for _ in jobs]
    out_src: list[dict[str, dict[int, torch.Tensor]]] = [defaultdict(dict) for _ in jobs]
    lengths = [len(jobs[j][1][p]) for j, p in rows]
    for batch in length_batches(lengths, batch_size * TOKENS_PER_BATCH, batch_size):
        chunk = [rows[r] for r in batch]
        tokens, last = pad_prompts([jobs[j][1][p] for j, p in chunk], view)
        index = torch.arange(len(last))
        got: dict[str, torch.Tensor] = {}

        def save(key):
            def hook(x, hook):
                got[key] = x[index, last.to(x.device)].detach()
            return hook

        reads = {j: jobs[j][0] for j, _ in chunk}
        head_layers = sorted({l for r in reads.values() for l in r.head_layers})
        hooks = [(view.hook_name("z", l), save(f"z{l}")) for l in head_layers]
        hooks += _post_scale_hooks(view, head_layers, save)
        if sources:
            for l in head_layers:
                hooks.append((view.hook_name("pattern", l), lambda x, hook, l=l: got.__setitem__(
                    f"pattern{l}", x[index, :, last.to(x.device)].detach())))  # [batch, head, key] at T
                hooks.append((view.hook_name("v", l), lambda x, hook, l=l: got.__setitem__(f"v{l}", x.detach())))
        reads_at = {(r.resid_kind, unit_layer(r)) for r in reads.values()}
        reads_at |= {(r.scale_kind, unit_layer(r)) for r in reads.values() if r.scale_kind}
        hooks += [(view.hook_name(kind, layer), save(f"{kind}{layer}")) for kind, layer in sorted(reads_at)]
        view.run_with_hooks(tokens, hooks, stop_at_layer=max(unit_layer(r) for r in reads.values()) + 1)
        for j, read in reads.items():
            mine = [i for i, (jj, _) in enumerate(chunk) if jj == j]
            a, pre, src = _unit_rows(view, read, folded[j], got, torch.tensor(mine), divide_by_scale, sources)
            for i, row in enumerate(mine):
                p = chunk[row][1]
                for b in a:
                    out_a[j][b][p], out_pre[j][b][p] = a[b][i], pre[b][i]
                for k, v in (src or {}).items():
                    out_src[j][k][p] = v[i]
    results = []
    for j, (read, prompts) in enumerate(jobs):
        n_heads = len(read.labels)
        a = {b: torch.stack([out_a[j][b][p] for p in range(len(prompts))]) if prompts else torch.zeros(0, n_heads)
             for b in read.directions}
        pre = {b: torch.stack([out_pre[j][b][p] for p in range(len(prompts))]) if prompts else torch.zeros(0)
               for b in read.directions}
        src = None
        if sources:
            width = max((len(p) for p in prompts), default=0)
            src = {k: torch.stack([_fit(out_src[j][k][p], width) for p in range(len(prompts))]) if prompts
                   else torch.zeros(0, n_heads, 0) for k in ["attention", *read.directions]}
        results.append((a, pre, src))
    return results


@torch.inference_mode()
def position_attributions(view: ModelView, jobs: Sequence[tuple[UnitRead, Sequence[list[int]], Sequence[int]]],
                          batch_size: int = 32, divide_by_scale: bool = True) -> list[list[torch.Tensor]]:
    """Per-position direct attribution (issue #26, heads per token): for each (unit read, prompts, head
    indices into `read.labels`) job, per prompt a `[len(prompt), len(heads)]` tensor whose row `t` is each
    head's `A[h]` to the unit's pre-activation at position `t` (rank branch): `z_h[t] · (W_O[h] @ read) /
    scale[t]`, the paper's quantity (§4.1) at every position instead of the last. Rows of many jobs share a
    forward, as in `attribute_jobs`."""
    rows = [(j, p) for j, (_, prompts, heads) in enumerate(jobs) if heads for p in range(len(prompts))]
    out: list[list[torch.Tensor]] = [[torch.zeros(len(p), len(heads)) for p in prompts] for _, prompts, heads in jobs]
    folded = {id(read): folded_heads(view, read)[read.rank_branch] for read, _, _ in jobs}
    lengths = [len(jobs[j][1][p]) for j, p in rows]
    for batch in length_batches(lengths, batch_size * TOKENS_PER_BATCH, batch_size):
        chunk = [rows[r] for r in batch]
        tokens, _ = pad_prompts([jobs[j][1][p] for j, p in chunk], view)
        got: dict[str, torch.Tensor] = {}

        def save(key):
            return lambda x, hook: got.__setitem__(key, x.detach())

        reads = {j: jobs[j][0] for j, _ in chunk}
        head_layers = sorted({l for r in reads.values() for l in r.head_layers})
        hooks = [(view.hook_name("z", l), save(f"z{l}")) for l in head_layers]
        hooks += _post_scale_hooks(view, head_layers, save)
        scales = {(r.scale_kind, unit_layer(r)) for r in reads.values() if r.scale_kind}
        hooks += [(view.hook_name(kind, layer), save(f"{kind}{layer}")) for kind, layer in sorted(scales)]
        view.run_with_hooks(tokens, hooks, stop_at_layer=max(unit_layer(r) for r in reads.values()) + 1)
        for j, read in reads.items():
            mine = torch.tensor([i for i, (jj, _) in enumerate(chunk) if jj == j])
            heads = list(jobs[j][2])
            z = torch.stack([got[f"z{l}"][mine] for l in read.head_layers], dim=2).float()  # [b, pos, L, H, d]
            if view.sandwich:
                post = torch.stack([got[f"post{l}"][mine].reshape(len(mine), -1) for l in read.head_layers], dim=2)
                z = z / post[..., None, None].float()
            a = torch.einsum("btlhd,lhd->btlh", z, folded[id(read)].float()).flatten(2)[..., heads]
            if divide_by_scale and read.scale_kind:
                a = a / got[f"{read.scale_kind}{unit_layer(read)}"][mine].reshape(len(mine), -1, 1).float()
            for i, row in enumerate(mine.tolist()):
                p = chunk[row][1]
                out[j][p] = a[i, :len(jobs[j][1][p])].cpu()
    return out


def _fit(x: torch.Tensor, width: int) -> torch.Tensor:
    """`x` `[..., w]` cut or zero-padded to `[..., width]` (what lies past a prompt's end is 0)."""
    return x[..., :width] if x.shape[-1] >= width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def _unit_rows(view: ModelView, read: UnitRead, folded: dict[str, torch.Tensor], got: dict[str, torch.Tensor],
               mine: torch.Tensor, divide_by_scale: bool, sources: bool):
    """One unit's attributions, pre-activations and (given `sources`) per-source split on its rows `mine` of a
    batch whose hooks `got` holds (`attribute_jobs`)."""
    layer = unit_layer(read)
    scale = got[f"{read.scale_kind}{layer}"][mine].reshape(-1, 1).float() if read.scale_kind \
        else torch.ones(len(mine), 1)
    resid = got[f"{read.resid_kind}{layer}"][mine].float()
    if view.normalization == "LN" and read.scale_kind:
        resid = resid - resid.mean(-1, keepdim=True)
    z = torch.stack([got[f"z{l}"][mine] for l in read.head_layers], dim=1) if read.head_layers else None
    if z is not None and view.sandwich:  # each layer's heads pass through its post-attention norm scale
        post = torch.stack([got[f"post{l}"][mine].reshape(-1) for l in read.head_layers], dim=1)
        z = z / post[:, :, None, None].to(z)
    a_out, pre_out, src = {}, {}, {} if sources else None
    for branch, f in folded.items():
        a = torch.einsum("blhd,lhd->blh", z.float(), f.float()).flatten(1) if z is not None \
            else torch.zeros(len(mine), 0)
        a_out[branch] = (a / scale if divide_by_scale else a).cpu()
        pre_out[branch] = ((resid / scale) @ read.directions[branch].float() + read.bias[branch]).cpu()
        if sources:
            c = torch.cat([source_contributions(got[f"pattern{l}"][mine], got[f"v{l}"][mine], f[i])
                           for i, l in enumerate(read.head_layers)], dim=1) if z is not None \
                else torch.zeros(len(mine), 0, 0)  # no upstream heads
            src[branch] = (c / scale[:, :, None] if divide_by_scale else c).cpu()
    if sources:
        src["attention"] = torch.cat([got[f"pattern{l}"][mine].float() for l in read.head_layers], dim=1).cpu() \
            if z is not None else torch.zeros(len(mine), 0, 0)
    return a_out, pre_out, src


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
    w_o = view.stacked("W_O")
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
