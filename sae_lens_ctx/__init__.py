"""sae-lens-ctx: which attention heads switch on a token-predicting neuron or SAE latent, in which
contexts, and can an LLM say why? An implementation of Neo, Cohen & Barez, "Interpreting Context
Look-ups in Transformers: Investigating Attention-MLP Interactions" (EMNLP 2024), for SAE-Lens and
TransformerLens users.
"""

__version__ = "0.1.0"

from .config import CorpusConfig, LoggingConfig, ModelConfig, RunConfig  # noqa: E402
from .errors import UserError  # noqa: E402
from .model import ModelView, load_model  # noqa: E402
from .pipeline import run_pipeline  # noqa: E402
from . import stages as _stages  # noqa: E402,F401  (registers the pipeline's stages)

__all__ = [
    "CorpusConfig", "LoggingConfig", "ModelConfig", "ModelView", "RunConfig", "UserError",
    "load_model", "run_pipeline", "__version__",
]
