"""sae-lens-ctx: which attention heads switch on a token-predicting neuron or SAE latent, in which
contexts, and can an LLM say why? An implementation of Neo, Cohen & Barez, "Interpreting Context
Look-ups in Transformers: Investigating Attention-MLP Interactions" (EMNLP 2024), for SAE-Lens and
TransformerLens users.

The public API (see `api.py`): `run` for the whole pipeline and one function per stage, on model and
SAE objects or names, returning typed records with `.to_pandas()`; the same config dataclasses as the CLI.
The names below are imported when first used, so `import sae_lens_ctx` (and the CLI's start) does not
import torch.
"""

from importlib import import_module

from .core.threads import apply_wait_policy
from .core.version import __version__

apply_wait_policy()  # before torch loads its OpenMP runtime (core/threads.py: why, and how to opt out)

_EXPORTS = {
    "core.config": ("AttributeConfig", "CorpusConfig", "DiscoverConfig", "ExplainConfig", "LoggingConfig",
                    "MineConfig", "ModelConfig", "RunConfig", "ScoreConfig"),
    "core.errors": ("UserError",),
    "core.records": ("ContextRecord", "ExplanationRecord", "HeadRecord", "ScoreRecord", "UnitRecord"),
    "inputs.model": ("ModelView", "load_model"),
    "inputs.sae": ("SaeSource",),
    "api": ("Contexts", "Explanations", "Heads", "Records", "RunResult", "Scores", "Units", "attribute_heads",
            "explain_units", "find_next_token_units", "latent_explanations", "mine_contexts", "open_run", "run",
            "run_pipeline", "score_explanations", "to_neuronpedia"),
}
"""Module (relative to this package) → the public names it defines."""

_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE) + ["__version__"]


def __getattr__(name: str):
    """Import a public name from its module on first use (PEP 562)."""
    if name not in _WHERE:
        raise AttributeError(f"module 'sae_lens_ctx' has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
