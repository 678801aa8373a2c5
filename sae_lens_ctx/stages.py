"""The pipeline's stages, registered in order. This file is the one place that shows the pipeline.

```
config ─► model + corpus ─► units ─► contexts ─► attributions ─► explanations ─► scores ─► report
          (load)            (discover) (mine)     (attribute)     (explain)       (score)   (report)
```
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable

from .pipeline import RunContext, Stage, register_stage
from .records import atomic_write, write_jsonl

log = logging.getLogger(__name__)


def _on_call(module: str) -> Callable[[RunContext], None]:
    """`module.run_stage`, imported when the stage runs (so that the CLI's help and config errors import
    no torch)."""

    def run_stage(ctx: RunContext) -> None:
        return importlib.import_module(f"{__package__}.{module}").run_stage(ctx)

    run_stage.__qualname__ = f"{module}.run_stage"
    return run_stage


def load(ctx: RunContext) -> None:
    """Load the model and the corpus; record the model's facts and which document went to which split."""
    model, corpus = ctx.model, ctx.corpus
    atomic_write(ctx.path("model.json"), json.dumps(model.record().__dict__, indent=2) + "\n")
    write_jsonl(ctx.path("documents.jsonl"), corpus.documents)
    atomic_write(ctx.path("corpus.json"), json.dumps(corpus.summary(), indent=2) + "\n")


register_stage(Stage("load", ("model.json", "documents.jsonl", "corpus.json"), ("model", "corpus"), load,
                     "load the model and the corpus; record the model's facts and the train/test split"))
register_stage(Stage("discover", ("units.jsonl", "vocab_filter.jsonl"), ("discover", "seed"), _on_call("discover"),
                     "find next-token units (neurons, SAE latents) by congruence, with controls"))
register_stage(Stage("mine", ("contexts.jsonl", "context_acts.safetensors", "mine.json"), ("mine", "seed"), _on_call("mine"),
                     "top-activating contexts per unit in one streaming scan, trimmed; held-out positives and negatives"))
register_stage(Stage("attribute", ("heads.jsonl", "attributions.safetensors", "attribute.json"), ("attribute",),
                     _on_call("attribute"), "upstream heads that drive each unit, with an ablation check"))
register_stage(Stage("explain", ("explanations.jsonl", "explain.json"), ("explain", "seed"), _on_call("explain"),
                     "LLM explanations of every relevant (unit, head) pair and of every unit"))
register_stage(Stage("score", ("scores.jsonl", "judgements.jsonl", "summary.json"), ("score", "seed"), _on_call("score"),
                     "judge explanations on held-out prompts: E, AUROC, simulate-and-score, controls with CIs"))
register_stage(Stage("report", ("report", "report.json", "plots"), ("logging",), _on_call("dashboard"),
                     "plots and a static HTML report of whatever the run holds so far (W&B: logging.log_to_wandb)",
                     reads_what_exists=True))
