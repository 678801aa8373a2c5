"""The pipeline's stages, registered in order. This file is the one place that shows the pipeline.

```
config ─► model + corpus ─► units ─► contexts ─► attributions ─► explanations ─► scores ─► report
          (load)            (discover) (mine)     (attribute)     (explain)       (score)   (report)
```
"""

from __future__ import annotations

import json
import logging

from . import attribute, discover
from .pipeline import RunContext, Stage, register_stage
from .records import atomic_write, write_jsonl

log = logging.getLogger(__name__)


def load(ctx: RunContext) -> None:
    """Load the model and the corpus; record the model's facts and which document went to which split."""
    model, corpus = ctx.model, ctx.corpus
    atomic_write(ctx.path("model.json"), json.dumps(model.record().__dict__, indent=2) + "\n")
    write_jsonl(ctx.path("documents.jsonl"), corpus.documents)
    atomic_write(ctx.path("corpus.json"), json.dumps(corpus.summary(), indent=2) + "\n")


register_stage(Stage("load", ("model.json", "documents.jsonl", "corpus.json"), ("model", "corpus"), load,
                     "load the model and the corpus; record the model's facts and the train/test split"))
register_stage(Stage("discover", ("units.jsonl", "vocab_filter.jsonl"), ("discover", "seed"), discover.run_stage,
                     "find next-token units (neurons, SAE latents) by congruence, with controls"))
register_stage(Stage("mine", ("contexts.jsonl",), (), None, "top-activating contexts per unit, trimmed"))
register_stage(Stage("attribute", ("heads.jsonl", "attributions.safetensors", "attribute.json"), ("attribute",),
                     attribute.run_stage, "upstream heads that drive each unit, with an ablation check"))
register_stage(Stage("explain", ("explanations.jsonl",), (), None, "LLM explanations of heads and units"))
register_stage(Stage("score", ("scores.jsonl", "summary.json"), (), None, "judge explanations on held-out prompts"))
register_stage(Stage("report", ("report",), (), None, "W&B tables and plots; a static HTML report"))
