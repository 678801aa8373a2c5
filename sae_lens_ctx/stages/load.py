"""The load stage: the model's facts and the corpus's train/test split, recorded in the run directory."""

from __future__ import annotations

import json
from dataclasses import replace

from ..core.records import atomic_write, write_jsonl
from ..inputs.context import RunContext


def load(ctx: RunContext) -> None:
    """Load the model and the corpus; record the model's facts and which document went to which split."""
    model, corpus = ctx.model, ctx.corpus
    record = replace(model.record(), prepend_bos=ctx.config.corpus.prepend_bos)
    atomic_write(ctx.path("model.json"), json.dumps(record.__dict__, indent=2) + "\n")
    write_jsonl(ctx.path("documents.jsonl"), corpus.documents)
    atomic_write(ctx.path("corpus.json"), json.dumps(corpus.summary(), indent=2) + "\n")
