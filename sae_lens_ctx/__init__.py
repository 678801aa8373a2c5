"""sae-lens-ctx: which attention heads switch on a token-predicting neuron or SAE latent, in which
contexts, and can an LLM say why? An implementation of Neo, Cohen & Barez, "Interpreting Context
Look-ups in Transformers: Investigating Attention-MLP Interactions" (EMNLP 2024), for SAE-Lens and
TransformerLens users.

The public API (see `api.py`): `run` for the whole pipeline and one function per stage, on model and
SAE objects or names, returning typed records with `.to_pandas()`; the same config dataclasses as the CLI.
"""

__version__ = "0.1.0"

from .config import (  # noqa: E402
    AttributeConfig, CorpusConfig, DiscoverConfig, ExplainConfig, LoggingConfig, MineConfig, ModelConfig, RunConfig,
    ScoreConfig,
)
from .errors import UserError  # noqa: E402
from .model import ModelView, load_model  # noqa: E402
from .pipeline import run_pipeline  # noqa: E402
from . import stages as _stages  # noqa: E402,F401  (registers the pipeline's stages)
from .records import ContextRecord, ExplanationRecord, HeadRecord, ScoreRecord  # noqa: E402
from .units import SaeSource, UnitRecord  # noqa: E402
from .api import (  # noqa: E402
    Contexts, Explanations, Heads, Records, RunResult, Scores, Units, attribute_heads, explain_units,
    find_next_token_units, latent_explanations, mine_contexts, open_run, run, score_explanations, to_neuronpedia,
)

__all__ = [
    "AttributeConfig", "ContextRecord", "Contexts", "CorpusConfig", "DiscoverConfig", "ExplainConfig",
    "ExplanationRecord", "Explanations", "HeadRecord", "Heads", "LoggingConfig", "MineConfig", "ModelConfig",
    "ModelView", "Records", "RunConfig", "RunResult", "SaeSource", "ScoreConfig", "ScoreRecord", "Scores",
    "UnitRecord", "Units", "UserError", "attribute_heads", "explain_units", "find_next_token_units",
    "latent_explanations", "load_model", "mine_contexts", "open_run", "run", "run_pipeline",
    "score_explanations", "to_neuronpedia", "__version__",
]
