"""`ModelView`: one set of answers whatever the model object is (loading it: `inputs/model.py`).

Stages never touch a TransformerLens object directly. They ask a `ModelView` for hook names by layer
index, for the read and write directions of ARCHITECTURE §2 in one stated weight convention, for the
effective unembedding, and for a forward with hooks that can stop early. The view works over
`TransformerBridge` (TL's recommended API), `HookedTransformer` and `HookedSAETransformer`.

Weight conventions (recorded in `model.json` and the run config):

* ``folded``: TransformerLens's processing, as the paper used (`fold_ln`, `center_writing_weights`,
  `center_unembed`). A Bridge gets `enable_compatibility_mode()`; a HookedTransformer is loaded with
  its default processing.
* ``raw``: the checkpoint's own weights. The view applies the norm gains by hand, so every direction
  it returns means the same thing in both conventions; only the centring differs.

Either way a read direction is expressed on the *normalised input without gain* (`x / scale` for RMS,
`(x - mean) / scale` for LayerNorm), with the gain folded into the direction and the norm bias and
`b_in` folded into a constant. That makes `normalised_input @ read + const` equal the hooked
pre-activation exactly in both conventions.

Norm conventions are read from the model, never assumed (`ModelView.norm_gain`): Gemma-family
RMSNorms store their gain as an offset from one (the layer computes `x / rms · (1 + w)`; the Bridge
says so with `cfg.rmsnorm_uses_offset`, and its folding stores the identity as 0), so the effective
gain is `1 + w` there. Block layouts too: a *parallel* block (GPT-NeoX `use_parallel_residual`, Phi,
GPT-J; `cfg.parallel_attn_mlp`) feeds the MLP from `resid_pre` through its own norm (`ln2`) or the
one it shares with attention (`ln1`); a *sandwich* block (Gemma 2/3) normalises the attention and MLP
outputs (`ln1_post`, `ln2_post`) before adding them to the residual stream, so a head's or neuron's
write passes through that norm's gain (and, at run time, its scale). Every norm is checked once at
load on a probe vector against the formula the view uses; a norm that computes something else is
refused with a one-line error rather than guessed at.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..core.errors import UserError, did_you_mean
from ..core.records import ModelRecord
from .tokens import own_bos_token_id

log = logging.getLogger(__name__)

HookFn = Callable[[torch.Tensor, Any], torch.Tensor | None]

_HOOKS = {
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "resid_mid": "blocks.{l}.hook_resid_mid",
    "resid_post": "blocks.{l}.hook_resid_post",
    "attn_out": "blocks.{l}.hook_attn_out",
    "mlp_out": "blocks.{l}.hook_mlp_out",
    "z": "blocks.{l}.attn.hook_z",
    "v": "blocks.{l}.attn.hook_v",
    "pattern": "blocks.{l}.attn.hook_pattern",
    "ln1_scale": "blocks.{l}.ln1.hook_scale",
    "ln2_scale": "blocks.{l}.ln2.hook_scale",
    "ln1_post_scale": "blocks.{l}.ln1_post.hook_scale",
    "mlp_pre": "blocks.{l}.mlp.hook_pre",
    "mlp_pre_linear": "blocks.{l}.mlp.hook_pre_linear",
    "mlp_post": "blocks.{l}.mlp.hook_post",
    "attn_scores": "blocks.{l}.attn.hook_attn_scores",
    "rot_cos": "blocks.{l}.attn.hook_cos",
    "rot_sin": "blocks.{l}.attn.hook_sin",
}
"""TransformerLens hook names (the legacy names, which the Bridge accepts as aliases)."""


@dataclass(frozen=True)
class MlpRead:
    """How one MLP layer reads the residual stream, per branch.

    `weights[name]` is `[d_model, d_mlp]` and `bias[name]` is `[d_mlp]`, such that
    `normalised_input @ weights[name] + bias[name]` is that branch's pre-activation. Branches are
    `{"in"}` for a GELU MLP (hook `mlp_pre`), `{"gate", "up"}` for a gated MLP (hooks `mlp_pre` and
    `mlp_pre_linear`; the neuron is `act(gate) * up`).
    """

    weights: dict[str, torch.Tensor]
    bias: dict[str, torch.Tensor]


@dataclass(frozen=True)
class AttnRead:
    """How the attention of one layer reads its normalised input into queries and keys (the QK side).

    `normalised_input @ w_q[h] + b_q[h]` is head h's query before rotary, `normalised_input @ w_k[g] + b_k[g]`
    its KV group g's key (`g = h // (n_heads // n_kv_heads)`), gain and norm bias folded in as `MlpRead`
    does; the attention score the softmax sees is `softcap(scaling · rot(q_T) · rot(k_s))`."""

    w_q: torch.Tensor
    """`[n_heads, d_model, d_head]`."""
    b_q: torch.Tensor
    """`[n_heads, d_head]`: query bias plus the norm bias through `W_Q`."""
    w_k: torch.Tensor
    """`[n_kv_heads, d_model, d_head]`."""
    b_k: torch.Tensor
    """`[n_kv_heads, d_head]`."""
    scaling: float
    """The factor on `q · k` (`1 / sqrt(d_head)` for most models; Gemma's `query_pre_attn_scalar`)."""
    softcap: float | None
    """Gemma 2's attention logit soft-capping `c · tanh(x / c)`, or None."""
    rotary: bool
    """Queries and keys are rotated at their own positions (the rotation is linear)."""

    def kv_group(self, head: int) -> int:
        return head // (self.w_q.shape[0] // self.w_k.shape[0])


class ModelView:
    """One convention over TransformerBridge / HookedTransformer / HookedSAETransformer.

    Build one with `load_model(config)` or, for a model object you already hold,
    `ModelView.from_object(model)`.
    """

    def __init__(self, model: Any, *, name: str, source: str, weights: str):
        self.model = model
        self._points: dict[str, str] | None = None
        """Hook dict name → its hook point's own name (`_by_filter`), read once."""
        self._stacked: dict[str, torch.Tensor] = {}
        self.name = name
        self.source = source
        self.weights = weights
        cfg = model.cfg
        self.n_layers: int = cfg.n_layers
        self.n_heads: int = cfg.n_heads
        self.n_kv_heads: int = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        self.d_model: int = cfg.d_model
        self.d_head: int = cfg.d_head
        self.d_mlp: int = cfg.d_mlp
        self.d_vocab: int = cfg.d_vocab
        self.n_ctx: int = cfg.n_ctx
        self.gated: bool = bool(getattr(cfg, "gated_mlp", False))
        norm = str(cfg.normalization_type or "LN")
        self.normalization: str = "RMS" if norm.startswith("RMS") else "LN"
        self.norm_offset: bool = bool(getattr(cfg, "rmsnorm_uses_offset", False))
        """True where an RMSNorm applies `1 + w` (Gemma 1/2/3 under the Bridge; HookedTransformer adds the
        one when it converts the weights, so it stores the gain itself)."""
        self.parallel: bool = bool(getattr(cfg, "parallel_attn_mlp", False))
        """True where attention and MLP of a block both read `resid_pre` (no `hook_resid_mid`)."""
        self.sandwich: bool = hasattr(model.blocks[0], "ln1_post")
        """True where attention and MLP outputs pass through their own norms before the residual add."""
        self.tokenizer = model.tokenizer
        bos = own_bos_token_id(self.tokenizer) if self.tokenizer is not None else None
        self.bos_token: str | None = None if bos is None else self.tokenizer.convert_ids_to_tokens(bos)
        """The tokenizer's own BOS token (`tokens.own_bos_token_id`: one the loading library put in, EOS
        for a tokenizer without BOS, counts as none)."""
        check_norms(self)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_object(cls, model: Any, name: str | None = None) -> ModelView:
        """Wrap a model object a user already holds; its weight convention is detected."""
        kind = type(model).__name__
        if not all(hasattr(model, a) for a in ("cfg", "run_with_hooks", "to_tokens")):
            raise UserError(f"a {kind} is not a TransformerLens model (TransformerBridge or HookedTransformer)")
        if getattr(model, "tokenizer", None) is None:
            raise UserError(f"the {kind} has no tokenizer: pass tokenizer= when building it")
        return cls(model, name=name or getattr(model.cfg, "model_name", kind), source="object",
                   weights=detect_weights(model))

    # -- facts --------------------------------------------------------------------------------

    @property
    def model_class(self) -> str:
        return type(self.model).__name__

    @property
    def device(self) -> torch.device:
        return self.W_U.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_U.dtype

    def record(self) -> ModelRecord:
        return ModelRecord(
            model_name=self.name, source=self.source, model_class=self.model_class, weights=self.weights,
            architecture="gated-mlp" if self.gated else "gelu-mlp", normalization=self.normalization,
            n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, d_model=self.d_model,
            d_head=self.d_head, d_mlp=self.d_mlp, d_vocab=self.d_vocab, n_ctx=self.n_ctx,
            dtype=str(self.dtype).removeprefix("torch."), device=str(self.device),
            norm_gain="1+w" if self.norm_offset else "w", bos_token=self.bos_token,
            block="parallel" if self.parallel else "sandwich" if self.sandwich else "sequential",
        )

    def hook_name(self, kind: str, layer: int) -> str:
        """The TransformerLens hook name of `kind` (a key of `_HOOKS`) at `layer`."""
        if kind not in _HOOKS:
            raise ValueError(f"unknown hook kind {kind!r}{did_you_mean(kind, _HOOKS)}")
        self._check_layer(layer)
        return _HOOKS[kind].format(l=layer)

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise UserError(f"layer {layer} is out of range: the model has layers 0..{self.n_layers - 1}")

    # -- weights in the view's convention -----------------------------------------------------

    def stacked(self, name: str) -> torch.Tensor:
        """`model.<name>` (`W_O`, `W_in`, …: every layer's weights stacked, `[n_layers, ...]`), detached and read
        once per view: the Bridge stacks them anew on every access (0.01 s for SmolLM2's `W_O`, paid per layer
        and per unit where a loop reads `model.W_O[layer]`)."""
        if name not in self._stacked:
            self._stacked[name] = getattr(self.model, name).detach()
        return self._stacked[name]

    @property
    def W_U(self) -> torch.Tensor:
        """The model's unembedding `[d_model, d_vocab]` as stored."""
        return self.model.W_U

    def unembed(self) -> torch.Tensor:
        """Effective unembedding `[d_model, d_vocab]`: final norm gain folded in; in the folded
        convention also centred over the vocabulary (what TL's `center_unembed` does)."""
        w = self.W_U.detach()
        gain = self.norm_gain(self.model.ln_final)
        if gain is not None:
            w = gain[:, None] * w
        if self.weights == "folded":
            w = w - w.mean(dim=-1, keepdim=True)
        return w

    def mlp_write(self, layer: int) -> torch.Tensor:
        """Each neuron's output direction `[d_mlp, d_model]` (centred for LayerNorm models when folded).

        In a sandwich block the post-MLP norm's gain is applied (`W_out ⊙ gain`); its scale, one positive
        number per position shared by the layer's neurons, is not part of a direction."""
        self._check_layer(layer)
        return self.center_write(self.post_gain(self.model.W_out[layer].detach(), layer, "ln2_post"))

    def attn_write(self, layer: int) -> torch.Tensor:
        """Each head's `W_O` `[n_heads, d_head, d_model]` (centred for LayerNorm models when folded;
        times the post-attention norm's gain in a sandwich block, as `mlp_write`)."""
        self._check_layer(layer)
        return self.center_write(self.post_gain(self.stacked("W_O")[layer], layer, "ln1_post"))

    def post_gain(self, w: torch.Tensor, layer: int, norm: str) -> torch.Tensor:
        """`w` (`[..., d_model]`) times the effective gain of block `layer`'s `norm` ('ln1_post' or
        'ln2_post') where the block has it; `w` unchanged otherwise."""
        gain = self.norm_gain(getattr(self.model.blocks[layer], norm)) if self.sandwich else None
        return w if gain is None else w * gain.to(w)

    def norm_gain(self, norm: torch.nn.Module) -> torch.Tensor | None:
        """The gain a norm module actually multiplies by (`[d_model]`): `1 + w` where the model's RMSNorm
        stores an offset from one (`norm_offset`), `w` otherwise; None when folded away (HT `LNPre`)."""
        gain = _norm_gain(norm)
        return None if gain is None else (1.0 + gain if self.norm_offset else gain)

    def mlp_norm(self, layer: int) -> str:
        """The norm the MLP of `layer` reads through: 'ln2', or 'ln1' in a parallel block that shares
        attention's norm (Phi, GPT-J)."""
        return "ln2" if hasattr(self.model.blocks[layer], "ln2") else "ln1"

    def mlp_input(self, layer: int) -> str:
        """Hook kind of the residual stream the MLP of `layer` reads: `resid_pre` in a parallel block."""
        return "resid_pre" if self.parallel else "resid_mid"

    def center_write(self, w: torch.Tensor) -> torch.Tensor:
        """A write into the residual stream in the view's convention: folded LayerNorm models centre it
        over d_model (TL's `center_writing_weights`; the next LayerNorm removes the mean anyway)."""
        if self.weights == "folded" and self.normalization == "LN":
            w = w - w.mean(dim=-1, keepdim=True)
        return w

    def mlp_read(self, layer: int) -> MlpRead:
        """How MLP `layer` reads its normalised input, gain and biases folded in (see `MlpRead`)."""
        self._check_layer(layer)
        ln2 = getattr(self.model.blocks[layer], self.mlp_norm(layer))
        gain, ln_bias = self.norm_gain(ln2), _norm_bias(ln2)
        w_in = self.model.W_in[layer].detach()
        b_in = optional_bias(self.model, "b_in", layer, self.d_mlp, w_in)
        raw = {"gate": (self.model.W_gate[layer].detach(), torch.zeros_like(b_in)), "up": (w_in, b_in)} \
            if self.gated else {"in": (w_in, b_in)}
        weights, bias = {}, {}
        for branch, (w, b) in raw.items():
            weights[branch] = w if gain is None else gain[:, None] * w
            bias[branch] = b if ln_bias is None else b + ln_bias @ w
        return MlpRead(weights=weights, bias=bias)

    def attn_read(self, layer: int) -> AttnRead:
        """How attention `layer` reads its normalised input into queries and keys (see `AttnRead`); its
        facts (scaling, softcap) from the model's own attention module. `qk_problem` first."""
        self._check_layer(layer)
        ln1 = self.model.blocks[layer].ln1
        gain, ln_bias = self.norm_gain(ln1), _norm_bias(ln1)
        out = {}
        for name in ("Q", "K"):
            w = getattr(self.model, f"W_{name}")[layer].detach()
            if name == "K" and w.shape[0] not in (self.n_kv_heads, self.n_heads):
                raise UserError(f"W_K of layer {layer} has {w.shape[0]} heads, expected {self.n_kv_heads}")
            try:
                b = getattr(self.model, f"b_{name}")
                b = torch.zeros(w.shape[0], w.shape[2], dtype=w.dtype, device=w.device) if b is None \
                    else b[layer].detach()
            except (TypeError, AttributeError):  # bias-less models (the Bridge raises instead of returning None)
                b = torch.zeros(w.shape[0], w.shape[2], dtype=w.dtype, device=w.device)
            if ln_bias is not None:
                b = b + torch.einsum("m,hmd->hd", ln_bias.to(w), w)
            out[name] = (w if gain is None else gain.to(w)[None, :, None] * w, b)
        facts = attention_facts(self, layer)
        return AttnRead(w_q=out["Q"][0], b_q=out["Q"][1], w_k=out["K"][0], b_k=out["K"][1], **facts)

    def qk_problem(self) -> str | None:
        """Why this model's attention scores cannot be split over residual-stream components at all (an
        architecture the view does not know), or None. Models it knows but whose split is not bilinear are
        `qk_unsplittable`."""
        cfg = self.model.cfg
        kind = getattr(cfg, "positional_embedding_type", "standard")
        if kind not in ("standard", "rotary"):
            return f"positional embedding '{kind}' (only learned/absolute and rotary ones are split)"
        if kind == "rotary" and getattr(cfg, "rotary_adjacent_pairs", False) and not hasattr(self.model.blocks[0].attn, "apply_rotary"):
            return "rotary embeddings over adjacent pairs outside TransformerLens's own attention"
        if kind == "rotary" and not (self.hook_exists(self.hook_name("rot_cos", 0))
                                     or hasattr(self.model.blocks[0].attn, "apply_rotary")):
            return "a rotary attention that exposes neither its cos/sin hooks nor apply_rotary"
        try:
            attention_facts(self, 0)
        except UserError as e:
            return str(e)
        return None

    def qk_unsplittable(self) -> str | None:
        """Why this (known) model's scores are not bilinear in the residual-stream components even with
        each position's norm scale frozen, or None: QK-norm normalises q and k per head after the projection."""
        attn = self.model.blocks[0].attn
        inner = getattr(attn, "original_component", attn)
        if getattr(self.model.cfg, "use_qk_norm", False) or hasattr(inner, "q_norm") or hasattr(inner, "k_norm"):
            return "QK-norm: queries and keys are normalised per head after the projection, so the score is not " \
                   "bilinear in the residual-stream components"
        return None

    def hook_exists(self, name: str) -> bool:
        return name in getattr(self.model, "hook_dict", {})

    # -- running ------------------------------------------------------------------------------

    def to_tokens(self, text: str | list[str], prepend_bos: bool = True) -> torch.Tensor:
        return self.model.to_tokens(text, prepend_bos=prepend_bos)

    @torch.inference_mode()
    def run_with_hooks(self, tokens: torch.Tensor, fwd_hooks: list[tuple[str | Callable, HookFn]],
                       stop_at_layer: int | None = None, return_type: str | None = None, **kwargs: Any) -> Any:
        """A forward with hooks. `stop_at_layer=L` runs blocks 0..L-1 only (and returns nothing)."""
        if stop_at_layer is not None and stop_at_layer >= self.n_layers:
            stop_at_layer = None
        if stop_at_layer is not None:
            return_type = None
        return self.model.run_with_hooks(tokens.to(self.device), fwd_hooks=self._by_filter(fwd_hooks),
                                         return_type=return_type, stop_at_layer=stop_at_layer, **kwargs)

    def _by_filter(self, fwd_hooks: list[tuple[str | Callable, HookFn]]) -> list[tuple[str | Callable, HookFn]]:
        """The named hooks as one name-filter hook that dispatches on the hook point's own name (in order, each
        function given what the one before returned). TransformerBridge resolves every hook *name* it is given
        against a fresh copy of its hook dict (about 0.02 s a name for SmolLM2: over a second for a forward
        hooking 80 names) but a filter against one copy. A name the hook dict does not hold is passed on as
        given (the model's own error); filters pass through."""
        named = [(n, fn) for n, fn in fwd_hooks if isinstance(n, str)]
        if len(named) < 2:
            return fwd_hooks
        if self._points is None:
            self._points = {name: getattr(point, "name", None) or name
                            for name, point in getattr(self.model, "hook_dict", {}).items()}
        by_point: dict[str, list[HookFn]] = {}
        rest = [(n, fn) for n, fn in fwd_hooks if not isinstance(n, str) or n not in self._points]
        asked = set()
        for name, fn in named:
            if name in self._points:
                by_point.setdefault(self._points[name], []).append(fn)
                asked.add(name)

        def dispatch(x, hook):
            for fn in by_point.get(hook.name, ()):
                out = fn(x, hook)
                x = x if out is None else out
            return x

        return [(lambda name: name in asked, dispatch)] + rest

    @torch.inference_mode()
    def logits(self, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.model(tokens.to(self.device), return_type="logits", **kwargs)


def attention_facts(view: ModelView, layer: int) -> dict:
    """`scaling`, `softcap` and `rotary` of attention `layer`, read from the model's own module: the Hugging Face
    module's `scaling` under the Bridge (GPT-2's inverse-layer scaling applied), TransformerLens's `attn_scale`
    otherwise. A `UserError` when neither is there."""
    attn = view.model.blocks[layer].attn
    cfg = view.model.cfg
    rotary = getattr(cfg, "positional_embedding_type", "standard") == "rotary"
    inner = getattr(attn, "original_component", None)
    if inner is not None:
        if not hasattr(inner, "scaling"):
            raise UserError(f"the attention module {type(inner).__name__} states no scaling: its scores cannot be split")
        scaling = float(inner.scaling)
        hf = getattr(inner, "config", None)
        if getattr(hf, "scale_attn_by_inverse_layer_idx", False):
            scaling /= float(layer + 1)
        cap = getattr(hf, "attn_logit_softcapping", None)
    else:
        if not hasattr(attn, "attn_scale"):
            raise UserError(f"the attention module {type(attn).__name__} states no scaling: its scores cannot be split")
        scaling = 1.0 / float(attn.attn_scale)
        cap = getattr(cfg, "attn_scores_soft_cap", None)
    return {"scaling": scaling, "softcap": float(cap) if cap is not None and cap > 0 else None, "rotary": rotary}


def _norm_gain(norm: torch.nn.Module) -> torch.Tensor | None:
    """The norm's gain, or None when it has been folded away (HT `LNPre`/`RMSPre`)."""
    for attr in ("weight", "w"):
        w = getattr(norm, attr, None)
        if isinstance(w, torch.Tensor):
            return w.detach()
    return None


@torch.inference_mode()
def check_norms(view: ModelView) -> None:
    """Check every norm the view reads (`ln1`, `ln2`, the sandwich norms, `ln_final`) on a probe vector:
    the module's output must equal `normalised · gain (+ bias)` with the view's effective gain, where
    `normalised` is `x / rms(x)` (RMS) or `(x - mean) / std` (LN). Raises `UserError` otherwise."""
    model = view.model
    block = model.blocks[0]
    norms = {"ln_final": model.ln_final}
    norms.update({name: getattr(block, name) for name in ("ln1", "ln2", "ln1_post", "ln2_post") if hasattr(block, name)})
    gen = torch.Generator().manual_seed(0)
    param = view.W_U
    x = (100.0 * torch.randn(2, 3, view.d_model, generator=gen)).to(param.device, param.dtype)
    for name, norm in norms.items():
        try:
            y = norm(x).float()
        except Exception:  # a norm that cannot run alone is checked by nothing here
            continue
        h = x.float()
        if view.normalization == "LN":
            h = h - h.mean(-1, keepdim=True)
        h = h / h.pow(2).mean(-1, keepdim=True).sqrt()
        gain, bias = view.norm_gain(norm), _norm_bias(norm)
        want = h * (1.0 if gain is None else gain.float()) + (0.0 if bias is None else bias.float())
        if not torch.allclose(y, want, atol=1e-2, rtol=1e-2):
            raise UserError(f"the norm {name} of {view.name} computes something other than "
                            f"{view.normalization} · gain{' (1 + w)' if view.norm_offset else ''} "
                            f"(max difference {float((y - want).abs().max()):.3g}): this normalisation is not supported")


def _norm_bias(norm: torch.nn.Module) -> torch.Tensor | None:
    for attr in ("bias", "b"):
        b = getattr(norm, attr, None)
        if isinstance(b, torch.Tensor):
            return b.detach()
    return None


def optional_bias(model: Any, attr: str, layer: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """`model.<attr>[layer]`, or zeros for bias-less models (the Bridge raises instead of returning None)."""
    try:
        b = getattr(model, attr)
    except (TypeError, AttributeError):
        b = None
    if b is None:
        return torch.zeros(size, dtype=like.dtype, device=like.device)
    return b[layer].detach()


def detect_weights(model: Any) -> str:
    """'folded' if TransformerLens processing was applied to this model object, else 'raw'."""
    if type(model).__name__ == "TransformerBridge" or hasattr(model, "compatibility_mode"):
        return "folded" if getattr(model, "compatibility_mode", False) else "raw"
    norm = str(getattr(model.cfg, "normalization_type", "") or "")
    return "folded" if norm.endswith("Pre") else "raw"


# -- loading ------------------------------------------------------------------------------------


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Right-padded `[B, max_len]` token ids (causal models: padding never changes real positions)."""
    out = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    for j, r in enumerate(rows):
        out[j, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


FORWARD_OVERHEAD_TOKENS = 64
"""What one forward costs beyond its tokens, in tokens: a forward reads every weight once, whatever its
batch (SmolLM2-135M on 2 CPU cores: about 0.1 s for a 4-token batch, against about 700 tokens/s)."""


def length_batches(lengths: Sequence[int], max_tokens: int, min_rows: int = 1) -> Iterator[list[int]]:
    """Row indices in batches of similar length, longest first, for `pad_batch`: the split of the sorted rows
    that costs the fewest padded tokens plus `FORWARD_OVERHEAD_TOKENS` per batch (dynamic programming), each
    batch at most `max_tokens` padded tokens or `min_rows` rows, whichever is more. In a causal model a
    right-padded row's result does not depend on its batch."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    width = [max(lengths[i], 1) for i in order]
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j rows; cut[j]: where its last batch starts
    cut = [0] * (n + 1)
    for i in range(n):
        for j in range(i + 1, min(n, i + max(min_rows, max_tokens // width[i])) + 1):
            cost = best[i] + FORWARD_OVERHEAD_TOKENS + (j - i) * width[i]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], n
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    for i, j in reversed(bounds):
        yield order[i:j]


def pad_id(tokenizer: Any) -> int:
    """The id that right-pads a batch: the tokenizer's pad token, else EOS, else BOS, else 0. Any id would
    do (in a causal model right padding never reaches a real position); one rule keeps batches identical
    wherever they are built."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
                      getattr(tokenizer, "bos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0
