"""The paper-size preset's bad input: more tokens than the corpus has, more units than a layer holds, a layer the
model does not have: one line before any model loads, saying what is available (pipeline/preflight.py)."""

import json
from pathlib import Path

import pytest

from sae_lens_ctx.cli import main
from sae_lens_ctx.core.config import RunConfig
from sae_lens_ctx.core.errors import UserError
from sae_lens_ctx.core.records import UnitRecord
from sae_lens_ctx.inputs.corpus import EMBEDDED_TEXT_TOKENS, embedded_corpus_tokens
from sae_lens_ctx.pipeline.preflight import check_sizes, model_sizes
from sae_lens_ctx.stages.explain.sample import llm_sample

PRESET = Path(__file__).resolve().parents[2] / "wandb_configs" / "embedded-paper-size.yaml"


def test_the_preset_is_paper_size_and_fits_the_embedded_corpus_and_model():
    cfg = RunConfig.from_yaml(PRESET)
    cfg.validate()
    assert (cfg.discover.n_last_layers, cfg.discover.top_k, cfg.discover.controls) == (5, 20, True)
    assert (cfg.mine.top_k, cfg.mine.n_test_prompts) == (20, 10)
    assert 0.8 * cfg.corpus.max_tokens >= 500_000  # the train side: 80 % of the budget
    assert cfg.explain.llm_units > 0
    check_sizes(cfg)  # fits: no error
    assert embedded_corpus_tokens(64) == EMBEDDED_TEXT_TOKENS + 37_674  # one BOS per 63 text tokens


def test_more_tokens_than_the_embedded_corpus_has_is_one_line_naming_what_there_is(capsys):
    code = main(["run", str(PRESET), "--out", "/nonexistent/never-written", "corpus.max_tokens=5000000"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "corpus.max_tokens=5,000,000" in err and f"{embedded_corpus_tokens(64):,}" in err
    assert not Path("/nonexistent/never-written").exists()


def test_more_units_than_a_layer_holds_and_more_layers_than_the_model_has():
    cfg = RunConfig.from_yaml(PRESET)
    cfg.discover.top_k = 1000  # with as many controls: 2,000 neurons of a 1,536-neuron layer
    with pytest.raises(UserError, match="a layer holds 1,536: set discover.top_k to 768 or less"):
        check_sizes(cfg)
    cfg = RunConfig.from_yaml(PRESET)
    cfg.discover.layers = [29, 30]
    with pytest.raises(UserError, match=r"discover.layers \[30\] do not exist: the model has layers 0..29"):
        check_sizes(cfg)


def test_sizes_from_a_model_directory_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"n_layer": 12, "n_embd": 768, "n_inner": None}))
    cfg = RunConfig()
    cfg.model.model_name = str(tmp_path)
    assert model_sizes(cfg) == {"n_layers": 12, "d_mlp": 3072}  # GPT-2: 4 × n_embd


def unit(i, control):
    return UnitRecord(unit_id=f"L1N{i}", kind="neuron", layer=1, index=i, hook_name="blocks.1.mlp.hook_post",
                      token_id=0, token="", congruence=0.0, control=control, direction="promote", rank_in_layer=1)


def test_the_llm_sample_is_seeded_half_controls_and_order_free():
    units = [unit(i, i % 2 == 1) for i in range(40)]
    chosen = llm_sample(units, 10, seed=0)
    assert len(chosen) == 10 and sum(u.control for u in units if u.unit_id in chosen) == 5
    assert llm_sample(list(reversed(units)), 10, seed=0) == chosen and llm_sample(units, 10, seed=1) != chosen
    assert llm_sample(units, 0, seed=0) == {u.unit_id for u in units}
