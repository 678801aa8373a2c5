"""The run directory's contract, written once: which file holds which record type and which stage writes it.

The stage registry (`pipeline.engine`), the readers of a run (`stages.report.tables`, the API) and the stages'
input checks all read this table; the README's "Run directory" section documents the same rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig
from .errors import UserError, did_you_mean
from .lookups import LookupRecord, QkRecord
from .unit_lookups import OcclusionRecord
from .records import (ContextRecord, DocumentRecord, ExplanationRecord, HeadRecord, HeadTokensRecord, ScoreRecord,
                      UnitRecord)


RESULTS_FORMAT = 4
"""Version of the run-directory layout, part of every stage's fingerprint. A directory written under an
older version is upgraded and its stages re-run (`pipeline.engine`); one written under a newer one is refused."""

MANIFEST = "stages.json"
"""Which stages finished, with their fingerprints (see `pipeline.engine`)."""

CONFIG_FILE = "config.yaml"
"""The run's fully resolved config."""


@dataclass(frozen=True)
class StageSpec:
    """One stage of the pipeline as data: what the CLI shows and what its fingerprint covers.

    The function that runs it is attached by `pipeline.plan` (`pipeline.engine.Stage`)."""

    name: str
    """CLI name of the stage (`sae-lens-ctx <name>`)."""
    summary: str
    """One line for `--help`."""
    config_sections: tuple[str, ...]
    """`RunConfig` fields whose values the stage depends on (part of its fingerprint)."""
    reads_what_exists: bool = False
    """A showing stage (`report`): it reads whatever the earlier stages have written so far, so it runs
    even when one of them is not built yet or not up to date, and it runs every time."""
    inputs: tuple[str, ...] = ()
    """Inputs the stage reads from outside the run directory ('model', 'corpus', 'saes'): their content
    digests (`pipeline.preflight.input_digests`) are part of its fingerprint."""


@dataclass(frozen=True)
class RunFile:
    """One file (or folder) of the run directory: the stage that writes it and, for JSONL, its record type."""

    name: str
    """Path relative to the run directory."""
    stage: str
    """The stage that writes it."""
    record: type | None = None
    """The dataclass of each line (JSONL files), or None."""
    table: str | None = None
    """Table name in the report and W&B (`units` → `units/table`), or None when it is not shown as a table."""
    documented: tuple[str, ...] = ()
    """The columns the contract guarantees (the README's table), a subset of the record's fields."""
    summary: bool = False
    """A stage's JSON summary, shown beside the tables when present."""

    def record_columns(self) -> list[str]:
        """The record's fields in order (the documented columns when there is no record type)."""
        return [f.name for f in dataclasses.fields(self.record)] if self.record else list(self.documented)


STAGES: tuple[StageSpec, ...] = (
    StageSpec("load", "load the model and the corpus; record the model's facts and the train/test split",
              ("model", "corpus"), inputs=("model", "corpus")),
    StageSpec("discover", "find next-token units (neurons, SAE latents) by congruence, with controls",
              ("discover", "seed"), inputs=("saes",)),
    StageSpec("mine", "top-activating contexts per unit in one streaming scan, trimmed; held-out positives and "
              "negatives", ("mine", "seed")),
    StageSpec("attribute", "upstream heads that drive each unit, with an ablation check", ("attribute",)),
    StageSpec("explain", "LLM explanations of every relevant (unit, head) pair and of every unit", ("explain", "seed")),
    StageSpec("score", "judge explanations on held-out prompts: E, AUROC, simulate-and-score, controls with CIs",
              ("score", "seed")),
    StageSpec("report", "plots and a static HTML report of whatever the run holds so far (W&B: "
              "logging.log_to_wandb)", ("logging",), reads_what_exists=True),
)
"""The stages in pipeline order."""

FILES: tuple[RunFile, ...] = (
    RunFile("model.json", "load", summary=True),
    RunFile("documents.jsonl", "load", DocumentRecord),
    RunFile("corpus.json", "load", summary=True),
    RunFile("units.jsonl", "discover", UnitRecord, "units",
            ("unit_id", "kind", "layer", "index", "token_id", "token", "congruence", "control")),
    RunFile("vocab_filter.jsonl", "discover"),
    RunFile("contexts.jsonl", "mine", ContextRecord, "contexts",
            ("unit_id", "split", "rank", "doc_id", "text", "activation", "trimmed_activation")),
    RunFile("context_acts.safetensors", "mine"),
    RunFile("windows.jsonl", "mine"),
    RunFile("mine.json", "mine", summary=True),
    RunFile("heads.jsonl", "attribute", HeadRecord, "heads",
            ("unit_id", "head", "active_fraction", "mean_attribution", "relevant", "ablation_effect",
             "ablation_pvalue")),
    RunFile("attributions.safetensors", "attribute"),
    RunFile("attribute.json", "attribute", summary=True),
    RunFile("lookups.jsonl", "attribute", LookupRecord, "lookups",
            ("unit_id", "head", "split", "rank", "active", "attribution", "sources")),
    RunFile("qk.jsonl", "attribute", QkRecord, None,
            ("unit_id", "head", "split", "rank", "position", "score", "logit", "gap", "key", "query", "pairs", "status")),
    RunFile("occlusions.jsonl", "attribute", OcclusionRecord, None,
            ("unit_id", "split", "rank", "last_token", "activation", "tokens", "status")),
    RunFile("head_tokens.jsonl", "attribute", HeadTokensRecord, None,
            ("unit_id", "head", "line", "kind", "rank", "attributions")),
    RunFile("explanations.jsonl", "explain", ExplanationRecord, "explanations", ("unit_id", "head", "explainer", "text")),
    RunFile("explain.json", "explain", summary=True),
    RunFile("scores.jsonl", "score", ScoreRecord, "scores", ("unit_id", "head", "scorer", "value", "ci_low", "ci_high", "n")),
    RunFile("judgements.jsonl", "score"),
    RunFile("summary.json", "score", summary=True),
    RunFile("report", "report"),
    RunFile("report.json", "report"),
    RunFile("plots", "report"),
)
"""Every file a run writes besides `config.yaml`, `stages.json` and `tracking.json`, in pipeline order."""

STAGE_NAMES = tuple(s.name for s in STAGES)
TABLES: tuple[RunFile, ...] = tuple(f for f in FILES if f.table)
"""The files shown as tables (report, W&B, the API), in pipeline order."""
SUMMARY_FILES: tuple[str, ...] = tuple(f.name for f in FILES if f.summary)
_BY_NAME = {f.name: f for f in FILES}


def outputs(stage: str) -> tuple[str, ...]:
    """The files `stage` writes."""
    return tuple(f.name for f in FILES if f.stage == stage)


def table(name: str) -> RunFile:
    """The table named `name` (`units`, `scores`, ...)."""
    return next(f for f in TABLES if f.table == name)


def require_inputs(out: Path, names: Sequence[str]) -> None:
    """A `UserError` naming the first missing file among `names` in the run directory `out`, and the stage
    that writes it."""
    for name in names:
        if not (out / name).is_file():
            raise UserError(f"{out / name} is missing: run the {_BY_NAME[name].stage} stage first "
                            "(`sae-lens-ctx run --out DIR`)")


def stage(name: str) -> StageSpec:
    """The stage named `name` (a `UserError` with the closest name otherwise)."""
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise UserError(f"unknown stage '{name}'{did_you_mean(name, STAGE_NAMES)}")


def read_run_config(out: Path) -> RunConfig:
    """The config a run directory was written with (its `config.yaml`); a `UserError` when there is none."""
    path = Path(out) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{out} is not a sae-lens-ctx run directory (no {CONFIG_FILE}): "
                        "run `sae-lens-ctx run --out DIR` first")
    return RunConfig.from_yaml(path)
