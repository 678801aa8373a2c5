"""Attribution batched across units (#28 point 1): one pass of forwards for many units gives what each unit alone
gives, every number within fp32 round-off, and the same batching twice gives the same bytes. On the planted models
(random-weight GPT-2 and Llama-GQA models: neurons of every layer and SAE latents beside each other, look-ups,
ablation, occlusion, the QK split) and the embedded model."""

from __future__ import annotations

import pytest
import torch

from sae_lens_ctx.core.config import AttributeConfig, DiscoverConfig, ModelConfig
from sae_lens_ctx.inputs.model import load_model
from sae_lens_ctx.inputs.sae import SaeSource
from sae_lens_ctx.stages.attribute import (UnitPrompts, ablation_drops, ablation_jobs, attribute_unit, attribute_units,
                                           occluded_activations, occlusion_jobs, unit_read)
from sae_lens_ctx.stages.attribute.qk import QkSplitter, qk_records
from sae_lens_ctx.stages.discover import discover_units

ROUND_OFF = dict(atol=2e-5, rtol=1e-4)
"""fp32 round-off between batch shapes: the same row in another batch moves matmuls' last bits (measured on these
models: at most about 1e-6 absolute; the embedded run's look-ups and QK records agree to 6e-6 relative)."""


def _prompts(view, n: int, seed: int, lo: int = 3, hi: int = 14) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    bos = view.tokenizer.bos_token_id
    return [[bos] + torch.randint(5, view.d_vocab, (int(torch.randint(lo, hi, (1,), generator=g)),),
                                  generator=g).tolist() for _ in range(n)]


def _items(view, units, saes=None, n_train=12, n_test=6):
    cfg = AttributeConfig()
    return [UnitPrompts(unit_read(view, u, cfg, saes or {}), _prompts(view, n_train, 2 * i), _prompts(view, n_test, 2 * i + 1),
                        list(range(n_train)), list(range(n_test))) for i, u in enumerate(units)]


def _margin(attributions: torch.Tensor, p: int, j: int, rule: str) -> float:
    """How far head `j`'s attribution on prompt `p` lies from what the rule compares it with (mean + 2 std of
    the prompt's attributions, and the positivity floor), over fp32 round-off at the prompt's largest attribution
    (a prompt whose attributions are all of round-off size has every head near its threshold)."""
    row = attributions[p].double()
    assert rule == "mean+2std-positive"
    margin = min(abs(float(row[j] - row.mean() - 2 * row.std())), abs(float(row[j] - 1e-6 * row.abs().max())))
    return margin / max(1e-4 * float(row.abs().max()), 1e-6)


def _assert_same(alone, together, rule="mean+2std-positive"):
    """Records, matrices and summaries of `attribute_unit` one by one against `attribute_units`. A prompt may
    change sides only where its attribution lies within round-off of the rule's threshold (`_margin`)."""
    for (recs_a, mats_a, sum_a), (recs_b, mats_b, sum_b) in zip(alone, together, strict=True):
        assert [r.head for r in recs_a] == [r.head for r in recs_b]
        for j, (a, b) in enumerate(zip(recs_a, recs_b)):
            for split in ("train", "test"):
                ranks = mats_a[f"{a.unit_id}/{split}/ranks"].tolist()
                moved = set(getattr(a, f"active_{split}_ranks")) ^ set(getattr(b, f"active_{split}_ranks"))
                for rank in moved:
                    m = _margin(mats_a[f"{a.unit_id}/{split}/{a.branch}"], ranks.index(rank), j, rule)
                    assert m < 1, (a.unit_id, a.head, split, rank, m)
            assert a.relevant == b.relevant or abs(a.active_fraction - b.active_fraction) <= 1 / len(a.active_train_ranks + a.inactive_train_ranks)
            assert a.branch == b.branch
            if getattr(a, "active_test_ranks") != getattr(b, "active_test_ranks"):
                continue  # the ablation's active/inactive means are over other prompts
            for field in ("mean_attribution", "prob_drop_active", "prob_drop_inactive",
                          "act_drop_active", "act_drop_inactive"):
                x, y = getattr(a, field), getattr(b, field)
                assert (x is None) == (y is None) and (x is None or y == pytest.approx(x, abs=2e-5, rel=1e-4)), field
        assert set(mats_a) == set(mats_b)
        for k in mats_a:
            torch.testing.assert_close(mats_b[k], mats_a[k], **ROUND_OFF)
        assert {k: v for k, v in sum_a.items() if k != "direct_head_fraction"} == \
            {k: v for k, v in sum_b.items() if k != "direct_head_fraction"}
        assert sum_b["direct_head_fraction"] == pytest.approx(sum_a["direct_head_fraction"], rel=1e-4)


def _assert_same_lookups(alone, together):
    assert len(alone) == len(together)
    for a, b in zip(alone, together):
        assert (a.unit_id, a.head, a.split, a.rank, a.active, a.status) == (b.unit_id, b.head, b.split, b.rank, b.active, b.status)
        assert [s["position"] for s in a.sources] == [s["position"] for s in b.sources]
        assert b.attribution == pytest.approx(a.attribution, abs=2e-5, rel=1e-4)
        for s, t in zip(a.sources, b.sources):
            assert t["contribution"] == pytest.approx(s["contribution"], abs=2e-5, rel=1e-4)
            assert t["attention"] == pytest.approx(s["attention"], abs=1e-5)


def _run_alone(view, items, cfg):
    lookups, out = [], []
    for it in items:
        out.append(attribute_unit(view, it.read, it.train, it.test, it.train_ranks, it.test_ranks, cfg,
                                  lookups=lookups, offset=1))
    return out, lookups


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa"])
def random_dir(request, tmp_path_factory):
    """A tiny model with every weight random (`test_lookups._random_model`): no head's attribution is of
    round-off size, so which heads are active and which positions lead is decided by more than round-off."""
    from test_lookups import _random_model

    return _random_model("gpt2" if request.param == "gpt2" else "llama", tmp_path_factory.mktemp(request.param))


def test_units_of_every_layer_and_sae_latents_batched_together_equal_each_alone(random_dir):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    view = load_model(ModelConfig(model_name=str(random_dir)))
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=view.d_model, d_sae=16,
                                        metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post")))
    with torch.no_grad():
        sae.b_enc.normal_()
    source = SaeSource.from_sae(sae, sae_id="rand")
    layers = list(range(view.n_layers))
    neurons, _ = discover_units(view, DiscoverConfig(layers=layers, top_k=2, controls=False))
    latents, _ = discover_units(view, DiscoverConfig(neurons=False, unit_ids=["rand:3"], controls=False), saes=[source])
    units = neurons + latents
    assert {u.layer for u in neurons} == set(layers)
    cfg = AttributeConfig(batch_size=4, band_low=0.0, band_high=1.0)  # every head relevant: ablation on all of them
    items = _items(view, units, {"rand": source})
    alone, lookups_alone = _run_alone(view, items, cfg)
    lookups = []
    together = attribute_units(view, items, cfg, lookups=lookups, offset=1)
    _assert_same(alone, together)
    _assert_same_lookups(lookups_alone, lookups)
    assert sum(r.relevant for recs, _, _ in together for r in recs) > len(units)

    # the same batching twice: the same bytes
    again = attribute_units(view, items, cfg, lookups=[], offset=1)
    for (_, m1, _), (_, m2, _) in zip(together, again):
        assert all(torch.equal(m1[k], m2[k]) for k in m1)

    # ablation and occlusion across units
    jobs = [(it.read, it.test, [(0, 0), (view.n_layers - 1, 1)]) for it in items]
    for (p, a), job in zip(ablation_jobs(view, jobs, batch_size=4), jobs):
        p1, a1 = ablation_drops(view, *job, batch_size=4)
        torch.testing.assert_close(p, p1, **ROUND_OFF)
        torch.testing.assert_close(a, a1, **ROUND_OFF)
    occluded = [(it.read, it.train[:3]) for it in items]
    for got, (read, prompts) in zip(occlusion_jobs(view, occluded, 1, batch_size=4), occluded):
        want = occluded_activations(view, read, prompts, 1, batch_size=4)
        assert len(got) == len(want)
        for (c1, o1), (c2, o2) in zip(got, want):
            assert c1 == pytest.approx(c2, abs=2e-5, rel=1e-4) and o1 == pytest.approx(o2, abs=2e-5, rel=1e-4)

    # the QK split of every unit's look-ups at once equals unit by unit
    splitter = QkSplitter(view)
    run_as = {(it.read.unit.unit_id, split, r): p for it in items
              for split, ranks, ps in (("train", it.train_ranks, it.train), ("test", it.test_ranks, it.test))
              for r, p in zip(ranks, ps)}
    all_at_once = qk_records(splitter, lookups, run_as, view.tokenizer, 2, 4, batch_size=4)
    one_by_one = [q for it in items for q in qk_records(
        splitter, [r for r in lookups if r.unit_id == it.read.unit.unit_id], run_as, view.tokenizer, 2, 4, batch_size=4)]
    assert [(q.unit_id, q.head, q.rank, q.position, q.status) for q in all_at_once] == \
        [(q.unit_id, q.head, q.rank, q.position, q.status) for q in one_by_one]
    for a, b in zip(all_at_once, one_by_one):
        assert (a.logit is None) == (b.logit is None)
        if a.logit is not None:
            assert a.logit == pytest.approx(b.logit, abs=1e-4, rel=1e-4) and a.gap == pytest.approx(b.gap, abs=1e-4, rel=1e-4)


def test_embedded_units_batched_together_equal_each_alone(embedded_view):
    view = embedded_view
    units, _ = discover_units(view, DiscoverConfig(layers=[view.n_layers - 3, view.n_layers - 1], top_k=1,
                                                   controls=False))
    cfg = AttributeConfig(batch_size=8)
    items = _items(view, units, n_train=6, n_test=4)
    alone, lookups_alone = _run_alone(view, items, cfg)
    lookups = []
    _assert_same(alone, attribute_units(view, items, cfg, lookups=lookups, offset=1))
    _assert_same_lookups(lookups_alone, lookups)


def test_per_position_attribution_is_the_exact_decomposition_at_every_position(random_dir):
    """Heads per token (#26): `position_attributions` at every position equals the head rows of the unbatched
    exact decomposition (`decompose_pre_activation`, whose components sum to the hooked pre-activation), and
    at the last position what `attribute_prompts` gives; many units' windows in shared forwards."""
    from sae_lens_ctx.stages.attribute import attribute_prompts, decompose_pre_activation, position_attributions  # noqa: F401

    view = load_model(ModelConfig(model_name=str(random_dir)))
    units, _ = discover_units(view, DiscoverConfig(layers=[1, 2], top_k=2, controls=False))
    cfg = AttributeConfig()
    reads = [unit_read(view, u, cfg, {}) for u in units]
    windows = _prompts(view, 5, 9, lo=2, hi=30)
    jobs = [(read, windows, list(range(0, len(read.labels), 2))) for read in reads]
    got = position_attributions(view, jobs, batch_size=2)
    for (read, prompts, heads), per_prompt in zip(jobs, got):
        last, _ = attribute_prompts(view, read, prompts, batch_size=3)
        for p, a in zip(prompts, per_prompt):
            labels, contrib, _ = decompose_pre_activation(view, read, torch.tensor(p))
            want = torch.stack([contrib[labels.index(read.labels[h])] for h in heads], dim=1)  # [pos, heads]
            assert a.shape == (len(p), len(heads))
            torch.testing.assert_close(a, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.stack([a[-1] for a in per_prompt]), last[read.rank_branch][:, heads],
                                   **ROUND_OFF)
