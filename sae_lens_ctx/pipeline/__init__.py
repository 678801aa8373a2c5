"""The pipeline: the engine (stage registry, fingerprints, resume, `run_pipeline`), the plan naming the stages
in order (imported here, so that the stages are registered whenever any part of the pipeline is used), W&B
logging as a finisher, and sharded mining across jobs."""

from . import plan  # noqa: F401  (registers the stages and the finishers)
from .engine import run_pipeline  # noqa: F401
