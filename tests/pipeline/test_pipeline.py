"""The run directory: config.yaml, fingerprints, skip / re-run / refuse, and stages not built yet."""

import json

import pytest
import yaml

from offline_llm import NAME as OFFLINE_LLM
from sae_lens_ctx.core.config import CorpusConfig, ExplainConfig, ModelConfig, RunConfig
from sae_lens_ctx.core.errors import UserError
from sae_lens_ctx.core.layout import MANIFEST, RESULTS_FORMAT
from sae_lens_ctx.pipeline.engine import STAGES, run_pipeline
from sae_lens_ctx.core.records import iter_jsonl


def planted_config(plant, corpus_file, **corpus):
    return RunConfig(model=ModelConfig(model_name=str(plant.directory)),
                     corpus=CorpusConfig(dataset_path=str(corpus_file), context_size=16, max_tokens=4000,
                                         min_documents=10, **corpus),
                     explain=ExplainConfig(backend=OFFLINE_LLM))


@pytest.fixture
def corpus_file(tmp_path, planted_gpt2):
    from planted import planted_corpus

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in planted_corpus(planted_gpt2, n_docs=120)))
    return path


def statuses(results):
    return {r.name: r.status for r in results}


def test_run_writes_the_contract_and_skips_when_up_to_date(tmp_path, planted_gpt2, corpus_file):
    out = tmp_path / "run"
    cfg = planted_config(planted_gpt2, corpus_file)
    first = statuses(run_pipeline(cfg, out))
    assert first["load"] == "ran"
    assert all(first[name] == "not built yet" for name, s in STAGES.items() if s.run is None)
    assert RunConfig.from_yaml(out / "config.yaml") == cfg
    model = json.loads((out / "model.json").read_text())
    assert model["weights"] == "folded" and model["n_layers"] == planted_gpt2.hf_model.config.n_layer
    docs = list(iter_jsonl(out / "documents.jsonl"))
    assert {d["split"] for d in docs} == {"train", "test"}
    assert len({d["doc_id"] for d in docs}) == len(docs)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["results_format"] == RESULTS_FORMAT and "load" in manifest["stages"]

    def files():  # every file, in subfolders too (the report stage writes report/ and plots/)
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != MANIFEST}

    before = files()
    assert statuses(run_pipeline(cfg, out))["load"] == "skipped"
    assert files() == before  # the report stage re-runs every time, and writes the same bytes

    # a changed corpus setting re-runs the stage it affects
    cfg.corpus.split_salt = "another"
    assert statuses(run_pipeline(cfg, out))["load"] == "ran"
    assert yaml.safe_load((out / "config.yaml").read_text())["corpus"]["split_salt"] == "another"


def test_a_different_run_is_refused_unless_overwrite(tmp_path, planted_gpt2, planted_llama, corpus_file):
    out = tmp_path / "run"
    run_pipeline(planted_config(planted_gpt2, corpus_file), out)
    other = planted_config(planted_llama, corpus_file)
    with pytest.raises(UserError, match="different run"):
        run_pipeline(other, out)
    assert statuses(run_pipeline(other, out, overwrite=True))["load"] == "ran"
    assert json.loads((out / "model.json").read_text())["architecture"] == "gated-mlp"


def test_foreign_and_incompatible_directories_are_refused(tmp_path, planted_gpt2, corpus_file):
    cfg = planted_config(planted_gpt2, corpus_file)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        run_pipeline(cfg, foreign)
    hidden = tmp_path / "hidden"  # a user's own dot-file is not one of our temporary files: refused, kept
    hidden.mkdir()
    (hidden / ".notes.tmp").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        run_pipeline(cfg, hidden)
    assert (hidden / ".notes.tmp").read_text() == "mine"
    old = tmp_path / "old"
    run_pipeline(cfg, old)
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["results_format"] = RESULTS_FORMAT + 99
    (old / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="incompatible version"):
        run_pipeline(cfg, old)


def test_a_directory_of_an_older_results_format_re_runs_its_stages(tmp_path, planted_gpt2, corpus_file, monkeypatch,
                                                                   caplog):
    """A run directory as the code of results format 1 left it (its manifest says format 1 and holds the
    fingerprints that code computed) is not refused: its manifest is upgraded, every stage re-runs, and one
    log line says which and why; the next invocation skips them."""
    from sae_lens_ctx.pipeline import engine

    out = tmp_path / "run"
    cfg = planted_config(planted_gpt2, corpus_file)
    assert set(statuses(run_pipeline(cfg, out, until="discover")).values()) == {"ran"}
    manifest = json.loads((out / MANIFEST).read_text())
    current = engine.stage_fingerprints(cfg, manifest["inputs"])
    monkeypatch.setattr(engine, "RESULTS_FORMAT", 1)
    old = engine.stage_fingerprints(cfg, manifest["inputs"])  # what the format-1 code recorded
    monkeypatch.undo()
    assert all(old[n] != current[n] for n in ("load", "discover"))
    for name, entry in manifest["stages"].items():
        entry["fingerprint"] = old[name]
    (out / MANIFEST).write_text(json.dumps({**manifest, "results_format": 1}))
    with caplog.at_level("INFO", logger="sae_lens_ctx.pipeline.engine"):
        assert statuses(run_pipeline(cfg, out, until="discover")) == {"load": "ran", "discover": "ran"}
    said = [r.getMessage() for r in caplog.records if "results format 1" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith("re-running load, discover")
    upgraded = json.loads((out / MANIFEST).read_text())
    assert upgraded["results_format"] == RESULTS_FORMAT
    assert {n: e["fingerprint"] for n, e in upgraded["stages"].items()} == {n: current[n] for n in ("load", "discover")}
    assert set(statuses(run_pipeline(cfg, out, until="discover")).values()) == {"skipped"}


def test_a_stage_alone_needs_its_upstream(tmp_path, planted_gpt2, corpus_file):
    from sae_lens_ctx.pipeline.engine import Stage, register_stage

    calls = []
    probe = Stage("probe-stage", ("probe.txt",), ("seed",), lambda ctx: (calls.append(1),
                  ctx.path("probe.txt").write_text(str(ctx.config.seed))), "test stage")
    register_stage(probe)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_stage(probe)
        cfg = planted_config(planted_gpt2, corpus_file)
        out = tmp_path / "run"
        with pytest.raises(UserError, match="needs stage 'load'"):
            run_pipeline(cfg, out, only="probe-stage")
    finally:
        STAGES.pop("probe-stage")
    assert calls == []


def test_the_whole_pipeline_recovers_and_explains_the_planted_heads(tmp_path, planted_gpt2, corpus_file):
    """load → ... → score on the planted GPT-2, with the tests' offline contrastive explainer and
    keyword judge (tests/support/offline_llm.py): the planted unit's two heads are its relevant heads, each
    explanation names its head's trigger, and that explanation predicts the head's held-out activity."""
    cfg = planted_config(planted_gpt2, corpus_file)
    out = tmp_path / "run"
    assert all(s == "ran" for s in statuses(run_pipeline(cfg, out)).values())
    answer = planted_gpt2.answer
    unit = f"L{answer.neuron_layer}N{answer.neuron_index}"
    planted = {f"L{l}H{h}": word for (l, h), word in answer.trigger_words.items()}
    relevant = {h["head"] for h in iter_jsonl(out / "heads.jsonl") if h["unit_id"] == unit and h["relevant"]}
    assert relevant == set(planted)
    explained = {e["head"]: e["text"] for e in iter_jsonl(out / "explanations.jsonl")
                 if e["unit_id"] == unit and e["head"] and e["explainer"] != "lookup"}
    assert explained == {head: f"the document mentions {word}" for head, word in planted.items()}
    scores = {(s["head"], s["scorer"]): s for s in iter_jsonl(out / "scores.jsonl")
              if s["unit_id"] == unit and s["explainer"] != "lookup" and s["control_kind"] not in ("length", "token")}
    for head in planted:
        assert scores[(head, "E")]["value"] >= 0.9 and scores[(head, "auroc")]["value"] >= 0.9, scores[(head, "E")]
        assert scores[(head, "shuffled_E")]["value"] is None or scores[(head, "shuffled_E")]["value"] < 0.9
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["failed"] == 0 and summary["headline"]["E"]["real"]["n"] >= 2
    assert (out / "report" / "index.html").is_file()
