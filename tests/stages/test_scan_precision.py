"""`mine.scan_precision=bfloat16`: a bf16 scan keeps candidates, the survivors are recomputed in fp32, and every
unit keeps exactly the fp32 scan's contexts with activations within fp32 round-off (stages/mine/precision.py)."""

import json

import pytest
import torch

from planted import planted_corpus
from sae_lens_ctx.core.config import CorpusConfig, DiscoverConfig, MineConfig, ModelConfig, RunConfig
from sae_lens_ctx.core.records import iter_jsonl
from sae_lens_ctx.inputs.corpus import build_corpus
from sae_lens_ctx.inputs.model import load_model
from sae_lens_ctx.pipeline.engine import run_pipeline
from sae_lens_ctx.stages.mine import precision
from sae_lens_ctx.stages.mine.precision import Bf16Reader, scan_checked
from sae_lens_ctx.stages.mine.scan import UnitReader, scan
from sae_lens_ctx.stages.mine.shards import ROUND_OFF
from test_mine import planted_units, write_docs

TRACKS = {"top": 8, "low": 3, "random": 3, "pool": 6}


def assert_same_tracks(ours, reference):
    """Per unit and track the same contexts, each with the same position and its values within fp32 round-off;
    in the same order except among values tied within round-off (contexts sharing a prefix: equal in exact
    arithmetic, ordered by round-off in either scan)."""
    for name, ref in reference.tracks.items():
        got = ours.tracks[name]
        for u in range(ref.index.shape[0]):
            a = {int(i): j for j, i in enumerate(got.index[u].tolist())}
            b = {int(i): j for j, i in enumerate(ref.index[u].tolist())}
            assert a.keys() == b.keys(), (name, u)
            for i, j in b.items():
                assert int(got.pos[u, a[i]]) == int(ref.pos[u, j]), (name, u, i)
                torch.testing.assert_close(got.values[u, a[i]], ref.values[u, j], **ROUND_OFF)
                torch.testing.assert_close(got.rows[u, a[i]], ref.rows[u, j], **ROUND_OFF, equal_nan=True)
                if a[i] != j:  # another order only where the values tie within round-off
                    tol = ROUND_OFF["atol"] + ROUND_OFF["rtol"] * abs(float(ref.values[u, j]))
                    assert abs(float(ref.values[u, j]) - float(ref.values[u, a[i]])) <= tol, (name, u, i)


def planted_scan(plant, tmp_path):
    view = load_model(ModelConfig(model_name=str(plant.directory)))
    corpus = build_corpus(CorpusConfig(dataset_path=str(write_docs(tmp_path / "d.jsonl", planted_corpus(plant, n_docs=120))),
                                       context_size=16, min_documents=10), view.tokenizer, view.n_ctx)
    units = planted_units(plant)
    return view, units, corpus.split("train")


def test_bf16_scan_keeps_the_fp32_contexts_on_the_planted_models(planted, tmp_path):
    view, units, contexts = planted_scan(planted, tmp_path)
    reference = scan(UnitReader(view, units), contexts, TRACKS, batch_size=8)
    ours = scan_checked(UnitReader(view, units), Bf16Reader(UnitReader(view, units)), contexts, TRACKS, batch_size=8)
    assert ours.precision == "bfloat16" and 0 < ours.n_recomputed < len(contexts)
    assert ours.identity == reference.identity  # shards of either precision merge: the same answer
    assert_same_tracks(ours, reference)
    assert view.dtype == torch.float32  # the fp32 model is left as it was


def test_units_within_the_margin_are_rescanned_in_fp32(planted_gpt2, tmp_path, monkeypatch):
    """No extra candidates and a margin wider than any gap: every unit fails the check and is widened to the
    whole split, which still gives the fp32 answer."""
    view, units, contexts = planted_scan(planted_gpt2, tmp_path)
    monkeypatch.setattr(precision, "candidates", lambda k: k)
    monkeypatch.setattr(precision, "MARGIN_FRACTION", 10.0)
    reference = scan(UnitReader(view, units), contexts, TRACKS, batch_size=8)
    ours = scan_checked(UnitReader(view, units), Bf16Reader(UnitReader(view, units)), contexts, TRACKS, batch_size=8)
    assert ours.n_units_rescanned == len(units)
    assert_same_tracks(ours, reference)


def mine_run(cfg, out, **kw):
    for stage in ("load", "discover", "mine"):
        run_pipeline(cfg, out, only=stage, **kw)
    records = list(iter_jsonl(out / "contexts.jsonl"))
    from safetensors.torch import load_file

    return records, load_file(out / "context_acts.safetensors")


def assert_same_prompts(a, b):
    (recs_a, acts_a), (recs_b, acts_b) = a, b
    strip = lambda r: {k: v for k, v in r.items() if k not in ("activation", "trimmed_activation")}  # noqa: E731
    assert [strip(r) for r in recs_a] == [strip(r) for r in recs_b] and recs_a
    for ra, rb in zip(recs_a, recs_b):
        for key in ("activation", "trimmed_activation"):
            assert abs(ra[key] - rb[key]) <= ROUND_OFF["atol"] + ROUND_OFF["rtol"] * abs(rb[key]), (key, ra, rb)
    assert acts_a.keys() == acts_b.keys()
    for key in acts_a:
        torch.testing.assert_close(acts_a[key], acts_b[key], **ROUND_OFF)


def test_the_stage_in_both_precisions_writes_the_same_prompts(planted_gpt2, tmp_path):
    docs = write_docs(tmp_path / "docs.jsonl", planted_corpus(planted_gpt2, n_docs=120))
    runs = {}
    for p in ("float32", "bfloat16"):
        cfg = RunConfig(model=ModelConfig(model_name=str(planted_gpt2.directory)),
                        corpus=CorpusConfig(dataset_path=str(docs), context_size=16, min_documents=10),
                        discover=DiscoverConfig(n_last_layers=1, top_k=2),
                        mine=MineConfig(top_k=6, n_test_prompts=3, n_random=3, batch_size=8, scan_precision=p))
        runs[p] = mine_run(cfg, tmp_path / p)
        this_run = json.loads((tmp_path / p / "stages.json").read_text())["stages"]["mine"]["this_run"]
        assert {s["precision"] for s in this_run["splits"].values()} == {p}
    assert_same_prompts(runs["bfloat16"], runs["float32"])


@pytest.mark.embedded
def test_embedded_bf16_scan_writes_the_fp32_prompts(embedded_view, tmp_path):
    runs = {}
    for p in ("float32", "bfloat16"):
        cfg = RunConfig(corpus=CorpusConfig(max_tokens=4000), discover=DiscoverConfig(n_last_layers=1, top_k=2),
                        mine=MineConfig(top_k=5, n_test_prompts=3, n_random=3, scan_precision=p))
        runs[p] = mine_run(cfg, tmp_path / p, model=embedded_view.model)
    assert_same_prompts(runs["bfloat16"], runs["float32"])


def test_auto_scans_in_bf16_only_where_the_candidates_are_a_small_share_of_the_split(planted_gpt2):
    view = load_model(ModelConfig(model_name=str(planted_gpt2.directory)))
    # 200 units × (2·20+8 top + 10 random) candidates against the paper-size preset's ~8,000 train contexts
    share = precision.candidate_share(200, {"top": 20, "random": 10}, 8_000)
    assert share == 200 * 58 / 8_000 > precision.AUTO_MAX_CANDIDATE_SHARE
    assert precision.resolve_precision("auto", view, share) == "float32"
    small = precision.candidate_share(4, {"top": 20, "random": 10}, 8_000)
    expected = "bfloat16" if precision.bf16_available(view.device) else "float32"
    assert precision.resolve_precision("auto", view, small) == expected
    assert precision.resolve_precision("bfloat16", view, share) == "bfloat16"  # an explicit choice stands
    assert precision.resolve_precision("float32", view, small) == "float32"
