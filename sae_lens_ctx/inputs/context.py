"""The run context: what a stage may use (the run directory, the resolved config, lazily loaded inputs)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ..core.config import RunConfig
from .corpus import Corpus, build_corpus
from .model import load_model
from .view import ModelView
from .sae import SaeSource

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """Everything a stage may use: the run directory, the resolved config, and lazily loaded inputs.

    A model object passed in from Python (`model=`) is used instead of loading `config.model`, and SAE
    objects passed in from Python (`sae_objects`, keyed by their `discover.saes` spec `object:...`) are
    used instead of loading those specs from disk or a registry.
    """

    out: Path
    config: RunConfig
    model_object: Any = None
    _manifest: dict = field(default_factory=dict, repr=False)
    sae_objects: dict[str, Any] = field(default_factory=dict, repr=False)
    this_run: dict[str, Any] = field(default_factory=dict, repr=False)
    """What the running stage did in this invocation (timings, throughput, LLM calls made and cache hits,
    where a scan resumed): stored under the stage in `stages.json`, never in its results files."""

    def path(self, name: str) -> Path:
        return self.out / name

    def sae_sources(self) -> list:
        """The `SaeSource` of every SAE in `discover.saes`: an in-memory one where given, else loaded."""
        return [self.sae_objects[spec] if spec in self.sae_objects
                else SaeSource.load(spec, device=self.config.model.device) for spec in self.config.discover.saes]

    @cached_property
    def model(self) -> ModelView:
        if self.model_object is not None:
            return ModelView.from_object(self.model_object, name=self.config.model.model_name)
        log.info("loading model %s", self.config.model.model_name)
        return load_model(self.config.model)

    @cached_property
    def corpus(self) -> Corpus:
        return build_corpus(self.config.corpus, self.model.tokenizer, n_ctx=self.model.n_ctx)
