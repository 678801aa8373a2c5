"""Context look-ups (lookups.py): the exact per-source split of head attribution, the look-up explainer and
its deterministic judge, end to end on the planted models."""

from __future__ import annotations

import pytest
import torch

from sae_lens_ctx.attribute import attribute_prompts, attribute_unit, unit_read
from sae_lens_ctx.config import AttributeConfig, DiscoverConfig, ModelConfig
from sae_lens_ctx.discover import discover_units
from sae_lens_ctx.model import load_model
from sae_lens_ctx.units import SaeSource


def _random_model(arch: str, directory):
    """A tiny random model with every parameter (biases, norm gains) drawn at random, and the planted
    tokenizer: GPT-2 style (LayerNorm, value biases, learned positions) or Llama style (RMSNorm, RoPE,
    GQA 6 query heads on 2 KV heads, gated MLP)."""
    from planted import _build_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=52, n_positions=64, n_embd=48, n_layer=3, n_head=6, n_inner=96,
                                           bos_token_id=1, eos_token_id=2, pad_token_id=3))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=52, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                             num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                                             max_position_embeddings=64, attention_bias=True, bos_token_id=1,
                                             eos_token_id=2, pad_token_id=3))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5) + (1.0 if "norm" in name or "ln" in name else 0.0))
    model.save_pretrained(directory)
    _build_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa"])
def random_dir(request, tmp_path_factory):
    return _random_model("gpt2" if request.param == "gpt2" else "llama", tmp_path_factory.mktemp(request.param))


def _prompts(view, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 2, 7, 12, 20][:n]  # a one-token prompt (with BOS: two positions) up to 20 tokens
    return [[1] + torch.randint(4, 52, (k,), generator=g).tolist() for k in lengths]


@pytest.mark.parametrize("weights", ["folded", "raw"])
def test_per_source_contributions_sum_exactly_to_the_head_attribution(random_dir, weights):
    view = load_model(ModelConfig(model_name=str(random_dir), weights=weights))
    prompts = _prompts(view)
    units = [f"L{l}N{i}" for l in (1, 2) for i in (0, 17, 95)]
    for unit in discover_units(view, DiscoverConfig(unit_ids=units, controls=False))[0]:
        read = unit_read(view, unit, AttributeConfig(include_same_layer=True), {})
        sources: dict = {}
        a, _ = attribute_prompts(view, read, prompts, batch_size=2, sources=sources)
        assert set(sources) == {"attention", *a}
        for branch, attribution in a.items():
            assert sources[branch].shape == (len(prompts), attribution.shape[1], max(map(len, prompts)))
            torch.testing.assert_close(sources[branch].sum(-1), attribution, atol=1e-5, rtol=1e-4)
            assert attribution.abs().max() > 1e-2  # not a trivially zero model
        att = sources["attention"]
        torch.testing.assert_close(att.sum(-1), torch.ones_like(att.sum(-1)))  # each head's row at T sums to 1
        for p, prompt in enumerate(prompts):
            assert (att[p, :, len(prompt):] == 0).all()  # nothing past the prompt's end


def test_per_source_contributions_are_exact_for_sae_latents(random_dir):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    view = load_model(ModelConfig(model_name=str(random_dir)))
    torch.manual_seed(1)
    sae = StandardSAE(StandardSAEConfig(d_in=view.d_model, d_sae=8, metadata=SAEMetadata(hook_name="blocks.2.hook_resid_mid")))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    source = SaeSource.from_sae(sae, sae_id="rand")
    units, _ = discover_units(view, DiscoverConfig(neurons=False, unit_ids=["rand:1", "rand:6"], controls=False),
                              saes=[source])
    for unit in units:
        read = unit_read(view, unit, AttributeConfig(), {"rand": source})
        sources: dict = {}
        a, _ = attribute_prompts(view, read, _prompts(view), batch_size=3, sources=sources)
        torch.testing.assert_close(sources["latent"].sum(-1), a["latent"], atol=1e-5, rtol=1e-4)


# -- the planted models: look-ups, explanations and scores end to end ---------------------------


def _run_planted(plant, tmp_path, **explain):
    import json

    from offline_llm import NAME as OFFLINE_LLM
    from planted import planted_corpus
    from sae_lens_ctx.config import CorpusConfig, ExplainConfig, RunConfig
    from sae_lens_ctx.pipeline import run_pipeline

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in planted_corpus(plant, n_docs=120)))
    cfg = RunConfig(model=ModelConfig(model_name=str(plant.directory)),
                    corpus=CorpusConfig(dataset_path=str(docs), context_size=16, max_tokens=4000, min_documents=10),
                    explain=ExplainConfig(backend=OFFLINE_LLM, **explain))
    out = tmp_path / "run"
    run_pipeline(cfg, out)
    return out


def test_planted_lookups_explanations_and_scores(planted, tmp_path):
    """On each planted model: every active train prompt of a planted pair draws its contribution from the
    pair's trigger; the look-up explanation names that trigger and nothing else; judged on held-out
    prompts its E is >= 0.9 and the shuffled control's <= 0.6."""
    import json

    from sae_lens_ctx.records import iter_jsonl

    out = _run_planted(planted, tmp_path)
    a = planted.answer
    unit = f"L{a.neuron_layer}N{a.neuron_index}"
    trigger = {f"L{l}H{h}": word for (l, h), word in a.heads.items()}
    lookups = [r for r in iter_jsonl(out / "lookups.jsonl") if r["unit_id"] == unit]
    assert {r["head"] for r in lookups} == set(trigger)
    for r in lookups:
        assert abs(sum(s["contribution"] for s in r["sources"]) - r["attribution"]) <= 1e-4 * max(1, abs(r["attribution"]))
        if r["active"]:
            top = r["sources"][0]
            assert top["token"] == trigger[r["head"]] and top["attention"] > 0.8
            assert top["contribution"] > 0.99 * r["attribution"]
    explanations = {e["head"]: e for e in iter_jsonl(out / "explanations.jsonl")
                    if e["unit_id"] == unit and e["explainer"] == "lookup"}
    assert set(explanations) == set(trigger)
    for head, e in explanations.items():
        assert e["status"] == "ok" and e["backend"] == "none"
        assert [t["tokens"] for t in e["pattern"]["tokens"]] == [[trigger[head]]]  # the trigger, nothing else
        assert f'"{trigger[head]}"' in e["text"]
    scores = {(s["head"], s["scorer"]): s for s in iter_jsonl(out / "scores.jsonl")
              if s["unit_id"] == unit and s["explainer"] == "lookup"}
    for head in trigger:
        assert scores[(head, "E")]["value"] >= 0.9 and scores[(head, "E")]["control_kind"] is None
        assert scores[(head, "auroc")]["value"] >= 0.9
        shuffled = scores[(head, "shuffled_E")]
        assert shuffled["control_kind"] == "shuffled" and (shuffled["value"] is None or shuffled["value"] <= 0.6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["explainers"]["lookup"]["E"]["real"]["n"] >= 2
    assert all("lookup_E_mean" in row for row in summary["head_versus_neuron"])
