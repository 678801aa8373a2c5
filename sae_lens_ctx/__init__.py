"""sae-lens-ctx: which attention heads switch on a token-predicting neuron or SAE latent, in which
contexts, and can an LLM say why? An implementation of Neo, Cohen & Barez, "Interpreting Context
Look-ups in Transformers: Investigating Attention-MLP Interactions" (EMNLP 2024), for SAE-Lens and
TransformerLens users.

The public API (see `api.py`): `run` for the whole pipeline and one function per stage, on model and
SAE objects or names, returning typed records with `.to_pandas()`; the same config dataclasses as the CLI.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "config": ["AttributeConfig", "CorpusConfig", "DiscoverConfig", "ExplainConfig", "LoggingConfig", "MineConfig",
               "ModelConfig", "RunConfig", "ScoreConfig"],
    "errors": ["UserError"],
    "model": ["ModelView", "load_model"],
    "pipeline": ["run_pipeline"],
    "records": ["ContextRecord", "ExplanationRecord", "HeadRecord", "ScoreRecord"],
    "units": ["SaeSource", "UnitRecord"],
    "api": ["Contexts", "Explanations", "Heads", "Records", "RunResult", "Scores", "Units", "attribute_heads",
            "explain_units", "find_next_token_units", "latent_explanations", "mine_contexts", "open_run", "run",
            "score_explanations", "to_neuronpedia"],
}
"""Where each public name lives. Names are imported on first use (module `__getattr__`, PEP 562), so that
`import sae_lens_ctx` and the CLI's help import no torch."""

_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_WHERE))


__all__ = [
    "AttributeConfig", "ContextRecord", "Contexts", "CorpusConfig", "DiscoverConfig", "ExplainConfig",
    "ExplanationRecord", "Explanations", "HeadRecord", "Heads", "LoggingConfig", "MineConfig", "ModelConfig",
    "ModelView", "Records", "RunConfig", "RunResult", "SaeSource", "ScoreConfig", "ScoreRecord", "Scores",
    "UnitRecord", "Units", "UserError", "attribute_heads", "explain_units", "find_next_token_units",
    "latent_explanations", "load_model", "mine_contexts", "open_run", "run", "run_pipeline",
    "score_explanations", "to_neuronpedia", "__version__",
]
