"""The plan: the pipeline's stages in order, each with the function that runs it, and the finishers.

```
config ─► model + corpus ─► units ─► contexts ─► attributions ─► explanations ─► scores ─► report
          (load)            (discover) (mine)     (attribute)     (explain)       (score)   (report)
```

What each stage is (name, summary, config sections, files) is data in `core.layout`; this module attaches
the functions and registers them with the engine, and registers W&B logging as a finisher.
"""

from __future__ import annotations

from ..core import layout
from ..stages import attribute, discover, explain, load, score
from ..stages import mine
from ..stages.report import html as report
from .engine import Stage, register_finisher, register_stage
from .wandb_log import log_finished_run

RUNS = {"load": load.load, "discover": discover.run_stage, "mine": mine.run_stage, "attribute": attribute.run_stage,
        "explain": explain.run_stage, "score": score.run_stage, "report": report.run_stage}
"""Stage name → the function that runs it over a `RunContext`."""

for spec in layout.STAGES:
    register_stage(Stage(spec.name, layout.outputs(spec.name), spec.config_sections, RUNS[spec.name], spec.summary,
                         spec.reads_what_exists, inputs=spec.inputs))
register_finisher(log_finished_run)
