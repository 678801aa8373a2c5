"""Context look-ups (lookups.py): the exact per-source split of head attribution, the look-up explainer and
its deterministic judge, end to end on the planted models."""

from __future__ import annotations

import pytest
import torch

from sae_lens_ctx.stages.attribute import attribute_prompts, unit_read
from sae_lens_ctx.core.config import AttributeConfig, DiscoverConfig, ModelConfig
from sae_lens_ctx.stages.discover import discover_units
from sae_lens_ctx.inputs.model import load_model
from sae_lens_ctx.inputs.sae import SaeSource


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
    from sae_lens_ctx.core.config import CorpusConfig, ExplainConfig, RunConfig
    from sae_lens_ctx.pipeline.engine import run_pipeline

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in planted_corpus(plant, n_docs=120)))
    cfg = RunConfig(model=ModelConfig(model_name=str(plant.directory)),
                    corpus=CorpusConfig(dataset_path=str(docs), context_size=16, max_tokens=4000, min_documents=10),
                    explain=ExplainConfig(backend=OFFLINE_LLM, **explain))
    out = tmp_path / "run"
    run_pipeline(cfg, out)
    return out


@pytest.fixture(scope="module")
def planted_run(planted, tmp_path_factory):
    """The whole pipeline on the planted model (offline test LLM), once per architecture."""
    return _run_planted(planted, tmp_path_factory.mktemp(f"run-{planted.arch}"))


def test_planted_lookups_explanations_and_scores(planted, planted_run):
    """On each planted model: every active train prompt of a planted pair draws its contribution from the
    pair's trigger; the look-up explanation names that trigger and nothing else; judged on held-out
    prompts its E is >= 0.9 and the shuffled control's <= 0.6."""
    import json

    from sae_lens_ctx.core.records import iter_jsonl

    out = planted_run
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
                    if e["unit_id"] == unit and e["explainer"] == "lookup" and e["head"] is not None}
    assert set(explanations) == set(trigger)
    for head, e in explanations.items():
        assert e["status"] == "ok" and e["backend"] == "none"
        assert [t["tokens"] for t in e["pattern"]["tokens"]] == [[trigger[head]]]  # the trigger, nothing else
        assert f'"{trigger[head]}"' in e["text"]
    scores = {(s["head"], s["scorer"]): s for s in iter_jsonl(out / "scores.jsonl")
              if s["unit_id"] == unit and s["explainer"] == "lookup" and s["head"] is not None}
    for head in trigger:
        assert scores[(head, "E")]["value"] >= 0.9 and scores[(head, "E")]["control_kind"] is None
        assert scores[(head, "auroc")]["value"] >= 0.9
        shuffled = scores[(head, "shuffled_E")]
        assert shuffled["control_kind"] == "shuffled" and (shuffled["value"] is None or shuffled["value"] <= 0.6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["explainers"]["lookup"]["E"]["real"]["n"] >= 2
    assert all("lookup_E_mean" in row for row in summary["head_versus_neuron"])


def test_marked_lookups_mark_the_trigger_and_off_is_the_papers_prompt(planted, planted_run):
    """explain.mark_lookups: the planted pair's active examples mark its trigger, the note says what the marks
    are; off, the prompt is byte for byte our prompt of before look-ups existed (the paper's structure in
    our words, core/prompts.py)."""
    import hashlib

    from sae_lens_ctx.core.config import ExplainConfig
    from sae_lens_ctx.stages.explain import heads as head_mod
    from sae_lens_ctx.stages.explain import marked_examples
    from sae_lens_ctx.core import prompts
    from sae_lens_ctx.core.lookups import LookupRecord
    from sae_lens_ctx.core.records import ContextRecord, HeadRecord, UnitRecord, read_jsonl

    rows = {name: read_jsonl(planted_run / f"{name}.jsonl", cls) for name, cls in
            (("units", UnitRecord), ("contexts", ContextRecord), ("heads", HeadRecord), ("lookups", LookupRecord))}
    marked = marked_examples(rows["contexts"], rows["lookups"], planted.tokenizer, ExplainConfig())
    cfg = ExplainConfig(max_heads_per_unit=0)
    on = head_mod.build_jobs(rows["units"], rows["contexts"], rows["heads"], cfg, None, marked=marked)
    off = head_mod.build_jobs(rows["units"], rows["contexts"], rows["heads"], cfg, None)
    trigger = {f"L{l}H{h}": word.strip() for (l, h), word in planted.answer.heads.items()}
    for job_on, job_off in zip(on, off):
        if job_on.unit_id != "L2N37":
            continue
        text = job_on.messages[0]["content"]
        assert prompts.HEAD_TEMPLATE.lookup_note in text and prompts.HEAD_TEMPLATE.lookup_note not in \
            job_off.messages[0]["content"]
        assert all(f"[[{trigger[job_on.head]}]]" in ex for ex in job_on.active)
        assert not any("[[" in ex for ex in job_on.inactive)
        assert [ex.replace("[[", "").replace("]]", "").strip() for ex in job_on.active] == \
            [ex.strip() for ex in job_off.active]
    # off: our prompt, unchanged (the digest of this exact text before issue 16)
    m = prompts.head_messages(" paris", ["the city of france", "a new\nfrance"], ["the old river"], "round2")
    assert hashlib.sha256(m[0]["content"].encode()).hexdigest() == \
        "a4169a533872ae78619a81a43e60d70290b5a64bb4433b404338cc67ca233ebe"


def test_deterministic_judge_E_and_auroc_equal_a_hand_computed_six_prompt_example():
    """Pattern {" france" (weight 1), " louvre" (weight 0.5)} on six held-out prompts, three active:
    Yes on prompts 1, 2 (true positives) and 5 (a false positive): TPR = TNR = 2/3, E = 2/3; graded scores
    positives (1, 0.5, 0), negatives (0, 1, 0): AUROC = (2.5 + 2 + 1) / 9 = 11/18."""
    from sae_lens_ctx.stages import score
    from sae_lens_ctx.core.config import ScoreConfig
    from sae_lens_ctx.core.lookups import judge

    pattern = {"tokens": [{"token_ids": [5], "weight": 1.0}, {"token_ids": [6], "weight": 0.5}]}
    prompts = [([7, 5, 8], True), ([6, 9], True), ([7, 8, 9], True), ([10, 11], False), ([5, 10], False), ([12], False)]
    judged = [judge(pattern, tokens) for tokens, _ in prompts]
    assert [a for a, _ in judged] == [True, True, False, False, True, False]
    js = [score.Judgement("head", "L2N37", "L0H3", "L2N37/L0H3", "top", i, label, 1.0, answer=a, p_yes=g,
                          explainer="lookup") for i, ((_, label), (a, g)) in enumerate(zip(prompts, judged))]
    records = {r.scorer: r for r in score.compute_scores(js, {}, ScoreConfig(), seed=0)}
    assert records["E"].value == pytest.approx(2 / 3) and records["auroc"].value == pytest.approx(11 / 18)
    assert records["E"].explainer == "lookup" and records["E"].control_kind is None
    assert (records["E"].n, records["E"].n_positive, records["E"].n_negative) == (6, 3, 3)


def _record(rank, active, sources, status="ok", n=5):
    from sae_lens_ctx.core.lookups import LookupRecord

    return LookupRecord(unit_id="U", head="L0H0", split="train", rank=rank, active=active, branch="in",
                        attribution=sum(s["contribution"] for s in sources), n_positions=n, offset=1,
                        first_attention=1.0 if status == "first_position_only" else 0.2, first_contribution=0.0,
                        sources=sources, status=status)


def _src(position, token_id, contribution, attention=0.5):
    return {"position": position, "token_id": token_id, "token": f" w{token_id}", "attention": attention,
            "contribution": contribution}


def test_bad_input_is_recorded_in_status_and_counts_never_invented():
    from sae_lens_ctx.core.lookups import explain_pair

    kw = dict(min_share=0.1, max_tokens=3, min_support=1, merge=True)
    tokens = {r: [10 + r] for r in range(4)}
    # no active prompt
    text, pattern, error = explain_pair([_record(0, False, [_src(1, 10, 1.0)]), _record(1, False, [])], tokens, **kw)
    assert text is None and error.startswith("no_examples") and (pattern["n_active"], pattern["n_inactive"]) == (0, 2)
    # attention all on the first position (the BOS) and a prompt of one position: nothing looked up
    sink = [_record(0, True, [_src(0, 1, 0.8, 1.0)], "first_position_only"),
            _record(1, True, [_src(0, 1, 0.5, 1.0)], "one_position", n=1), _record(2, False, [])]
    text, pattern, error = explain_pair(sink, tokens, **kw)
    assert text is None and error.startswith("no_lookup") and pattern["tokens"] == []
    assert (pattern["n_first_position_only"], pattern["n_one_position"]) == (1, 1)
    # a looked-up token that occurs as often where the head is inactive separates nothing
    same = [_record(0, True, [_src(1, 7, 1.0)]), _record(1, False, [])]
    text, pattern, error = explain_pair(same, {0: [7], 1: [7]}, **kw)
    assert text is None and error.startswith("no_pattern")


def test_a_one_position_prompt_is_recorded_as_such(random_dir):
    from sae_lens_ctx.stages.attribute import lookup_records

    view = load_model(ModelConfig(model_name=str(random_dir)))
    unit = discover_units(view, DiscoverConfig(unit_ids=["L2N3"], controls=False))[0][0]
    read = unit_read(view, unit, AttributeConfig(), {})
    prompts = [[1], [1, 9, 12]]
    sources: dict = {}
    a, _ = attribute_prompts(view, read, prompts, sources=sources)
    active = torch.ones_like(a[read.rank_branch], dtype=torch.bool)
    records = lookup_records(view.tokenizer, unit.unit_id, read.labels, [0], prompts, [0, 1], "train", active,
                             sources.pop("attention"), sources, read.rank_branch, 1, 5)
    assert records[0].status == "one_position" and records[1].status in ("ok", "first_position_only")
    assert records[0].first_attention == pytest.approx(1.0) and len(records[0].sources) == 1
    assert records[0].first_contribution == pytest.approx(records[0].attribution)


def test_the_paper_presets_pin_mark_lookups_off():
    from pathlib import Path

    import yaml

    from sae_lens_ctx.core.config import RunConfig

    presets = sorted((Path(__file__).resolve().parents[2] / "wandb_configs").glob("*.yaml"))
    paper = [p for p in presets if p.stem.startswith(("gpt2-", "pythia-"))]
    assert len(paper) == 9
    for path in paper:
        assert yaml.safe_load(path.read_text())["explain"]["mark_lookups"] is False, path.name
        assert RunConfig.from_yaml(path).explain.mark_lookups is False


def test_the_report_shades_each_planted_prompt_by_look_up(planted, planted_run):
    """The unit page shows the planted heads' active prompts shaded by look-up contribution: the trigger
    carries the whole shade (it holds > 99 % of the head's attribution), and no other token does."""
    import re

    from sae_lens_ctx.stages.report.html import LOOKUP_SHADE

    html = (planted_run / "report" / "index.html").read_text()
    page = html.split('id="unit-L2N37"')[1].split("</section>")[0]
    section = page.split("<h3>Look-ups</h3>")[1].split("<h3>")[0]
    rows = re.findall(r"<tr><td>(L\d+H\d+)</td>.*?</tr>", section)
    assert set(rows) == {f"L{l}H{h}" for l, h in planted.answer.heads} and len(rows) == 6
    full = re.findall(rf'rgba\({LOOKUP_SHADE},1\.00\)[^>]*>([^<]*)</span>', section)
    assert sorted(set(full)) == sorted(planted.answer.heads.values())
    assert not re.findall(rf'rgba\({LOOKUP_SHADE},0\.(?:[1-9]\d|0[1-9])\)', section)  # nothing else shaded


# -- unit look-ups: occlusion (attribute), the unit pattern (explain) and its judge (score) -------------


def test_occluded_activations_equal_plain_transformers_with_the_token_replaced(planted):
    """Each occluded row is the planted neuron's HF activation at the last token with that one context token
    replaced by the pad token; occluding the trigger switches the neuron off, occluding a filler does not."""
    from planted import encode, hf_neuron_activations
    from sae_lens_ctx.stages.attribute.occlusion import occluded_activations, occlusion_records

    view = load_model(ModelConfig(model_name=str(planted.directory)))
    unit = discover_units(view, DiscoverConfig(unit_ids=["L2N37"], controls=False))[0][0]
    read = unit_read(view, unit, AttributeConfig(), {})
    prompts = [encode(planted, t)[0].tolist() for t in ("the france river of old", "louvre city", "small", "france")]
    measured = occluded_activations(view, read, prompts, offset=1, batch_size=2)
    pad = planted.tokenizer.pad_token_id
    for prompt, (clean, occluded) in zip(prompts, measured):
        variants = [prompt] + [prompt[:s] + [pad] + prompt[s + 1:] for s in range(1, len(prompt) - 1)]
        want = hf_neuron_activations(planted, torch.tensor(variants))[:, -1]
        torch.testing.assert_close(torch.tensor([clean, *occluded]), want, atol=1e-4, rtol=1e-4)
    trigger_row = measured[0][1]
    assert measured[0][0] > 1.0 and trigger_row[1] < 0.01 * measured[0][0]  # " france" occluded: off
    assert min(abs(d) for d in (measured[0][0] - trigger_row[0], measured[0][0] - trigger_row[3])) < 0.2
    records = occlusion_records(planted.tokenizer, "L2N37", prompts, [0, 1, 2, 3], 1, measured, pad)
    # " small" alone: no trigger, no activation; " france" alone: active, nothing before it to occlude
    assert [r.status for r in records] == ["ok", "ok", "inactive", "one_token"] and records[3].tokens == []
    assert [t["token"] for t in records[0].tokens] == [" the", " france", " river", " of"]
    assert records[0].last_token == " old" and records[1].tokens[0]["drop"] == pytest.approx(records[1].activation, rel=0.01)


def test_planted_unit_lookup_names_both_triggers_and_scores_high(planted, planted_run):
    """On each planted model the planted neuron's unit look-up pattern (occlusion of its trimmed train prompts)
    is its two triggers, any last token (the neuron fires on whatever follows a trigger), nothing else; judged
    on its held-out top vs matched low prompts its E and AUROC are >= 0.9 (1.0 on both models when this was
    written), with the shuffled-pattern control <= 0.6."""
    import json

    from sae_lens_ctx.core.records import iter_jsonl

    out = planted_run
    a = planted.answer
    unit = f"L{a.neuron_layer}N{a.neuron_index}"
    triggers = sorted(a.heads.values())
    occlusions = [r for r in iter_jsonl(out / "occlusions.jsonl") if r["unit_id"] == unit]
    assert occlusions and all(r["status"] == "ok" and r["split"] == "train" for r in occlusions)
    for r in occlusions:  # occluding the prompt's trigger switches the neuron off
        drops = {t["token"]: t["drop"] for t in r["tokens"]}
        assert max(drops[t] for t in triggers if t in drops) >= 0.9 * r["activation"]
    [e] = [e for e in iter_jsonl(out / "explanations.jsonl")
           if e["unit_id"] == unit and e["explainer"] == "lookup" and e["head"] is None]
    assert e["status"] == "ok" and e["backend"] == "none" and e["pattern"]["last_tokens"] == []
    assert sorted(t for c in e["pattern"]["context_tokens"] for t in c["tokens"]) == triggers
    assert all(f'"{t}"' in e["text"] for t in triggers)
    scores = {(s["scorer"], s["control_kind"]): s["value"] for s in iter_jsonl(out / "scores.jsonl")
              if s["unit_id"] == unit and s["explainer"] == "lookup" and s["head"] is None}
    assert scores[("unit_E", None)] >= 0.9 and scores[("unit_auroc", None)] >= 0.9
    assert scores[("shuffled_unit_E", "shuffled")] <= 0.6
    summary = json.loads((out / "summary.json").read_text())
    block = summary["explainers"]["lookup"]["unit_E"]
    assert block["real"]["n"] >= 1 and block["shuffled_explanations"]["mean"] <= 0.6
    [row] = [r for r in summary["head_versus_neuron"] if r["unit_id"] == unit]
    assert row["lookup_unit_E"] >= 0.9 and row["lookup_unit_auroc"] >= 0.9
