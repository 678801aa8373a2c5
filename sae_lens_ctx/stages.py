"""The pipeline's stages, registered in order. This file is the one place that shows the pipeline.

```
config ─► model + corpus ─► units ─► contexts ─► attributions ─► explanations ─► scores ─► report
          (load)            (discover) (mine)     (attribute)     (explain)       (score)   (report)
```
"""

from __future__ import annotations

import json
import logging

from . import attribute, dashboard, discover, explain, mine, score
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
                     "load the model and the corpus; record the model's facts and the train/test split",
                     inputs=("model", "corpus")))
register_stage(Stage("discover", ("units.jsonl", "vocab_filter.jsonl"), ("discover", "seed"), discover.run_stage,
                     "find next-token units (neurons, SAE latents) by congruence, with controls", inputs=("saes",)))
register_stage(Stage("mine", ("contexts.jsonl", "context_acts.safetensors", "mine.json"), ("mine", "seed"), mine.run_stage,
                     "top-activating contexts per unit in one streaming scan, trimmed; held-out positives and negatives"))
register_stage(Stage("attribute", ("heads.jsonl", "attributions.safetensors", "attribute.json"), ("attribute",),
                     attribute.run_stage, "upstream heads that drive each unit, with an ablation check"))
register_stage(Stage("explain", ("explanations.jsonl", "explain.json"), ("explain", "seed"), explain.run_stage,
                     "LLM explanations of every relevant (unit, head) pair and of every unit"))
register_stage(Stage("score", ("scores.jsonl", "judgements.jsonl", "summary.json"), ("score", "seed"), score.run_stage,
                     "judge explanations on held-out prompts: E, AUROC, simulate-and-score, controls with CIs"))
register_stage(Stage("report", ("report", "report.json", "plots"), ("logging",), dashboard.run_stage,
                     "plots and a static HTML report of whatever the run holds so far (W&B: logging.log_to_wandb)",
                     reads_what_exists=True))
