"""Units: MLP neurons and SAE latents on one path (ARCHITECTURE §2).

A unit has a *write* direction into the residual stream (discovery projects it through the
unembedding) and a *read* direction from it (attribution). Neurons are `L{layer}N{index}`; SAE
latents are `{sae_id}:{index}`. An `SaeSource` loads an SAE-Lens `SAE` and knows how its latents
write into the residual stream from whichever hook it sits on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.errors import UserError
from ..core.records import OBJECT_PREFIX
from .view import ModelView

_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")

RESIDUAL_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
"""Hooks whose activations live in the residual basis (d_model): an SAE there writes W_dec directly."""


@dataclass
class SaeSource:
    """An SAE-Lens SAE as a source of units."""

    sae_id: str
    sae: Any
    hook_name: str
    layer: int
    hook_kind: str
    release: str | None = None
    """SAE-Lens metadata `release`, when the SAE has one."""
    neuronpedia_id: str | None = None
    """SAE-Lens metadata `neuronpedia_id`, when the SAE has one."""

    @classmethod
    def load(cls, spec: str, device: str = "cpu") -> SaeSource:
        """`spec` is a directory written by `SAE.save_model`, or `release:sae_id` for SAE-Lens's registry / HF."""
        from sae_lens import SAE

        if spec.startswith(OBJECT_PREFIX):
            raise UserError(f"SAE '{spec}' was passed as a Python object, not a file: pass the same SAE again "
                            "(sae_lens_ctx.run(..., saes=[sae]) or attached to the HookedSAETransformer), or save "
                            "it with SAE.save_model and list the directory in discover.saes")
        path = Path(spec).expanduser()
        if path.exists() or spec.startswith((".", "/", "~")):
            if not (path / "cfg.json").is_file():
                raise UserError(f"SAE directory {spec} does not exist or has no cfg.json: "
                                "point at a directory written by SAE.save_model")
            try:
                sae = SAE.load_from_disk(path, device=device)
            except Exception as e:
                raise UserError(f"SAE in {spec} could not be loaded ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:120] if str(e) else ''}): it may be corrupt") from e
            return cls.from_sae(sae, sae_id=path.name)
        if ":" not in spec:
            raise UserError(f"SAE '{spec}' is neither a directory nor 'release:sae_id'")
        release, sae_id = spec.split(":", 1)
        try:
            sae = SAE.from_pretrained(release, sae_id, device=device)
        except (OSError, ConnectionError) as e:
            raise UserError(f"SAE '{spec}' could not be fetched ({type(e).__name__}): it needs network or "
                            "the HF cache; or save it with SAE.save_model and pass the directory") from e
        return cls.from_sae(sae, sae_id=f"{release}/{sae_id}")

    @classmethod
    def from_sae(cls, sae: Any, sae_id: str | None = None) -> SaeSource:
        """An SAE object a user already holds; its id comes from SAE-Lens metadata when not given."""
        meta = sae.cfg.metadata
        hook_name = meta.hook_name
        if not hook_name:
            raise UserError("the SAE's metadata has no hook_name: set sae.cfg.metadata.hook_name")
        m = _HOOK.match(hook_name)
        if not m:
            raise UserError(f"the SAE's hook {hook_name} is not a per-layer hook (blocks.L.*)")
        release, np_id = meta.get("release"), meta.get("neuronpedia_id")
        registry_id = f"{release}/{meta.get('sae_id')}" if release and meta.get("sae_id") else None
        sae_id = sae_id or registry_id or np_id or hook_name
        return cls(sae_id=sae_id, sae=sae, hook_name=hook_name, layer=int(m.group(1)), hook_kind=m.group(2),
                   release=release, neuronpedia_id=np_id)

    def object_spec(self) -> str:
        """The `discover.saes` entry of an in-memory SAE: `object:{sae_id}#{digest of its weights}`, so a
        changed SAE gives the stages that read it a new fingerprint."""
        import hashlib

        h = hashlib.sha256()
        for name, tensor in sorted(self.sae.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return f"{OBJECT_PREFIX}{self.sae_id}#{h.hexdigest()[:12]}"

    def write_directions(self, view: ModelView) -> torch.Tensor:
        """Each latent's write into the residual stream, `[d_sae, d_model]`."""
        view._check_layer(self.layer)
        w_dec = self.sae.W_dec.detach().to(view.device, view.dtype)
        expected, write = self._input_space(view)
        if w_dec.shape[1] != expected:
            raise UserError(f"SAE {self.sae_id} has d_in={w_dec.shape[1]} but its hook {self.hook_name} has "
                            f"width {expected} in this model: it was trained on another model or hook")
        return view.center_write(write(w_dec))

    def _input_space(self, view: ModelView) -> tuple[int, Any]:
        kind = self.hook_kind
        if kind in RESIDUAL_HOOKS:
            return view.d_model, lambda w: w
        if kind == "attn.hook_z":
            w_o = view.attn_write(self.layer)  # [n_heads, d_head, d_model]
            return view.n_heads * view.d_head, lambda w: torch.einsum(
                "shd,hdm->sm", w.reshape(w.shape[0], view.n_heads, view.d_head), w_o)
        if kind == "mlp.hook_post":
            return view.d_mlp, lambda w: w @ view.mlp_write(self.layer)
        raise UserError(f"SAEs on {self.hook_name} are not supported: use an SAE on hook_resid_pre/mid/post, "
                        "hook_attn_out, hook_mlp_out, attn.hook_z or mlp.hook_post")

    @property
    def d_sae(self) -> int:
        return int(self.sae.W_dec.shape[0])
