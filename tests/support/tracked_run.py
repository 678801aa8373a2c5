"""A run directory on the planted GPT-2 for the tracking and report tests, built once per session.

load, discover, mine and attribute are the real stages. explain and score files are written here in
their record formats (`ExplanationRecord`, `ScoreRecord`): these tests are about showing records, not
making them (tests/stages/test_explain.py and tests/stages/test_score.py make them). The
records carry hostile text (markup, entities, quotes, non-ASCII) so that escaping is tested end to end;
one extra context line does too (its tokens do not spell its text, so it is shown as plain text).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sae_lens_ctx.core.config import CorpusConfig, DiscoverConfig, ModelConfig, RunConfig
from sae_lens_ctx.pipeline.engine import run_pipeline
from sae_lens_ctx.core.records import ExplanationRecord, ScoreRecord, write_jsonl

NASTY = "<script>alert(1)</script> &amp; \"double\" 'single' café ☕ 日本語 </span><b>"
"""Hostile text: must render inert and readable everywhere."""

FAST_WANDB = dict(x_disable_stats=True, x_disable_meta=True, console="off", save_code=False, disable_git=True)
"""wandb.Settings for a fast offline run (ecosystem-notes §4.1)."""

STAGE_FILES = {
    "load": ("config.yaml", "stages.json", "model.json", "documents.jsonl", "corpus.json"),
    "discover": ("units.jsonl", "vocab_filter.jsonl"),
    "mine": ("contexts.jsonl", "context_acts.safetensors", "mine.json"),
    "attribute": ("heads.jsonl", "attributions.safetensors", "attribute.json", "lookups.jsonl", "qk.jsonl",
                  "occlusions.jsonl"),
    "explain": ("explanations.jsonl",),
    "score": ("scores.jsonl", "summary.json"),
}
"""What each stage leaves in the run directory (explain and score: as written below)."""

_built: dict[str, Path] = {}


def planted_config(plant, docs: Path) -> RunConfig:
    return RunConfig(model=ModelConfig(model_name=str(plant.directory)),
                     corpus=CorpusConfig(dataset_path=str(docs), context_size=16, min_documents=10, max_tokens=4000),
                     discover=DiscoverConfig(n_last_layers=1, top_k=1))


def build(plant, root: Path) -> Path:
    """The run directory (built on first use; callers copy it before writing into it)."""
    key = str(plant.directory)
    if key in _built:
        return _built[key]
    from planted import planted_corpus

    root.mkdir(parents=True, exist_ok=True)
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in planted_corpus(plant, n_docs=120)))
    out = root / "run"
    cfg = planted_config(plant, docs)
    for stage in ("load", "discover", "mine", "attribute"):
        run_pipeline(cfg, out, only=stage)
    _add_nasty_context(out)
    control = next(u["unit_id"] for u in map(json.loads, open(out / "units.jsonl")) if u["control"])
    write_jsonl(out / "explanations.jsonl", explanations(control))
    write_jsonl(out / "scores.jsonl", scores(control))
    (out / "summary.json").write_text(json.dumps({"E": {"heads_mean": 0.8, "heads_mean_control": 0.5}}) + "\n")
    _built[key] = out
    return out


def copy_run(src: Path, dest: Path, upto: str | None = None) -> Path:
    """A copy of the run directory, with only the files of the stages up to `upto` (all by default)."""
    if upto is None:
        shutil.copytree(src, dest)
        return dest
    dest.mkdir(parents=True)
    for stage, files in STAGE_FILES.items():
        for name in files:
            shutil.copy2(src / name, dest / name)
        if stage == upto:
            break
    return dest


def _add_nasty_context(out: Path) -> None:
    with open(out / "contexts.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({
            "unit_id": "L2N37", "split": "train", "kind": "top", "rank": 99, "doc_id": "nasty", "context_index": 0,
            "start": 0, "end": 3, "text": NASTY, "tokens": [5, 12, 13], "activation": 1.0, "trimmed_activation": 1.0,
            "next_token_id": None, "next_token": None}, ensure_ascii=False) + "\n")


def _explanation(unit_id, head, text, status="ok", error=None, cost=0.001):
    return ExplanationRecord(unit_id=unit_id, head=head, explainer="paper-round2" if head else "neuron-explainer",
                             text=text, status=status, error=error, backend="openai", model="gpt-4o-mini",
                             prompt_hash="0123456789abcdef", prompt_tokens=600, completion_tokens=40, cost_usd=cost)


def explanations(control: str) -> list[ExplanationRecord]:
    return [
        _explanation("L2N37", "L0H3", "Active when the document mentions france earlier. " + NASTY),
        _explanation("L2N37", "L1H5", "Active after the word louvre."),
        _explanation("L2N37", None, "predicts paris after a French landmark"),
        _explanation(control, "L0H0", None, status="failed", error="timeout: no answer in 120 s", cost=None),
    ]


def scores(control: str) -> list[ScoreRecord]:
    """Score rows in the score stage's record format (`ScoreRecord`), a unit's own beside its heads'."""
    rows = []
    for scorer, shift in (("E", 0.0), ("auroc", 0.05)):
        for unit_id, head, value, low, high in (("L2N37", "L0H3", 0.9 + shift, 0.7, 1.0),
                                                ("L2N37", "L1H5", 0.8 + shift, 0.6, 0.95),
                                                ("L2N37", None, 0.6 + shift, 0.4, 0.8),
                                                (control, "L0H0", 0.5, 0.3, 0.7),
                                                (control, None, 0.45, 0.3, 0.6)):
            rows.append(ScoreRecord(unit_id=unit_id, head=head, scorer=scorer if head else f"unit_{scorer}",
                                    value=value, ci_low=low, ci_high=high, n=10, control=unit_id == control,
                                    n_positive=5, n_negative=5, n_parsed=10))
    return rows


def full_run(plant, root: Path) -> Path:
    """Every stage, the real ones, on the planted model with the offline test LLM (`offline_llm`): a run whose
    look-up explanations name the planted triggers and score E = 1 on held-out prompts (its findings)."""
    from offline_llm import NAME as OFFLINE_LLM
    from planted import planted_corpus
    from sae_lens_ctx.core.config import ExplainConfig

    root.mkdir(parents=True, exist_ok=True)
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in planted_corpus(plant, n_docs=120)))
    cfg = RunConfig(model=ModelConfig(model_name=str(plant.directory)),
                    corpus=CorpusConfig(dataset_path=str(docs), context_size=16, max_tokens=4000, min_documents=10),
                    explain=ExplainConfig(backend=OFFLINE_LLM))
    cfg.logging.log_to_wandb = False
    out = root / "run"
    run_pipeline(cfg, out)
    return out
