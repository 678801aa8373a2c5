"""The Python API (sae_lens_ctx/api.py): one code path with the CLI, model and SAE objects, typed results.

* `run` and `sae-lens-ctx run` on the same config write the same run directory (every JSON/JSONL/YAML
  file and every tensor file equal, timing fields aside), on the planted GPT-2 with the embedded LLM.
* A user-built `HookedSAETransformer` with an SAE attached (`model.add_sae`) goes through `run` with no SAE
  file anywhere: its latents are the units, carry the SAE-Lens metadata, are mined with the SAE's own
  encoder and attributed to the planted heads; the SAE is attached again afterwards.
* The stage functions chain in one run directory on a model object and a Python list of documents.
"""

from __future__ import annotations

import doctest
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

import sae_lens_ctx as slc
from sae_lens_ctx import api, results
from sae_lens_ctx.core.errors import UserError

# A hang guard, not a timing assertion: many times what the subprocess takes even on a busy 2-core machine
# (where a bare `sae-lens-ctx --help` once took a minute), so only a hang fails the test.
HANG_GUARD_S = 1800

TIMING_KEYS = {"seconds", "finished_at", "this_run"}  # stages.json: the one place for these


def planted_config(plant, docs=None, **sections) -> slc.RunConfig:
    cfg = slc.RunConfig(
        model=slc.ModelConfig(model_name=str(plant.directory)),
        corpus=slc.CorpusConfig(dataset_path=str(docs) if docs else "embedded", context_size=16, max_tokens=4000,
                                min_documents=10),
        discover=slc.DiscoverConfig(n_last_layers=1, top_k=1),
        mine=slc.MineConfig(top_k=8, n_test_prompts=4, n_random=2),
        attribute=slc.AttributeConfig(n_prompts=8),
        explain=slc.ExplainConfig(n_active=2, n_inactive=2, unit_n_top=2, max_tokens=24),
        score=slc.ScoreConfig(n_prompts=4, bootstrap_resamples=100),
    )
    for name, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, name), key, value)
    return cfg


@pytest.fixture(autouse=True)
def corpus_cache(tmp_path, monkeypatch):
    """Documents given as Python data are written to a content-addressed file: keep it in the test's folder."""
    monkeypatch.setenv("SAE_LENS_CTX_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def documents(planted_gpt2):
    from planted import planted_corpus

    return planted_corpus(planted_gpt2, n_docs=120)


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory, documents):
    path = tmp_path_factory.mktemp("api-docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents))
    return path


def strip_timing(obj):
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if not TIMING_KEYS & set(str(k).split("/"))}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def comparable(out: Path) -> dict[str, object]:
    """Every result file of a run directory, parsed where it is JSON/JSONL/YAML, timing fields removed.
    W&B's folder, the LLM cache (an SQLite file) and rendered images/HTML are left out."""
    files = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if not path.is_file() or rel.startswith("wandb/") or rel.startswith("llm_cache") or \
                path.suffix in (".png", ".html"):
            continue
        if path.suffix == ".jsonl":
            files[rel] = [strip_timing(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
        elif path.suffix == ".json":
            files[rel] = strip_timing(json.loads(path.read_text()))
        elif path.suffix in (".yaml", ".yml"):
            files[rel] = yaml.safe_load(path.read_text())
        else:
            files[rel] = path.read_bytes()
    return files


def test_api_and_cli_write_the_same_run_directory(tmp_path, planted_gpt2, docs_file):
    cfg = planted_config(planted_gpt2, docs_file)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cfg.to_yaml())

    result = slc.run(config=cfg, out=tmp_path / "api")
    assert [s.status for s in result.stages] == ["ran"] * 7
    proc = subprocess.run([shutil.which("sae-lens-ctx") or "sae-lens-ctx", "run", str(config_file), "--out",
                           str(tmp_path / "cli")], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]

    api_files, cli_files = comparable(tmp_path / "api"), comparable(tmp_path / "cli")
    assert sorted(api_files) == sorted(cli_files)
    for name in ("units.jsonl", "contexts.jsonl", "heads.jsonl", "explanations.jsonl", "scores.jsonl",
                 "summary.json", "attributions.safetensors", "config.yaml", "stages.json", "report.json"):
        assert name in api_files, name
    for name in api_files:
        assert api_files[name] == cli_files[name], name

    # the typed results are the run directory's records, and they hold the planted answer
    units = result.units
    assert isinstance(units[0], slc.UnitRecord) and len(units) == 2
    real = [u for u in units if not u.control]
    assert [(u.unit_id, u.token) for u in real] == [("L2N37", " paris")]
    df = result.heads.to_pandas()
    assert len(df) == len(api_files["heads.jsonl"])
    assert set(df[df.relevant & (df.unit_id == "L2N37")]["head"]) == {"L0H3", "L1H5"}
    assert list(result.contexts.to_pandas().activation) == [c["activation"] for c in api_files["contexts.jsonl"]]
    assert result.explanations.text("L2N37") == next(e["text"] for e in api_files["explanations.jsonl"]
                                                      if e["unit_id"] == "L2N37" and e["head"] is None)
    table = result.head_vs_neuron()
    assert {"unit_id", "scorer", "unit_score", "head_score_mean"} <= set(table.columns) and len(table) > 0
    assert slc.open_run(tmp_path / "cli").units.records == units.records
    neuronpedia = slc.to_neuronpedia(result)
    assert [(r["unit_id"], r["layer"], r["index"]) for r in neuronpedia] == [("L2N37", "2-mlp", "37")]
    assert neuronpedia[0]["description"] == result.explanations.text("L2N37")
    assert set(neuronpedia[0]["scores"]) >= {"unit_E", "unit_auroc"}


def planted_sae(view_d_model: int):
    """An SAE on blocks.2.hook_resid_mid with one latent (7) that mirrors the planted neuron: it reads
    sig_a + sig_b (written by the planted heads L0H3 and L1H5) and writes u_target (" paris")."""
    from planted import _u
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name="blocks.2.hook_resid_mid", release="planted-saes", sae_id="resid-mid-2",
                       neuronpedia_id="planted-gpt2/2-res-mid", model_name="planted")
    sae = StandardSAE(StandardSAEConfig(d_in=view_d_model, d_sae=16, metadata=meta))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(16, view_d_model, generator=g) * 0.05)
        sae.W_enc.copy_(torch.randn(view_d_model, 16, generator=g) * 0.05)
        sae.b_dec.zero_()
        sae.b_enc.fill_(-0.1)
        sae.W_dec[7] = 2.0 * _u(5)
        sae.W_enc[:, 7] = _u(3) + _u(4)
    return sae


def test_a_hooked_sae_transformer_with_an_attached_sae_runs_without_a_file(tmp_path, planted_gpt2, documents):
    from planted import hooked_sae_transformer

    model = hooked_sae_transformer(planted_gpt2)
    sae = planted_sae(model.cfg.d_model)
    model.add_sae(sae)
    cfg = planted_config(planted_gpt2, discover={"neurons": False})
    cfg.model.model_name = "embedded"  # the API names the run after the model object

    result = slc.run(model, documents, cfg, out=tmp_path / "run")

    assert list(model.acts_to_saes) == ["blocks.2.hook_resid_mid"] and model.acts_to_saes["blocks.2.hook_resid_mid"] is sae
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    [spec] = saved["discover"]["saes"]
    assert spec.startswith("object:planted-saes/resid-mid-2#")
    assert saved["model"]["model_class"] == "hooked" and saved["model"]["weights"] == "folded"
    assert not [p for p in tmp_path.rglob("*") if p.name in ("cfg.json", "sae_weights.safetensors")]
    assert [p.suffix for p in (tmp_path / "cache" / "corpora").iterdir()] == [".jsonl"]  # the documents, not the SAE
    assert json.loads((tmp_path / "run" / "model.json").read_text())["source"] == "object"

    units = result.units.to_pandas()
    assert set(units.kind) == {"sae_latent"} and len(units) == 2
    best = units[~units.control].iloc[0]
    assert (best.unit_id, best.token, best["index"]) == ("planted-saes/resid-mid-2:7", " paris", 7)
    assert set(units.sae_release) == {"planted-saes"} and set(units.neuronpedia_id) == {"planted-gpt2/2-res-mid"}
    assert set(units.hook_name) == {"blocks.2.hook_resid_mid"}

    # mining used the SAE's own encoder on the model's own (un-spliced) residual stream
    tops = [c for c in result.contexts if c.unit_id == best.unit_id and c.split == "train" and c.kind == "top"]
    assert len(tops) == 8
    bos = model.tokenizer.bos_token_id
    with torch.no_grad():
        for c in tops[:3]:
            _, cache = model.run_with_cache(torch.tensor([[bos, *c.tokens]]))
            acts = cache["blocks.2.hook_resid_mid.hook_sae_acts_post"][0, -1]
            torch.testing.assert_close(acts[7].item(), c.trimmed_activation, atol=1e-4, rtol=1e-4)

    heads = result.heads.to_pandas(with_units=True)
    mine = heads[(heads.unit_id == best.unit_id) & heads.relevant]
    assert set(mine["head"]) == {"L0H3", "L1H5"}
    assert set(heads.sae_id) == {"planted-saes/resid-mid-2"}
    texts = slc.latent_explanations(result)
    assert set(texts) == {7} and texts[7] == result.explanations.text(best.unit_id) and texts[7].strip()
    row = next(r for r in slc.to_neuronpedia(result) if r["index"] == "7")
    assert (row["modelId"], row["layer"], row["sae_id"]) == ("planted-gpt2", "2-res-mid", "planted-saes/resid-mid-2")
    assert len(result.scores) > 0

    # the run directory names the SAE it cannot load: a CLI stage on it says to pass the object again
    from sae_lens_ctx.cli import main

    assert main(["attribute", "--out", str(tmp_path / "run"), "--force"]) == 2


def test_stage_functions_chain_in_one_run_directory(tmp_path, planted_gpt2, documents):
    from planted import hooked_transformer

    model = hooked_transformer(planted_gpt2)
    cfg = planted_config(planted_gpt2)
    cfg.model.model_name = "planted-gpt2"
    units = slc.find_next_token_units(model, layers=[2], corpus=documents, config=cfg, out=tmp_path / "run")
    assert units.out == tmp_path / "run" and [u.unit_id for u in units if not u.control] == ["L2N37"]
    contexts = slc.mine_contexts(units, top_k=6)
    heads = slc.attribute_heads(contexts, rule="top3-positive")
    assert contexts.out == heads.out == units.out
    saved = slc.open_run(units.out).config
    assert (saved.mine.top_k, saved.attribute.rule, saved.discover.layers) == (6, "top3-positive", [2])
    assert len([c for c in contexts if c.unit_id == "L2N37" and c.split == "train" and c.kind == "top"]) == 6
    assert {h.head for h in heads.relevant() if h.unit_id == "L2N37"} >= {"L0H3", "L1H5"}
    # up to date: nothing re-runs, and the same records come back
    again = slc.attribute_heads(heads, rule="top3-positive")
    assert [s.status for s in again._session.stages] == ["skipped"] * 4
    assert again.records == heads.records
    # explicit unit ids start a new run directory with exactly those units
    only = slc.mine_contexts(model, ["L2N37"], documents, config=cfg, out=tmp_path / "ids")
    assert {c.unit_id for c in only} == {"L2N37"}
    assert json.loads((tmp_path / "ids" / "model.json").read_text())["model_name"] == "planted-gpt2"
    with pytest.raises(UserError, match="did you mean 'mine.top_k'"):
        slc.mine_contexts(units, topk=3)


def test_docstring_examples():
    tried = failures = 0
    for module in (api, results):
        f, t = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.IGNORE_EXCEPTION_DETAIL)
        failures, tried = failures + f, tried + t
    assert tried >= 4 and failures == 0
