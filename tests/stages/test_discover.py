"""Discovery: planted neurons and latents found exactly, vectorised == naive, glitch filter, controls."""

import json

import numpy as np
import pytest
import scipy.stats
import torch

from sae_lens_ctx.core.config import DiscoverConfig, ModelConfig, RunConfig, CorpusConfig
from sae_lens_ctx.stages.discover import congruence_stats, decode_vocab, discover_units, flag_glitch_tokens
from sae_lens_ctx.core.errors import UserError
from sae_lens_ctx.inputs.model import load_model
from sae_lens_ctx.pipeline.engine import run_pipeline
from sae_lens_ctx.core.records import iter_jsonl
from sae_lens_ctx.inputs.sae import SaeSource

ALL_UNITS = dict(threshold=-1e9, token_filter=False, glitch_filter=False, controls=False)
"""A discover config that keeps every unit of the scored layers (for exhaustive comparisons)."""


def hand_congruence(hf_model, layer, folded):
    """`[d_mlp, V]` write · W_U straight from the HF weights: final norm gain applied by hand; the folded
    convention also centres the writes (LayerNorm models) and the unembedding over the vocabulary."""
    if hf_model.config.model_type == "gpt2":
        w_out = hf_model.transformer.h[layer].mlp.c_proj.weight.detach()          # Conv1D: [d_mlp, d_model]
        gain = hf_model.transformer.ln_f.weight.detach()
        layer_norm = True
    else:
        w_out = hf_model.model.layers[layer].mlp.down_proj.weight.detach().T     # [d_mlp, d_model]
        gain = hf_model.model.norm.weight.detach()
        layer_norm = False
    w_u = gain[:, None] * hf_model.lm_head.weight.detach().T
    if folded:
        if layer_norm:
            w_out = w_out - w_out.mean(-1, keepdim=True)
        w_u = w_u - w_u.mean(-1, keepdim=True)
    return (w_out @ w_u).double()


@pytest.mark.parametrize("weights", ["folded", "raw"])
def test_planted_neuron_is_rank_one_with_its_token_and_exact_congruence(planted, weights):
    answer = planted.answer
    view = load_model(ModelConfig(model_name=str(planted.directory), weights=weights))
    cfg = DiscoverConfig(layers=[answer.neuron_layer], top_k=1, token_filter=True, glitch_filter=True,
                         controls=False)
    units, _ = discover_units(view, cfg)
    (unit,) = units
    assert (unit.layer, unit.index, unit.rank_in_layer) == (answer.neuron_layer, answer.neuron_index, 1)
    assert (unit.token_id, unit.token) == (answer.target_token_id, answer.target_token)
    expected = hand_congruence(planted.hf_model, answer.neuron_layer, folded=weights == "folded")
    assert np.isclose(unit.congruence, float(expected[answer.neuron_index].max()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", ["folded", "raw"])
def test_vectorised_scores_equal_a_naive_loop(planted_gpt2, weights):
    """Every neuron of every layer of a model whose other weights are random: top-5, min, kurtosis, skew."""
    view = load_model(ModelConfig(model_name=str(planted_gpt2.directory), weights=weights))
    units, _ = discover_units(view, DiscoverConfig(layers=[0, 1, 2], unit_chunk=7, vocab_chunk=13, **ALL_UNITS))
    assert len(units) == 3 * view.d_mlp
    for layer in range(3):
        naive = hand_congruence(planted_gpt2.hf_model, layer, folded=weights == "folded").numpy()
        for u in (u for u in units if u.layer == layer):
            row = naive[u.index]
            order = np.argsort(-row, kind="stable")[:5]
            assert np.isclose(row[u.token_id], row[order[0]], rtol=1e-5, atol=1e-6)  # ties may pick either
            np.testing.assert_allclose([v for _, v in u.top_tokens], row[order], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(u.min_value, row.min(), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(u.kurtosis, scipy.stats.kurtosis(row), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(u.skew, scipy.stats.skew(row), rtol=1e-4, atol=1e-4)


def test_congruence_stats_chunking_is_exact():
    g = torch.Generator().manual_seed(0)
    write, unembed = torch.randn(37, 16, generator=g), torch.randn(16, 101, generator=g)
    full = (write @ unembed).double().numpy()
    for unit_chunk, vocab_chunk in [(37, 101), (5, 9), (1, 1000)]:
        stats = congruence_stats(write, unembed, unit_chunk, vocab_chunk)
        np.testing.assert_allclose(stats.top_values, -np.sort(-full, axis=1)[:, :5], rtol=1e-5)
        np.testing.assert_array_equal(stats.top_tokens[:, 0], full.argmax(1))
        np.testing.assert_array_equal(stats.bottom_tokens[:, 0], full.argmin(1))
        np.testing.assert_allclose(stats.kurtosis, scipy.stats.kurtosis(full, axis=1), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats.skew, scipy.stats.skew(full, axis=1), rtol=1e-5, atol=1e-5)


def test_under_trained_tokens_are_flagged_and_ordinary_ones_are_not(planted_gpt2, tmp_path):
    """Random 'trained' embedding rows, three rows left at initialisation scale: those three, and only
    they, are flagged as low-norm."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = planted_gpt2.tokenizer
    g = torch.Generator().manual_seed(3)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=1, n_head=2))
    untrained = [11, 23, 40]
    with torch.no_grad():
        model.transformer.wte.weight.copy_(torch.randn(len(tok), 32, generator=g))
        model.transformer.wte.weight[untrained] = 0.02 * torch.randn(len(untrained), 32, generator=g)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    view = load_model(ModelConfig(model_name=str(tmp_path), weights="raw"))
    flagged = flag_glitch_tokens(view, decode_vocab(tok, view.d_vocab))
    low_norm = sorted(f.token_id for f in flagged if f.reason == "low-norm")
    assert low_norm == untrained
    assert all(f.score < -4 for f in flagged if f.reason == "low-norm")


def test_planted_sae_latent_is_found_with_its_token(planted, tmp_path):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    view = load_model(ModelConfig(model_name=str(planted.directory)))
    unembed = view.unembed()
    token = planted.answer.target_token_id
    cfg = StandardSAEConfig(d_in=view.d_model, d_sae=48, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post"))
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_dec.mul_(0.01)
        sae.W_dec[17] = 3.0 * unembed[:, token] / unembed[:, token].norm()
    sae.save_model(str(tmp_path / "planted-sae"))
    source = SaeSource.load(str(tmp_path / "planted-sae"))
    assert (source.sae_id, source.layer, source.hook_kind) == ("planted-sae", 1, "hook_resid_post")
    units, _ = discover_units(view, DiscoverConfig(neurons=False, top_k=1, controls=False), saes=[source])
    (unit,) = units
    assert (unit.unit_id, unit.kind, unit.token_id, unit.rank_in_layer) == ("planted-sae:17", "sae_latent", token, 1)


def test_controls_are_seeded(planted_gpt2):
    view = load_model(ModelConfig(model_name=str(planted_gpt2.directory)))
    cfg = DiscoverConfig(layers=[1, 2], top_k=3, token_filter=False, glitch_filter=False)
    draw = lambda seed: [u.unit_id for u in discover_units(view, cfg, seed=seed)[0] if u.control]  # noqa: E731
    first, again, other = draw(0), draw(0), draw(1)
    assert first == again and first != other
    assert len(first) == 6 and sum(u.startswith("L1N") for u in first) == 3
    chosen = {u.unit_id for u in discover_units(view, cfg, seed=0)[0] if not u.control}
    assert not chosen & set(first)


@pytest.mark.parametrize("cfg, words", [
    (DiscoverConfig(layers=[7]), ["layer 7", "0..2"]),
    (DiscoverConfig(layers=[2], top_k=100000), ["top_k=100000", "lower"]),
    (DiscoverConfig(unit_ids=["L2N99999"]), ["L2N99999", "does not exist"]),
    (DiscoverConfig(unit_ids=["L9N1"]), ["layer 9"]),
])
def test_bad_discover_input(planted_gpt2, cfg, words):
    view = load_model(ModelConfig(model_name=str(planted_gpt2.directory)))
    with pytest.raises(UserError) as e:
        discover_units(view, cfg)
    for word in words:
        assert word in str(e.value)


def test_bad_sae_input(planted_gpt2, tmp_path):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    view = load_model(ModelConfig(model_name=str(planted_gpt2.directory)))
    with pytest.raises(UserError, match="does not exist"):
        SaeSource.load(str(tmp_path / "missing-sae"))
    wrong = StandardSAE(StandardSAEConfig(d_in=view.d_model + 1, d_sae=8,
                                          metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post")))
    wrong.save_model(str(tmp_path / "wrong"))
    with pytest.raises(UserError, match="d_in=65"):
        discover_units(view, DiscoverConfig(neurons=False), saes=[SaeSource.load(str(tmp_path / "wrong"))])
    (tmp_path / "wrong" / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="could not be loaded"):
        SaeSource.load(str(tmp_path / "wrong"))


def test_discover_stage_writes_units_and_vocab_filter(planted_gpt2, tmp_path):
    from planted import planted_corpus

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in planted_corpus(planted_gpt2, n_docs=80)))
    cfg = RunConfig(model=ModelConfig(model_name=str(planted_gpt2.directory)),
                    corpus=CorpusConfig(dataset_path=str(docs), context_size=16, min_documents=10),
                    discover=DiscoverConfig(n_last_layers=1, top_k=1))
    out = tmp_path / "run"
    results = {r.name: r.status for r in run_pipeline(cfg, out)}
    assert results["discover"] == "ran"
    units = list(iter_jsonl(out / "units.jsonl"))
    real = [u for u in units if not u["control"]]
    assert [u["unit_id"] for u in real] == [f"L{planted_gpt2.answer.neuron_layer}N{planted_gpt2.answer.neuron_index}"]
    assert sum(u["control"] for u in units) == 1
    for key in ("unit_id", "kind", "layer", "index", "token_id", "token", "congruence", "control"):
        assert key in units[0]
    assert (out / "vocab_filter.jsonl").exists()


@pytest.mark.embedded
def test_embedded_discovery_finds_readable_tokens(embedded_view):
    units, flagged = discover_units(embedded_view, DiscoverConfig(top_k=4))
    real = [u for u in units if not u.control]
    assert len(real) == 3 * 4 and len(units) == 2 * len(real)
    for u in real:
        assert u.token.startswith(" ") and u.token.strip().isprintable() and "\ufffd" not in u.token
        assert any(ch.isalpha() for ch in u.token)
        assert u.kurtosis > 0 and u.congruence > 5
    assert all(f.reason for f in flagged)
