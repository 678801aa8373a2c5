"""Attribution: planted heads recovered exactly, exact decomposition, batched == full-cache reference, ablation."""

import numpy as np
import pytest
import scipy.stats
import torch

from sae_lens_ctx.stages.attribute import (ablation_drops, attribute_prompts, attribute_unit, decompose_pre_activation, unit_read)
from sae_lens_ctx.core.rules import parse_rule
from sae_lens_ctx.core.config import AttributeConfig, DiscoverConfig, ModelConfig, RunConfig
from sae_lens_ctx.stages.discover import discover_units
from sae_lens_ctx.core.errors import UserError
from sae_lens_ctx.inputs.model import ModelView, load_model
from sae_lens_ctx.inputs.sae import SaeSource


def planted_unit(view, plant):
    units, _ = discover_units(view, DiscoverConfig(layers=[plant.answer.neuron_layer], top_k=1, controls=False))
    return units[0]


def trigger_prompts(view, plant, n_per_trigger=10, seed=0):
    """Planted-corpus documents that hold a trigger, as BOS + tokens, and which planted head each belongs to.
    The neuron fires at each document's last token (a trigger is never the last word)."""
    from planted import planted_corpus

    by_head = {h: [] for h in plant.answer.heads}
    for doc in planted_corpus(plant, n_docs=200, seed=seed):
        for head, word in plant.answer.trigger_words.items():
            if word in doc.split() and len(by_head[head]) < n_per_trigger:
                by_head[head].append(view.to_tokens(doc)[0].tolist())
    prompts, owner = [], []
    for head, docs in by_head.items():
        prompts += docs
        owner += [head] * len(docs)
    order = np.random.default_rng(seed).permutation(len(prompts))
    return [prompts[i] for i in order], [owner[i] for i in order]


@pytest.mark.parametrize("rule", ["mean+2std", "mean+2std-positive", "top3-positive"])
def test_planted_heads_are_the_only_relevant_heads(planted, rule):
    view = load_model(ModelConfig(model_name=str(planted.directory)))
    unit = planted_unit(view, planted)
    cfg = AttributeConfig(rule=rule)
    read = unit_read(view, unit, cfg, {})
    train, owner = trigger_prompts(view, planted, seed=0)
    test, test_owner = trigger_prompts(view, planted, seed=1)
    records, _, summary = attribute_unit(view, read, train, test, list(range(len(train))), list(range(len(test))), cfg)
    relevant = {(r.layer, r.head_index): r for r in records if r.relevant}
    assert set(relevant) == set(planted.answer.heads)
    for head, r in relevant.items():
        assert r.active_train_ranks == [i for i, o in enumerate(owner) if o == head]  # exactly its trigger prompts
        assert r.active_test_ranks == [i for i, o in enumerate(test_owner) if o == head]
        assert 0.25 <= r.active_fraction <= 0.75
        # ablation: the head's own prompts lose most of the neuron's activation, the others nothing
        assert r.act_drop_active > 0.5 and abs(r.act_drop_inactive) < 1e-3 * r.act_drop_active
        assert r.ablation_pvalue < 0.01
    assert all(r.active_fraction == 0 for r in records if (r.layer, r.head_index) in planted.answer.silent_heads)
    assert summary["n_relevant"] == 2 and summary["direct_head_fraction"] == pytest.approx(1.0, abs=1e-3)


def test_ablating_a_silent_head_does_little(planted):
    view = load_model(ModelConfig(model_name=str(planted.directory)))
    unit = planted_unit(view, planted)
    read = unit_read(view, unit, AttributeConfig(), {})
    prompts, owner = trigger_prompts(view, planted)
    head_a = next(iter(planted.answer.heads))
    silent = planted.answer.silent_heads[len(planted.answer.silent_heads) // 2]
    _, act_drop = ablation_drops(view, read, prompts, [head_a, silent])
    on_a = torch.tensor([o == head_a for o in owner])
    planted_drop, silent_drop = act_drop[on_a, 0].mean(), act_drop[on_a, 1].abs().mean()
    assert planted_drop > 0.5 and silent_drop < 0.05 * planted_drop


def test_ks_across_a_set_of_planted_pairs(tmp_path):
    """Per-pair mean probability drops where the head is active vs inactive, over planted models of both
    architectures and three seeds (12 pairs): the paper's two-sample KS test separates them."""
    from planted import make_planted

    active, inactive = [], []
    for arch in ("gpt2", "llama"):
        for seed in range(3):
            plant = make_planted(arch, tmp_path / f"{arch}-{seed}", seed=seed)
            view = load_model(ModelConfig(model_name=str(plant.directory)))
            read = unit_read(view, planted_unit(view, plant), AttributeConfig(), {})
            prompts, owner = trigger_prompts(view, plant, n_per_trigger=6, seed=seed)
            heads = list(plant.answer.heads)
            prob_drop, _ = ablation_drops(view, read, prompts, heads)
            for j, head in enumerate(heads):
                on = torch.tensor([o == head for o in owner])
                active.append(float(prob_drop[on, j].mean()))
                inactive.append(float(prob_drop[~on, j].mean()))
    assert scipy.stats.ks_2samp(active, inactive).pvalue < 0.01
    assert min(active) > max(inactive)


@pytest.mark.parametrize("weights", ["folded", "raw"])
def test_decomposition_is_exact_for_neurons(planted, weights):
    view = load_model(ModelConfig(model_name=str(planted.directory), weights=weights))
    prompts, _ = trigger_prompts(view, planted, n_per_trigger=2)
    branches = ["gate", "up"] if view.gated else ["in"]
    for layer in range(view.n_layers):
        for index in (0, planted.answer.neuron_index, view.d_mlp - 1):
            unit = discover_units(view, DiscoverConfig(unit_ids=[f"L{layer}N{index}"], controls=False))[0][0]
            read = unit_read(view, unit, AttributeConfig(include_same_layer=True), {})
            for branch in branches:
                for p in prompts[:2]:
                    labels, contrib, reference = decompose_pre_activation(view, read, torch.tensor(p), branch)
                    assert labels[0] == "embed" and labels[-1] == "const"
                    torch.testing.assert_close(contrib.sum(0), reference, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("hook", ["hook_resid_pre", "hook_resid_mid", "hook_resid_post"])
def test_decomposition_is_exact_for_sae_latents(planted, hook, tmp_path):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    view = load_model(ModelConfig(model_name=str(planted.directory)))
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=view.d_model, d_sae=16, metadata=SAEMetadata(hook_name=f"blocks.2.{hook}")))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    source = SaeSource.from_sae(sae, sae_id="rand")
    units, _ = discover_units(view, DiscoverConfig(neurons=False, unit_ids=["rand:3", "rand:11"], controls=False),
                              saes=[source])
    prompts, _ = trigger_prompts(view, planted, n_per_trigger=2)
    for unit in units:
        read = unit_read(view, unit, AttributeConfig(), {"rand": source})
        assert read.head_layers == list(range(2 if hook == "hook_resid_pre" else 3))
        labels, contrib, reference = decompose_pre_activation(view, read, torch.tensor(prompts[0]))
        torch.testing.assert_close(contrib.sum(0), reference, atol=2e-4, rtol=1e-4)
        # the reference is SAE-Lens's own encoder: relu(pre) == sae.encode
        got = {}
        view.run_with_hooks(torch.tensor([prompts[0]]), [(f"blocks.2.{hook}", lambda x, hook: got.update(x=x))],
                            stop_at_layer=3)
        torch.testing.assert_close(reference.clamp_min(0), sae.encode(got["x"][0])[:, unit.index], atol=1e-5, rtol=1e-5)


def test_batched_folded_attribution_equals_full_cache_reference(planted):
    """The paper-style path (full `run_with_cache`, `stack_head_results`, `apply_ln_to_stack`, batch 1) on
    a HookedTransformer gives the same per-head values as our folded, batched, hook_z-only path."""
    from planted import hooked_transformer

    model = hooked_transformer(planted)
    view = ModelView.from_object(model)
    layer, index = planted.answer.neuron_layer, planted.answer.neuron_index
    unit = discover_units(view, DiscoverConfig(unit_ids=[f"L{layer}N{index}"], controls=False))[0][0]
    read = unit_read(view, unit, AttributeConfig(), {})
    prompts, _ = trigger_prompts(view, planted, n_per_trigger=4)
    ours, _ = attribute_prompts(view, read, prompts, batch_size=3)
    w = (model.W_gate if view.gated else model.W_in)[layer][:, index].detach()
    reference = []
    for p in prompts:
        _, cache = model.run_with_cache(torch.tensor([p]))
        heads = cache.stack_head_results(layer=layer, pos_slice=-1)
        normed = cache.apply_ln_to_stack(heads, layer=layer, mlp_input=True, pos_slice=-1)
        reference.append((normed[:, 0] @ w).detach())
    torch.testing.assert_close(ours[read.rank_branch], torch.stack(reference), atol=1e-4, rtol=1e-4)


def test_rules_and_bad_input():
    a = torch.tensor([[5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, -1.0]])
    assert parse_rule("mean+2std").mask(a)[0].nonzero().flatten().tolist() == [0]
    assert parse_rule("mean+2std-positive").mask(a)[0].nonzero().flatten().tolist() == [0]
    assert parse_rule("top3-positive").mask(a)[0].nonzero().flatten().tolist() == [0, 10]  # zeros never active
    top3 = parse_rule("top3").mask(a)[0]  # the authors': 0 and 10, and one of the tied zeros (torch's choice)
    assert top3[[0, 10]].all() and top3.sum() == 3 and not top3[11]
    assert parse_rule("topk:1").mask(a)[0].nonzero().flatten().tolist() == [0]
    assert parse_rule("zscore:0.1").mask(a)[0].nonzero().flatten().tolist() == [0, 10]
    for bad in ("top-3", "topk:0", "zscore", "mean+3sd"):
        with pytest.raises(UserError, match="unknown active-head rule"):
            parse_rule(bad)
    with pytest.raises(UserError, match="band_low"):
        RunConfig.from_dict({"attribute": {"band_low": 0.8, "band_high": 0.2}})


def test_stage_needs_contexts(tmp_path, planted_gpt2):
    from sae_lens_ctx.inputs.context import RunContext
    from sae_lens_ctx.stages.attribute import run_stage

    ctx = RunContext(out=tmp_path, config=RunConfig(model=ModelConfig(model_name=str(planted_gpt2.directory))))
    with pytest.raises(UserError, match="no units.jsonl"):
        run_stage(ctx)
