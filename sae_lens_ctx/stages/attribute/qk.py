"""Why the head attended there: the exact query × key split of a look-up's attention score (`docs/qk.md`).

For head `h` of layer `l`, query position `T` (the prompt's last) and key position `s`, the score the
softmax sees is `softcap(scaling · rot_T(q_T) · rot_s(k_s))`. Attention reads `resid_pre[l]` through `ln1`
(sequential, parallel and sandwich blocks alike), and `resid_pre[l]` is a sum of components: the token
embedding (`embed`), the learned positional embedding (`pos_embed`, where the model has one), each earlier
head's output (`L{l'}H{h'}`: `z · W_O`, in a sandwich block through the post-attention norm's gain and scale),
each earlier MLP's output (`L{l'}MLP`) and the constant (attention output biases; `const` also takes the
query/key biases and the norm bias through `W_Q`/`W_K`). With each position's norm scale frozen (as the OV
side, `direct.py`, freezes the unit's), `q_T` and `k_s` are sums over components, the rotary rotation is
linear at each position, and so the pre-softcap logit

    logit(T, s) = scaling · Σ_i Σ_j rot_T(q_i(T)) · rot_s(k_j(s))

is a query-component × key-component table that sums to it exactly. Under grouped-query attention `k` is
the head's KV group's. The *gap* `logit(T, s) − Σ_t pattern[T, t] · logit(T, t)` (the score at `s` against
the attention-weighted mean over every position the query sees: what moves the softmax weight onto `s`)
splits the same way, with `k_j(s)` replaced by `k_j(s) − Σ_t pattern[T, t] k_j(t)`.

Gemma 2's soft-capping `c · tanh(x / c)` comes after the bilinear logit; the split is of the logit, and the
hooked score is inverted (`c · atanh(score / c)`) to check it. QK-norm (normalising q and k per head after
the projection) leaves nothing bilinear: such models get `status` 'not_splittable' with the reason, never a
number. Every split is checked against the hooked score; one that misses it is recorded as not splittable.

Cost: one forward per batch of prompts (hooks only: `hook_z` and `hook_mlp_out` of the layers before the
deepest head, the embeddings, and `ln1`'s scale, the attention row of `T` and the rotary tables at the heads'
layers; no activation cache), then per (batch of prompts, layer, KV group) one projection of every component
onto the key space, with each earlier head's `W_O` folded into `W_K` once per run; per (prompt, head) the tables
of all its looked-up positions in one product.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...core.errors import UserError
from ...core.lookups import LookupRecord, QkRecord
from ...inputs.tokens import token_strings
from ...inputs.view import AttnRead, ModelView, length_batches, optional_bias, pad_batch, pad_id

from .direct import TOKENS_PER_BATCH

SINK_REASON = ("position 0: heads park the attention they do not use there (an attention sink); its split says "
               "why the sink, not why a context token was looked up")
ONE_POSITION_REASON = "the prompt as run has one position: the query can only attend to itself, so the gap is 0"
MASKED_REASON = "the query does not see this position (a sliding-window layer): there is no score to split"


def head_of(label: str) -> tuple[int, int]:
    layer, head = label[1:].split("H")
    return int(layer), int(head)


@dataclass
class QkSplit:
    """One (prompt, head, key position): the tables and the hooked values they reproduce."""

    query: list[str]
    """Query-side component labels (rows)."""
    key: list[str]
    """Key-side component labels (columns; the same list)."""
    score: torch.Tensor | None
    """`[n_query, n_key]`: sums to `logit`."""
    gap: torch.Tensor | None
    """`[n_query, n_key]`: sums to `gap_value`."""
    hooked_score: float | None
    logit: float | None
    gap_value: float | None
    attention: float
    status: str = "ok"
    reason: str | None = None
    reads: dict[str, tuple[int, float]] | None = None
    """For the earlier heads among the leading key components: the position each attended to most from `s`
    (what it wrote there came from there), and that attention."""


CHUNK_FLOATS = 1 << 26
"""The most floats one key tensor of a layer's split may hold (`[rows, components, positions, d_head]`: 256 MB in
fp32); a batch's rows are split at a layer in chunks under it (the embedded main job's batches fit in one)."""

READS_TOP = 8
"""Leading key components (by |gap|) whose earlier heads get `QkSplit.reads`."""


class QkSplitter:
    """The QK split for one model. Building it refuses (a `UserError`, one line) a model whose attention the view
    does not know; a known model that is not bilinear (QK-norm) gets every split recorded as not splittable."""

    def __init__(self, view: ModelView):
        problem = view.qk_problem()
        if problem:
            raise UserError(f"attribute.qk: the attention scores of {view.name} cannot be split ({problem}); "
                            "set attribute.qk=false")
        self.view = view
        self.unsplittable = view.qk_unsplittable()
        self.ln = view.normalization == "LN"
        self.standard_pos = getattr(view.model.cfg, "positional_embedding_type", "standard") == "standard" \
            and view.hook_exists("hook_pos_embed")
        self.rot_hooks = view.hook_exists(view.hook_name("rot_cos", 0))
        """The Bridge's rotary cos/sin hooks are there (else TransformerLens's own `rotary_cos`/`rotary_sin`)."""
        self._attn: dict[int, AttnRead] = {}
        self._w_o_stack: dict[int, torch.Tensor] = {}
        self._folds: dict[tuple[int, int], torch.Tensor] = {}
        self._w_o: dict[int, torch.Tensor] = {}
        self._b_o: dict[int, torch.Tensor] = {}

    # -- weights, once per run -------------------------------------------------------------------

    def read(self, layer: int) -> AttnRead:
        """The layer's `AttnRead` in fp32, `W_Q`/`W_K` centred over d_model for LayerNorm (the norm's centring
        of the input then needs no centring of the components)."""
        if layer not in self._attn:
            r = self.view.attn_read(layer)
            w_q, w_k = r.w_q.float(), r.w_k.float()
            if self.ln:
                w_q, w_k = w_q - w_q.mean(1, keepdim=True), w_k - w_k.mean(1, keepdim=True)
            self._attn[layer] = AttnRead(w_q, r.b_q.float(), w_k, r.b_k.float(), r.scaling, r.softcap, r.rotary)
        return self._attn[layer]

    def w_o(self, layer: int) -> torch.Tensor:
        """`[n_heads, d_head, d_model]`: `W_O` with the post-attention gain of a sandwich block."""
        if layer not in self._w_o:
            self._w_o[layer] = self.view.post_gain(self.view.stacked("W_O")[layer], layer, "ln1_post").float()
        return self._w_o[layer]

    def b_o(self, layer: int) -> torch.Tensor:
        if layer not in self._b_o:
            w = self.view.stacked("W_O")
            b = optional_bias(self.view.model, "b_O", layer, self.view.d_model, w)
            self._b_o[layer] = self.view.post_gain(b, layer, "ln1_post").float()
        return self._b_o[layer]

    def fold(self, layer: int, group: int) -> torch.Tensor:
        """`[layer, n_heads, d_head, d_head]`: each earlier head's `W_O` times the KV group's key read."""
        key = (layer, group)
        if key not in self._folds:
            w_k = self.read(layer).w_k[group]
            self._folds[key] = torch.stack([self.w_o(l) @ w_k for l in range(layer)]) if layer \
                else torch.zeros(0, self.view.n_heads, self.view.d_head, w_k.shape[1], device=w_k.device)
        return self._folds[key]

    def labels(self, layer: int) -> list[str]:
        """Component labels of `resid_pre[layer]` (both sides), `const` last."""
        out = ["embed"] + (["pos_embed"] if self.standard_pos else [])
        for l in range(layer):
            out += [f"L{l}H{h}" for h in range(self.view.n_heads)] + [f"L{l}MLP"]
        return out + ["const"]

    # -- the split -------------------------------------------------------------------------------

    @torch.inference_mode()
    def split(self, prompts: Sequence[Sequence[int]], wanted: dict[int, dict[tuple[int, int], set[int]]],
              batch_size: int = 32) -> dict[tuple[int, int, int, int], QkSplit]:
        """`wanted`: prompt index → (layer, head) → key positions. Returns (prompt index, layer, head, position)
        → its `QkSplit`, in batched forwards of prompts of similar length (`inputs.view.length_batches`, at least
        `batch_size` prompts a batch)."""
        out: dict[tuple[int, int, int, int], QkSplit] = {}
        order = [p for p in range(len(prompts)) if wanted.get(p)]
        for picked in length_batches([len(prompts[p]) for p in order], batch_size * TOKENS_PER_BATCH, batch_size):
            batch = [order[i] for i in sorted(picked)]
            layers = sorted({l for p in batch for (l, _) in wanted[p]})
            got = self._forward([list(prompts[p]) for p in batch], layers)
            width = max(len(prompts[p]) for p in batch)
            for l in layers:  # the rows that need a layer, computed together (in chunks under CHUNK_FLOATS)
                rows = [(j, len(prompts[p]), {h: pos for (ll, h), pos in wanted[p].items() if ll == l})
                        for j, p in enumerate(batch) if any(ll == l for ll, _ in wanted[p])]
                step = max(1, CHUNK_FLOATS // (len(self.labels(l)) * width * self.view.d_head))
                for c in range(0, len(rows), step):
                    for (j, _, _), found in zip(rows[c:c + step], self._split_layer(got, rows[c:c + step], l)):
                        out.update({(batch[j], l, h, s): v for (h, s), v in found.items()})
        return out

    def _forward(self, rows: list[list[int]], layers: list[int]) -> dict[str, torch.Tensor]:
        view = self.view
        tokens = pad_batch(rows, pad_id(view.tokenizer))
        last = torch.tensor([len(r) - 1 for r in rows])
        idx = torch.arange(len(rows))
        got: dict[str, torch.Tensor] = {}

        def save(key):
            return lambda x, hook: got.__setitem__(key, x.detach().float())

        def save_row(key):  # [batch, head, key] at each row's last query position
            return lambda x, hook: got.__setitem__(key, x[idx, :, last.to(x.device)].detach().float())

        top = max(layers)
        hooks = [(view.hook_name("resid_pre", 0), save("resid0"))]
        if self.standard_pos:
            hooks.append(("hook_pos_embed", save("pos")))
        for l in range(top):
            hooks += [(view.hook_name("z", l), save(f"z{l}")), (view.hook_name("mlp_out", l), save(f"mlp{l}")),
                      (view.hook_name("pattern", l), save(f"pat{l}"))]
            if view.sandwich:
                hooks.append((view.hook_name("ln1_post_scale", l), save(f"post{l}")))
        for l in layers:
            hooks += [(view.hook_name("ln1_scale", l), save(f"scale{l}")),
                      (view.hook_name("attn_scores", l), save_row(f"scores{l}")),
                      (view.hook_name("pattern", l), save_row(f"pattern{l}"))]
            if self.read(l).rotary and self.rot_hooks:
                hooks += [(view.hook_name("rot_cos", l), save(f"cos{l}")), (view.hook_name("rot_sin", l), save(f"sin{l}"))]
        view.run_with_hooks(tokens, hooks, stop_at_layer=top + 1)  # one name-filter hook (ModelView._by_filter)
        return got

    def _rotate(self, got: dict, js: torch.Tensor, layer: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`x` `[R, ..., P, d_head]` of batch rows `js` `[R]`, rotated at `positions` `[R, P]` (identity without
        rotary)."""
        if not self.read(layer).rotary:
            return x
        attn = self.view.model.blocks[layer].attn
        if f"cos{layer}" in got:  # the Bridge: the Hugging Face module's tables, rotate-half convention
            cos, sin = got[f"cos{layer}"], got[f"sin{layer}"]
            rows = js.clamp(max=cos.shape[0] - 1)[:, None]
            cos, sin = cos[rows, positions], sin[rows, positions]
            r = cos.shape[-1]
            x_r = x[..., :r]
            half = r // 2
            flipped = torch.cat([-x_r[..., half:], x_r[..., :half]], dim=-1)
        else:  # TransformerLens's own attention: its tables and its rotation (adjacent pairs or halves)
            cos, sin = attn.rotary_cos[positions].float(), attn.rotary_sin[positions].float()
            r = cos.shape[-1]
            x_r = x[..., :r]
            flipped = attn.rotate_every_two(x_r)
        shape = (cos.shape[0],) + (1,) * (x.dim() - 3) + cos.shape[1:]  # [R, 1.., P, r]
        cos, sin = cos.reshape(shape), sin.reshape(shape)
        return torch.cat([x_r * cos + flipped * sin, x[..., r:]], dim=-1)

    def w_o_stack(self, layer: int) -> torch.Tensor:
        """`[layer, n_heads, d_head, d_model]`: `w_o` of every earlier layer."""
        if layer not in self._w_o_stack:
            v = self.view
            self._w_o_stack[layer] = torch.stack([self.w_o(l) for l in range(layer)]) if layer else \
                torch.zeros(0, v.n_heads, v.d_head, v.d_model, device=v.device)
        return self._w_o_stack[layer]

    def _components(self, got: dict, js: torch.Tensor, width: int, layer: int) -> tuple[torch.Tensor, ...]:
        """The residual-stream components of `resid_pre[layer]` of batch rows `js` `[R]` at their first `width`
        positions, the heads kept as their `z`: (`lead` `[embed (, pos_embed)]` `[R, c, width, d_model]`; `mlp`
        `[R, layer, width, d_model]`; `z` `[R, layer, width, H, d_head]`; each layer's post-attention scale
        `[R, layer, width, 1]` (ones outside a sandwich block); the constant `[R, width, d_model]`)."""
        v = self.view
        R = len(js)
        resid0 = got["resid0"][js, :width]
        lead = torch.stack([resid0 - got["pos"][js, :width], got["pos"][js, :width]] if self.standard_pos
                           else [resid0], dim=1)
        if not layer:
            return (lead, resid0.new_zeros(R, 0, width, v.d_model), resid0.new_zeros(R, 0, width, v.n_heads, v.d_head),
                    resid0.new_ones(R, 0, width, 1), torch.zeros_like(resid0))
        mlp = torch.stack([got[f"mlp{l}"][js, :width] for l in range(layer)], dim=1)
        z = torch.stack([got[f"z{l}"][js, :width] for l in range(layer)], dim=1)
        post = torch.stack([got[f"post{l}"][js, :width].reshape(R, width, 1) for l in range(layer)], dim=1) \
            if v.sandwich else resid0.new_ones(R, layer, width, 1)
        b_o = torch.stack([self.b_o(l).to(resid0) for l in range(layer)])  # [layer, d_model]
        const = (b_o[None, :, None, :] / post).sum(1)
        return lead, mlp, z, post, const

    def _split_layer(self, got: dict, rows: list[tuple[int, int, dict[int, set[int]]]], layer: int) -> list[dict]:
        """The splits at one layer of batch rows (row `j`, its length `n`, head → key positions): per row,
        (head, position) → `QkSplit`. The components, queries and keys of the rows are computed together."""
        read = self.read(layer)
        labels = self.labels(layer)
        if self.unsplittable:
            return [{(h, s): QkSplit(labels, labels, None, None, _finite(got[f"scores{layer}"][j, h, s]), None, None,
                                     float(got[f"pattern{layer}"][j, h, s]), "not_splittable", self.unsplittable)
                     for h, positions in heads.items() for s in positions} for j, _, heads in rows]
        device = got["resid0"].device  # every index on the hooked tensors' device
        js = torch.tensor([j for j, _, _ in rows], device=device)
        last = torch.tensor([n - 1 for _, n, _ in rows], device=device)
        width = int(last.max()) + 1
        R = len(rows)
        at_last = (torch.arange(R, device=device), slice(None), last)  # each row's query position T
        scale = got[f"scale{layer}"][js, :width].reshape(R, width, 1)
        lead, mlp, z, post, const = self._components(got, js, width, layer)
        pos = torch.arange(width, device=device).expand(R, width)

        def ordered(lead_part, heads_part, mlp_part, const_part):
            """Labels' order (dim 1): lead, then per layer its heads and its MLP, then const. `lead_part`
            `[R, c, ...]`, `heads_part` `[R, L, H, ...]`, `mlp_part` `[R, L, ...]`, `const_part` `[R, ...]`."""
            per_layer = torch.cat([heads_part, mlp_part[:, :, None]], dim=2)
            return torch.cat([lead_part, per_layer.flatten(1, 2), const_part[:, None]], dim=1)

        # query side at T: every component in d_model ([R, C, d_model]), then each head's W_Q
        q_heads = torch.einsum("rlhd,lhdm->rlhm", z[at_last], self.w_o_stack(layer)) / post[at_last][..., None]
        q_res = ordered(lead[at_last], q_heads, mlp[at_last], const[at_last[0], last]) \
            / scale[at_last[0], last][:, None]
        keys: dict[int, tuple[list[int], torch.Tensor]] = {}
        for g in sorted({self._group(read, h) for _, _, heads in rows for h in heads}):
            # key side at every position of the rows whose heads read KV group g: [R_g, C, width, d_head], rotated
            sub = [i for i, (_, _, heads) in enumerate(rows) if any(self._group(read, h) == g for h in heads)]
            w_k, ix = read.w_k[g], torch.tensor(sub, device=device)
            k_heads = torch.einsum("rlthd,lhde->rlhte", z[ix], self.fold(layer, g)) / post[ix][:, :, None]
            k = ordered(lead[ix] @ w_k, k_heads, mlp[ix] @ w_k, const[ix] @ w_k) / scale[ix][:, None]
            k[:, -1] = k[:, -1] + read.b_k[g]
            keys[g] = (sub, self._rotate(got, js[ix], layer, k, pos[ix]))
        out = []
        for i, (j, n, heads) in enumerate(rows):
            scores = got[f"scores{layer}"][j, :, :n]  # [H, n]
            pattern = got[f"pattern{layer}"][j, :, :n]
            results: dict[tuple[int, int], QkSplit] = {}
            for h, positions in heads.items():
                sub, k_all = keys[self._group(read, h)]
                k = k_all[sub.index(i), :, :n]
                q = q_res[i] @ read.w_q[h]
                q[-1] = q[-1] + read.b_q[h]
                q = self._rotate(got, js[i:i + 1], layer, q[None, :, None, :], last[i:i + 1, None])[0, :, 0]
                row = scores[h]
                seen = torch.isfinite(row) & (row > -1e30)
                logits = _uncap(row, read.softcap)
                weights = pattern[h] * seen
                mean_k = torch.einsum("t,ctd->cd", weights, k)
                mean_logit = float((weights * torch.where(seen, logits, 0.0)).sum())
                order = sorted(positions)
                at = torch.tensor(order, device=k.device)
                # every looked-up position of the head at once: [m, n_query, n_key]
                score_all = (read.scaling * torch.einsum("id,jsd->sij", q, k[:, at])).contiguous()
                gap_all = (read.scaling * torch.einsum("id,jsd->sij", q, k[:, at] - mean_k[:, None])).contiguous()
                sums, sizes = score_all.sum((1, 2)).tolist(), score_all.abs().sum((1, 2)).tolist()
                reads = _reads_of(got, j, labels, gap_all, order)
                for m, s in enumerate(order):
                    logit = float(logits[s])
                    status, reason = _status(bool(seen[s]), n, s, logit, sums[m], sizes[m], read.softcap)
                    hooked, attention = _finite(row[s]), float(pattern[h, s])
                    if status in ("masked", "not_splittable"):
                        results[(h, s)] = QkSplit(labels, labels, None, None, hooked, None, None, attention, status,
                                                  reason)
                    else:
                        results[(h, s)] = QkSplit(labels, labels, score_all[m], gap_all[m], hooked, logit,
                                                  logit - mean_logit, attention, status, reason, reads[m])
            out.append(results)
        return out

    @staticmethod
    def _group(read: AttnRead, h: int) -> int:
        """Head `h`'s KV group (itself without grouped-query attention)."""
        return read.kv_group(h) if read.w_k.shape[0] != read.w_q.shape[0] else h


def _status(seen: bool, n: int, s: int, logit: float, total: float, size: float,
            softcap: float | None) -> tuple[str, str | None]:
    """(status, reason) of the split of key position `s` of an `n`-position prompt: 'masked' (the query does not
    see `s`), 'not_splittable' (a softcap that cannot be inverted at this score, or a table summing to `total`
    that misses the hooked `logit` by more than 1e-3 of `size`, the table's summed magnitude), 'one_position',
    'first_position' (an attention sink), else 'ok'."""
    if not seen:
        return "masked", MASKED_REASON
    if not math.isfinite(logit):
        return "not_splittable", f"the softcap {softcap} cannot be inverted at this score"
    miss = abs(total - logit)
    if miss > 1e-3 * max(1.0, size):
        return "not_splittable", (f"the split misses the hooked score by {miss:.3g}: this attention computes "
                                  "something the view does not know")
    if n == 1:
        return "one_position", ONE_POSITION_REASON
    return ("first_position", SINK_REASON) if s == 0 else ("ok", None)


def _reads_of(got: dict, j: int, labels: list[str], gap: torch.Tensor,
              positions: list[int]) -> list[dict[str, tuple[int, float]]]:
    """`QkSplit.reads` of each key position in `positions` (`gap` `[len(positions), n_query, n_key]`): for each
    earlier head among the `READS_TOP` leading key components (by |gap|), the position it attended to most from
    that key position and that attention (its hooked pattern, row `s`)."""
    leading = torch.topk(gap.sum(1).abs(), min(READS_TOP, len(labels)), dim=1).indices.tolist()
    out = []
    for s, top in zip(positions, leading):
        reads = {}
        for i in top:
            if labels[i].startswith("L") and "H" in labels[i]:
                l, h = head_of(labels[i])
                row = got[f"pat{l}"][j, h, s, :s + 1]
                p = int(row.argmax())
                reads[labels[i]] = (p, float(row[p]))
        out.append(reads)
    return out


def _finite(x: torch.Tensor) -> float | None:
    v = float(x)
    return v if math.isfinite(v) and v > -1e30 else None


def _uncap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    """The logit before soft-capping: `c · atanh(score / c)` (inf where the cap saturates), the score without one."""
    if cap is None:
        return scores
    return cap * torch.atanh((scores / cap).clamp(-1.0, 1.0))


# -- records ------------------------------------------------------------------------------------


def _f(x) -> float:
    """A number as `qk.jsonl` stores it: 7 significant digits (float32's precision; the file stays small)."""
    return float(f"{float(x):.7g}")


def _share(value: float, total: float | None) -> float | None:
    return _f(value / total) if total is not None and abs(total) > 1e-12 else None


def _marginal(labels: list[str], score: torch.Tensor, gap: torch.Tensor, logit: float, gap_value: float,
              top: int) -> list[dict]:
    """Per component (summed over the other side): `component`, `score`, `score_share`, `gap`, `gap_share`; the
    `top` largest by |gap| (by |score| where the gap is 0), then 'other' with the rest, so the list sums to the totals."""
    key = gap if bool(gap.any()) else score
    order = torch.sort(-key.abs(), stable=True).indices  # by |key|, ties in label order
    lead = order[:top]
    score_l, gap_l = score[lead].tolist(), gap[lead].tolist()
    rows = [{"component": labels[i], "score": _f(sc), "score_share": _share(sc, logit), "gap": _f(g),
             "gap_share": _share(g, gap_value)} for i, sc, g in zip(lead.tolist(), score_l, gap_l)]
    rest = order[top:]
    if len(rest):
        s, g = float(score[rest].sum()), float(gap[rest].sum())
        rows.append({"component": "other", "n": len(rest), "score": _f(s), "score_share": _share(s, logit),
                     "gap": _f(g), "gap_share": _share(g, gap_value)})
    return rows


def _grid(split: QkSplit, query: list[dict], key: list[dict]) -> dict:
    """The tables summed over the marginals' groups (their components, then 'other'): a small heatmap."""
    where = {c: i for i, c in enumerate(split.query)}

    def groups(rows) -> torch.Tensor:
        """`[n_groups, n_components]` one-hot: each named component, then 'other' (the rest)."""
        named = torch.tensor([where[r["component"]] for r in rows if r["component"] != "other"], dtype=torch.long)
        onehot = torch.zeros(len(named) + 1, len(split.query))
        onehot[torch.arange(len(named)), named] = 1.0
        onehot[-1] = 1.0
        onehot[-1, named] = 0.0
        return onehot if len(named) < len(split.query) else onehot[:-1]

    gq, gk = groups(query), groups(key)
    out = {"query": [r["component"] for r in query], "key": [r["component"] for r in key]}
    for name, table in (("score", split.score), ("gap", split.gap)):
        out[name] = [[_f(v) for v in row] for row in (gq @ table.float() @ gk.T).tolist()]
    return out


def _top_pairs(split: QkSplit, top: int) -> list[dict]:
    flat = split.gap.flatten() if float(split.gap.abs().sum()) > 0 else split.score.flatten()
    k = min(top, flat.numel())
    idx = torch.topk(flat.abs(), k).indices
    n = split.gap.shape[1]
    score, gap = split.score.flatten()[idx].tolist(), split.gap.flatten()[idx].tolist()
    return [{"query": split.query[i // n], "key": split.key[i % n], "score": _f(sc), "gap": _f(g)}
            for i, sc, g in zip(idx.tolist(), score, gap)]


def qk_records(splitter: QkSplitter, lookups: Sequence[LookupRecord], prompts: dict[tuple[str, str, int], list[int]],
               tokenizer, n_sources: int, n_components: int, batch_size: int = 32) -> list[QkRecord]:
    """A `QkRecord` per look-up record and each of its first `n_sources` sources (the top looked-up positions).
    `prompts`: (unit_id, split, rank) → the prompt as run (BOS included), as the look-up records index it. The
    records may come from many units: a prompt several of them share is run once."""
    def key_of(r: LookupRecord) -> tuple[str, str, int]:
        return (r.unit_id, r.split, r.rank)

    index: dict[tuple[int, ...], int] = {}
    for r in lookups:
        index.setdefault(tuple(prompts[key_of(r)]), len(index))
    wanted: dict[int, dict[tuple[int, int], set[int]]] = defaultdict(lambda: defaultdict(set))
    for r in lookups:
        for src in r.sources[:n_sources]:
            wanted[index[tuple(prompts[key_of(r)])]][head_of(r.head)].add(src["position"])
    splits = splitter.split([list(t) for t in index], wanted, batch_size)
    records = []
    texts: dict[int, list[str]] = {}  # prompt index → its token strings (a prompt has a record per relevant head)
    for r in lookups:
        tokens = prompts[key_of(r)]
        prompt = index[tuple(tokens)]
        text = texts[prompt] if prompt in texts else texts.setdefault(prompt, token_strings(tokenizer, tokens))
        layer, head = head_of(r.head)
        for src in r.sources[:n_sources]:
            s = src["position"]
            sp = splits[(prompt, layer, head, s)]
            common = dict(unit_id=r.unit_id, head=r.head, split=r.split, rank=r.rank, active=r.active,
                          position=s, token_id=int(tokens[s]), token=text[s], query_position=len(tokens) - 1,
                          attention=sp.attention, contribution=float(src["contribution"]), score=sp.hooked_score,
                          softcap=splitter.read(layer).softcap, n_components=len(sp.query), status=sp.status,
                          reason=sp.reason)
            if sp.score is None:
                records.append(QkRecord(**common))
                continue
            key = _marginal(sp.key, sp.score.sum(0), sp.gap.sum(0), sp.logit, sp.gap_value, n_components)
            for e in key:
                if e["component"] in (sp.reads or {}):
                    p, a = sp.reads[e["component"]]
                    e.update(reads_position=p, reads_token=text[p], reads_attention=_f(a))
            query = _marginal(sp.query, sp.score.sum(1), sp.gap.sum(1), sp.logit, sp.gap_value, n_components)
            small = max(2, n_components // 2)
            records.append(QkRecord(**common, logit=sp.logit, gap=sp.gap_value, key=key, query=query,
                                    pairs=_top_pairs(sp, n_components),
                                    grid=_grid(sp, query[:small] + ([{"component": "other"}] if len(query) > small else []),
                                               key[:small] + ([{"component": "other"}] if len(key) > small else []))))
    return records
