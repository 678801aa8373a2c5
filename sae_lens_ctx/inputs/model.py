"""Load any supported model, and `ModelView`: one set of answers whatever the model object is.

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
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..core.config import EMBEDDED, ModelConfig
from ..core.embedded import EMBEDDED_MODEL_ID, check_gguf_header, embedded_gguf_path, load_gguf
from ..core.errors import UserError, did_you_mean
from ..core.records import ModelRecord
from .tokens import own_bos_token_id, tokenizer_problem

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


class ModelView:
    """One convention over TransformerBridge / HookedTransformer / HookedSAETransformer.

    Build one with `load_model(config)` or, for a model object you already hold,
    `ModelView.from_object(model)`.
    """

    def __init__(self, model: Any, *, name: str, source: str, weights: str):
        self.model = model
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
        return self.center_write(self.post_gain(self.model.W_O[layer].detach(), layer, "ln1_post"))

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
        return self.model.run_with_hooks(tokens.to(self.device), fwd_hooks=fwd_hooks, return_type=return_type,
                                         stop_at_layer=stop_at_layer, **kwargs)

    @torch.inference_mode()
    def logits(self, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.model(tokens.to(self.device), return_type="logits", **kwargs)


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


def resolve_source(model_name: str) -> tuple[str, Path | str]:
    """Classify a model name: ('embedded-gguf'|'gguf', path), ('hf-directory', path) or ('hub', name).

    An existing directory with a `config.json` wins over a hub id of the same name. A bare name whose
    directory holds no `config.json` (a run directory, `--out gpt2`) is taken as a hub id, never as a
    model; a relative path whose first folder exists here (`models/x`) is a path, never a hub id."""
    if model_name == EMBEDDED:
        return "embedded-gguf", embedded_gguf_path()
    path = Path(model_name).expanduser()
    explicit = model_name.startswith((".", "/", "~")) or model_name.count("/") > 1
    if model_name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file {model_name} does not exist: check the path")
        return "gguf", path
    if path.is_dir() and (path / "config.json").is_file():
        return "hf-directory", path
    if path.is_dir() and explicit:
        raise UserError(f"{model_name} is not a Hugging Face model directory (no config.json): "
                        "point at a save_pretrained directory or a .gguf file")
    if path.is_file():
        raise UserError(f"{model_name} is a file but not a .gguf: give a GGUF file, a model directory or a hub id")
    if explicit or (not path.exists() and len(path.parts) > 1 and Path(path.parts[0]).is_dir()):
        raise UserError(f"model path {model_name} does not exist: check the path")
    return "hub", model_name


def cached_snapshot(hub_id: str) -> Path | None:
    """The local HF cache's snapshot directory of `hub_id` (its `config.json` there), or None; no network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(hub_id, "config.json")
    except Exception:  # an id the hub library rejects (bad characters) is simply not cached
        return None
    return Path(found).parent if isinstance(found, str) else None


def check_model_name(cfg: ModelConfig) -> None:
    """The cheap checks of a model name: the source exists and a hub name is a plausible one."""
    source, _ = resolve_source(cfg.model_name)
    if source == "hub":
        hub_id(cfg.model_name)


def check_model_files(cfg: ModelConfig) -> None:
    """The checks of `load_model` that load nothing: the name (`check_model_name`); a hub id is, offline,
    in the local HF cache, and no local folder of its name shadows it; a local directory has a tokenizer
    and no pickle-only weights; a GGUF file is whole."""
    check_model_name(cfg)
    source, where = resolve_source(cfg.model_name)
    if source == "hub":
        name = hub_id(cfg.model_name)
        snapshot = cached_snapshot(name)
        if snapshot is None and _offline():
            raise _hub_error(name, None, asked=cfg.model_name)
        if snapshot is None and Path(name).is_dir():  # transformers would read the folder, not the hub
            raise UserError(f"the hub id '{name}' is shadowed by the folder {Path(name).resolve()} (not a model "
                            f"directory) and is not in the local HF cache: run from another folder, or download it "
                            f"first (hf download {name})")
        if snapshot is not None and cfg.model_class == "bridge":
            _check_model_directory(snapshot, cfg.allow_pickle)
    elif source == "hf-directory":
        _check_model_directory(Path(where), cfg.allow_pickle)
    elif source == "gguf":
        check_gguf_header(Path(where))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


def _check_model_directory(path: Path, allow_pickle: bool) -> None:
    """A model directory's cheap checks: a tokenizer is saved beside the model, weights are not pickle-only."""
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise UserError(f"model directory {path} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}): "
                        "save the tokenizer next to the model (tokenizer.save_pretrained)")
    _check_no_pickle(path, allow_pickle)


def model_max_context(cfg: ModelConfig) -> int | None:
    """The longest context the model's `config.json` states (n_positions / max_position_embeddings), read
    without loading the model; None where no config file is at hand (a hub model not cached, a GGUF)."""
    source, where = resolve_source(cfg.model_name)
    directory = Path(where) if source == "hf-directory" else None
    if source == "hub" and cfg.model_class == "bridge":
        directory = cached_snapshot(hub_id(cfg.model_name))
    if directory is None:
        return None
    import json

    try:
        data = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        if isinstance(data.get(key), int) and data[key] > 0:
            return int(data[key])
    return None


def load_model(cfg: ModelConfig) -> ModelView:
    """Load the configured model into a `ModelView` in the configured weight convention."""
    cfg.validate()
    source, where = resolve_source(cfg.model_name)
    dtype = getattr(torch, cfg.dtype)
    if cfg.model_class == "hooked":
        if source != "hub":
            raise UserError("model.model_class=hooked needs a TransformerLens model name; "
                            "use model.model_class=bridge for local directories and GGUF files")
        model = _load_hooked(cfg.model_name, cfg, dtype)
    elif source in ("gguf", "embedded-gguf"):
        hf, tok = load_gguf(Path(where), dtype)
        label = EMBEDDED_MODEL_ID if source == "embedded-gguf" else Path(where).stem
        model = _boot_bridge(label, cfg, dtype, hf_model=hf, tokenizer=tok)
    elif source == "hf-directory":
        hf, tok = _load_hf_directory(Path(where), dtype, allow_pickle=cfg.allow_pickle)
        model = _boot_bridge(str(where), cfg, dtype, hf_model=hf, tokenizer=tok)
    elif (snapshot := cached_snapshot(hub_id(cfg.model_name))) is not None:
        # from the cache's own directory: a local folder of the same name (a run directory) never shadows it
        hf, tok = _load_hf_directory(snapshot, dtype, allow_pickle=cfg.allow_pickle)
        model = _boot_bridge(str(snapshot), cfg, dtype, hf_model=hf, tokenizer=tok)
    else:
        model = _boot_bridge(hub_id(cfg.model_name), cfg, dtype)
    if cfg.weights == "folded" and hasattr(model, "enable_compatibility_mode"):
        model.enable_compatibility_mode(disable_warnings=True)
    return ModelView(model, name=cfg.model_name, source=source, weights=cfg.weights)


def hub_id(name: str) -> str:
    """TransformerLens aliases ('gpt2-small') to hub ids ('gpt2'); other names pass through."""
    from transformer_lens import loading_from_pretrained as tl_loading

    try:
        return tl_loading.get_official_model_name(name)
    except ValueError:
        if "/" not in name:
            known = list(tl_loading.OFFICIAL_MODEL_NAMES) + list(_tl_aliases())
            raise UserError(f"unknown model name '{name}'{did_you_mean(name, known)}: give a TransformerLens "
                            "model name, an HF hub id (org/name), a local directory or a .gguf path") from None
        return name


def _tl_aliases() -> list[str]:
    from transformer_lens import loading_from_pretrained as tl_loading

    return [a for aliases in tl_loading.MODEL_ALIASES.values() for a in aliases]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _hub_error(name: str, e: Exception | None, asked: str | None = None) -> UserError:
    """A hub model that cannot be had: neither an existing path nor (offline) in the local HF cache."""
    asked = asked or name
    if _offline() or e is None:
        why = (f"'{asked}' is neither an existing path (from {Path.cwd()}) nor a hub id in the local HF cache, "
               "and HF_HUB_OFFLINE is set")
    else:
        why = f"'{asked}' is not an existing path, and the hub could not be reached ({type(e).__name__})"
    return UserError(f"cannot load model '{name}': {why}; download it where there is network "
                     f"(hf download {name}) or pass a local directory or .gguf file")


_HUB_ERRORS = (OSError, ConnectionError, TimeoutError)


def _boot_bridge(name: str, cfg: ModelConfig, dtype: torch.dtype, **kwargs: Any) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    try:
        return TransformerBridge.boot_transformers(name, device=cfg.device, dtype=dtype, **kwargs)
    except _HUB_ERRORS as e:
        raise _hub_error(name, e) from e
    except ValueError as e:
        if "not supported" in str(e).lower() or "architecture" in str(e).lower():
            raise UserError(f"TransformerBridge does not support model '{name}': {str(e).splitlines()[0]}") from e
        raise


def _load_hooked(name: str, cfg: ModelConfig, dtype: torch.dtype) -> Any:
    from transformer_lens import HookedTransformer

    official = hub_id(name)
    kwargs: dict[str, Any] = dict(device=cfg.device, dtype=dtype)
    try:
        if cfg.weights == "folded":
            return HookedTransformer.from_pretrained(official, **kwargs)
        return HookedTransformer.from_pretrained_no_processing(official, **kwargs)
    except _HUB_ERRORS as e:
        raise _hub_error(official, e) from e


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _check_no_pickle(path: Path, allow_pickle: bool) -> None:
    """Refuse a directory whose weights exist only as pickle files, unless `model.allow_pickle` is set."""
    names = [p.name for p in path.iterdir() if p.is_file()]
    pickled = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES) and "training_args" not in n)
    if pickled and not any(n.endswith(".safetensors") for n in names) and not allow_pickle:
        raise UserError(f"model directory {path} holds pickle-based weights only ({pickled[0]}), and unpickling can "
                        "run code: convert them to safetensors (model.save_pretrained(dir, safe_serialization=True)), "
                        "or for a checkpoint you trust pass model.allow_pickle=true")


def _check_tokenizer(path: Path, tok: Any) -> None:
    """Refuse a tokenizer that cannot be the model's (`tokens.tokenizer_problem`), before any weights load."""
    import json

    try:
        vocab_size = json.loads((path / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError):
        vocab_size = None
    problem = tokenizer_problem(tok, vocab_size if isinstance(vocab_size, int) else None)
    if problem:
        names = sorted(p.name for p in path.glob("tokenizer*")) or ["no tokenizer files"]
        raise UserError(f"model directory {path} has no usable tokenizer ({problem}; {', '.join(names)}): "
                        "save the tokenizer next to the model (tokenizer.save_pretrained)")


def _load_hf_directory(path: Path, dtype: torch.dtype, allow_pickle: bool = False) -> tuple[Any, Any]:
    """A `save_pretrained` directory: safetensors weights, or pickle ones (torch.load(weights_only=True),
    transformers' default) when `allow_pickle`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_no_pickle(path, allow_pickle)

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise UserError(f"model directory {path} has no usable tokenizer ({type(e).__name__}): "
                        "save the tokenizer next to the model (tokenizer.save_pretrained)") from e
    _check_tokenizer(path, tok)
    try:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=None if allow_pickle else True)
    except Exception as e:
        raise UserError(f"model directory {path} could not be loaded ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]}): check that its weights are complete") from e
    return hf.eval(), tok


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Right-padded `[B, max_len]` token ids (causal models: padding never changes real positions)."""
    out = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    for j, r in enumerate(rows):
        out[j, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def pad_id(tokenizer: Any) -> int:
    """The id that right-pads a batch: the tokenizer's pad token, else EOS, else BOS, else 0. Any id would
    do (in a causal model right padding never reaches a real position); one rule keeps batches identical
    wherever they are built."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
                      getattr(tokenizer, "bos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0
