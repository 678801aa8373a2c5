"""Models of named shapes with random weights, synthetic token contexts and units, for `sae-lens-ctx bench`."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from ..inputs.corpus import TokenContext
from ..inputs.view import ModelView
from ..core.records import UnitRecord




_GPT2 = dict(d_head=64, d_vocab=50257, n_ctx=1024, act_fn="gelu_new", normalization_type="LN")
SHAPES: dict[str, dict] = {
    "gpt2-small": dict(n_layers=12, d_model=768, n_heads=12, d_mlp=3072, **_GPT2),
    "gpt2-medium": dict(n_layers=24, d_model=1024, n_heads=16, d_mlp=4096, **_GPT2),
    "gpt2-large": dict(n_layers=36, d_model=1280, n_heads=20, d_mlp=5120, **_GPT2),
    "pythia-160m": dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50304, n_ctx=2048,
                        act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary", rotary_dim=16,
                        parallel_attn_mlp=True),
    "smollm2": dict(n_layers=30, d_model=576, n_heads=9, n_key_value_heads=3, d_head=64, d_mlp=1536, d_vocab=49152,
                    n_ctx=2048, act_fn="silu", normalization_type="RMS", gated_mlp=True, final_rms=True,
                    positional_embedding_type="rotary", rotary_dim=64, rotary_base=100000),
    "tiny": dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, d_vocab=512, n_ctx=128, act_fn="gelu_new",
                 normalization_type="LN"),
}
"""Named shapes for `bench --shape` (random weights). `smollm2` is the embedded model's shape
(SmolLM2-135M: gated SiLU MLP, RMSNorm, rotary, grouped-query attention)."""

DEFAULT_SHAPES = ("gpt2-small", "smollm2")


def shape_model(shape: str, *, device: str = "cpu", dtype: str = "float32", seed: int = 0) -> ModelView:
    """A `HookedTransformer` of a named shape with random weights (no tokenizer, no hub)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from ..core.errors import UserError, did_you_mean

    if shape not in SHAPES:
        raise UserError(f"unknown shape '{shape}'{did_you_mean(shape, SHAPES)}: choose one of {', '.join(SHAPES)}")
    cfg = HookedTransformerConfig(**SHAPES[shape], seed=seed, device=device, dtype=getattr(torch, dtype))
    model = HookedTransformer(cfg)
    model.eval()
    return ModelView(model, name=f"random:{shape}", source="random", weights="raw")


def synthetic_contexts(n: int, length: int, d_vocab: int, bos_id: int, seed: int = 0,
                       min_length: int | None = None) -> list[TokenContext]:
    """`n` token contexts of `min_length..length` tokens (BOS first), random ids; 3 contexts a document."""
    rng = random.Random(seed)
    lo = max(2, min_length if min_length is not None else length // 2)
    return [TokenContext(f"doc{i // 3}", "train", i % 3, 0,
                         (bos_id, *(rng.randrange(d_vocab) for _ in range(rng.randint(lo, length) - 1))))
            for i in range(n)]


def neuron_units(view: ModelView, n_units: int, layers: Sequence[int], seed: int = 0) -> list[UnitRecord]:
    """`n_units` neurons spread over `layers` (seeded choice of indices)."""
    rng = random.Random(seed)
    out = []
    for j in range(n_units):
        layer = layers[j % len(layers)]
        index = rng.randrange(view.d_mlp)
        out.append(UnitRecord(unit_id=f"L{layer}N{index}", kind="neuron", layer=layer, index=index,
                              hook_name=view.hook_name("mlp_post", layer), token_id=0, token="", congruence=0.0,
                              control=False, direction="promote", rank_in_layer=j + 1))
    return out


def sync(view: ModelView) -> None:
    if view.device.type == "cuda":
        torch.cuda.synchronize()
