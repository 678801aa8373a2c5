"""The QK split (stages/attribute/qk.py): the query × key table of a head's attention score, and of its gap,
sums to the hooked value on every model family, weight convention and unit kind; bad input is recorded."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import FAMILIES, make_tiny

from sae_lens_ctx.core.config import AttributeConfig, DiscoverConfig, ModelConfig
from sae_lens_ctx.inputs.model import load_model
from sae_lens_ctx.inputs.sae import SaeSource
from sae_lens_ctx.stages.attribute import attribute_unit, unit_read
from sae_lens_ctx.stages.attribute.qk import QkSplitter, qk_records
from sae_lens_ctx.stages.discover import discover_units


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    built: dict[str, object] = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = make_tiny(arch, tmp_path_factory.mktemp(arch))
        return built[arch]
    return get


TEXTS = ["The river carried the forgotten map as the sun went down over the old market.",
         "A young painter visited the evening market without any help from the farmer.",
         "the map"]


def _prompts(view):
    bos = view.tokenizer.bos_token_id
    return [[bos] + view.tokenizer(t)["input_ids"] for t in TEXTS]


def _hooked(view, prompt, layer):
    """Independently of the split: the hooked attention scores and pattern row of the last position, `[H, n]`,
    and the pre-softcap logits (the softcap inverted) of the same row."""
    got = {}
    view.run_with_hooks(torch.tensor([prompt]), [
        (view.hook_name("attn_scores", layer), lambda x, hook: got.__setitem__("s", x[0, :, -1].float())),
        (view.hook_name("pattern", layer), lambda x, hook: got.__setitem__("p", x[0, :, -1].float()))],
        stop_at_layer=layer + 1)
    cap = view.attn_read(layer).softcap
    logits = got["s"] if cap is None else cap * torch.atanh(got["s"] / cap)
    return got["s"], got["p"], logits


@pytest.mark.parametrize("weights", ["folded", "raw"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_the_table_sums_to_the_hooked_score_and_gap(arch, weights, family_dir):
    """Every head of layer 1 (GQA groups, rotary, sandwich, parallel blocks: the whole residual stream of layer 0
    below it) and of layer 0, at every key position of three prompts: the table sums to the hooked logit, the gap
    table to the hooked gap, in fp32."""
    view = load_model(ModelConfig(model_name=str(family_dir(arch)), weights=weights))
    splitter = QkSplitter(view)
    prompts = _prompts(view)
    wanted = {p: {(l, h): set(range(len(prompt))) for l in (0, 1) for h in range(view.n_heads)}
              for p, prompt in enumerate(prompts)}
    splits = splitter.split(prompts, wanted, batch_size=2)
    n_checked = 0
    for p, prompt in enumerate(prompts):
        for l in (0, 1):
            scores, pattern, logits = _hooked(view, prompt, l)
            seen = scores > -1e30
            for h in range(view.n_heads):
                gap_want = logits - (pattern[h] * torch.where(seen[h], logits[h], 0.0)).sum()
                for s in range(len(prompt)):
                    sp = splits[(p, l, h, s)]
                    if not seen[h, s]:  # Gemma 2's sliding-window layer: nothing to split
                        assert sp.status == "masked" and sp.score is None
                        continue
                    assert sp.status in ("ok", "first_position"), sp.reason
                    assert sp.query == sp.key and sp.query[-1] == "const" and len(sp.query) == sp.score.shape[0]
                    torch.testing.assert_close(sp.score.sum(), logits[h, s], atol=1e-5, rtol=1e-4)
                    torch.testing.assert_close(sp.gap.sum(), gap_want[h, s], atol=1e-5, rtol=1e-4)
                    assert sp.hooked_score == pytest.approx(float(scores[h, s]), abs=1e-6)
                    n_checked += 1
            if l == 1:
                labels = splits[(p, 1, 0, 0)].query
                assert {f"L0H{h}" for h in range(view.n_heads)} | {"embed", "L0MLP", "const"} <= set(labels)
                assert ("pos_embed" in labels) == (arch == "gpt2")
    assert n_checked > 100


@pytest.mark.parametrize("arch", FAMILIES)
def test_a_prompt_split_in_a_batch_equals_it_split_alone(arch, family_dir, monkeypatch):
    """The split computes a batch's prompts together, a layer at a time (padded to the longest, in chunks of rows
    under `qk.CHUNK_FLOATS`): each prompt's tables, statuses and reads are those of the prompt split alone, within
    fp32 round-off, whether its batch's rows are one chunk or a chunk each."""
    from sae_lens_ctx.stages.attribute import qk

    view = load_model(ModelConfig(model_name=str(family_dir(arch))))
    splitter = QkSplitter(view)
    prompts = _prompts(view)
    half = view.n_heads // 2  # the first prompt asks for the first half of the heads (one KV group under GQA),
    heads = [range(half), range(half, view.n_heads), range(view.n_heads)]  # the second the rest, the third all
    wanted = {p: {(l, h): {0, len(prompt) // 2, len(prompt) - 1} for l in (0, 1) for h in heads[p]}
              for p, prompt in enumerate(prompts)}
    together = splitter.split(prompts, wanted, batch_size=len(prompts))
    monkeypatch.setattr(qk, "CHUNK_FLOATS", 1)
    chunked = splitter.split(prompts, wanted, batch_size=len(prompts))
    n_checked = 0
    for p, prompt in enumerate(prompts):
        alone = splitter.split([prompt], {0: wanted[p]})
        for (_, l, h, s), sp in alone.items():
            for other in (together[(p, l, h, s)], chunked[(p, l, h, s)]):
                assert other.status == sp.status and (other.reads or {}).keys() == (sp.reads or {}).keys()
                for label, (position, attention) in (sp.reads or {}).items():
                    assert other.reads[label] == (position, pytest.approx(attention, abs=1e-6))
                if sp.score is not None:
                    torch.testing.assert_close(other.score, sp.score, atol=1e-5, rtol=1e-5)
                    torch.testing.assert_close(other.gap, sp.gap, atol=1e-5, rtol=1e-5)
                    n_checked += 1
    assert n_checked >= 20


def _sae(view, layer=1):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(1)
    sae = StandardSAE(StandardSAEConfig(d_in=view.d_model, d_sae=8,
                                        metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post")))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    return SaeSource.from_sae(sae, sae_id="rand")


@pytest.mark.parametrize("weights", ["folded", "raw"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_records_of_neurons_and_latents_sum_to_their_totals(arch, weights, family_dir):
    """Through the look-up records of a neuron and of an SAE latent: each record's key-side and query-side
    marginals (leading components plus 'other') sum to its logit and its gap, the shares to 1, the grid too;
    and the logit is the hooked score's."""
    view = load_model(ModelConfig(model_name=str(family_dir(arch)), weights=weights))
    splitter = QkSplitter(view)
    source = _sae(view)
    units, _ = discover_units(view, DiscoverConfig(unit_ids=["L1N5", "rand:3"], controls=False), saes=[source])
    assert {u.kind for u in units} == {"neuron", "sae_latent"} or len(units) == 2
    prompts = _prompts(view)
    cfg = AttributeConfig(include_same_layer=True, band_low=0.0, band_high=1.0, ablation="none", lookup_top_k=3)
    for unit in units:
        read = unit_read(view, unit, cfg, {"rand": source})
        lookups: list = []
        attribute_unit(view, read, prompts, [], list(range(len(prompts))), [], cfg, lookups=lookups, offset=1)
        assert lookups
        records = qk_records(splitter, lookups, {(unit.unit_id, "train", r): p for r, p in enumerate(prompts)},
                             view.tokenizer,
                             n_sources=3, n_components=4, batch_size=2)
        assert len(records) == sum(min(3, len(r.sources)) for r in lookups)
        for rec in records:
            if rec.status == "masked":
                continue
            assert rec.status in ("ok", "first_position") and rec.logit is not None
            for side in (rec.key, rec.query):
                assert len(side) == min(4, rec.n_components) + (rec.n_components > 4)
                assert (side[-1]["component"] == "other") == (rec.n_components > 4)
                assert sum(e["score"] for e in side) == pytest.approx(rec.logit, abs=1e-5, rel=1e-4)
                assert sum(e["gap"] for e in side) == pytest.approx(rec.gap, abs=1e-5, rel=1e-4)
                if abs(rec.gap) > 1e-3:
                    assert sum(e["gap_share"] for e in side) == pytest.approx(1.0, abs=1e-3)
            assert sum(map(sum, rec.grid["gap"])) == pytest.approx(rec.gap, abs=1e-5, rel=1e-4)
            cap = rec.softcap
            want = rec.score if cap is None else cap * float(torch.atanh(torch.tensor(rec.score / cap)))
            assert rec.logit == pytest.approx(want, abs=1e-5, rel=1e-4)


def test_bad_input_is_recorded_with_its_reason(family_dir):
    """A one-position prompt (the BOS alone) and a looked-up position 0 are recorded as such, with the reason;
    a QK-norm model gets 'not_splittable' and no numbers; an attention the view does not know is refused."""
    from sae_lens_ctx.core.errors import UserError

    view = load_model(ModelConfig(model_name=str(family_dir("llama-gqa"))))
    splitter = QkSplitter(view)
    bos = view.tokenizer.bos_token_id
    prompts = [[bos], _prompts(view)[0]]
    splits = splitter.split(prompts, {0: {(1, 0): {0}}, 1: {(1, 0): {0, 3}}})
    one, sink, ok = splits[(0, 1, 0, 0)], splits[(1, 1, 0, 0)], splits[(1, 1, 0, 3)]
    assert one.status == "one_position" and "one position" in one.reason and one.gap_value == 0.0
    assert float(one.gap.abs().max()) == 0.0 and one.attention == pytest.approx(1.0)
    assert sink.status == "first_position" and "attention sink" in sink.reason
    torch.testing.assert_close(sink.score.sum(), torch.tensor(sink.logit), atol=1e-5, rtol=1e-4)
    assert ok.status == "ok" and ok.reason is None
    splitter.unsplittable = "QK-norm: test"
    qkn = splitter.split(prompts, {1: {(1, 0): {3}}})[(1, 1, 0, 3)]
    assert qkn.status == "not_splittable" and qkn.reason == "QK-norm: test" and qkn.score is None and qkn.logit is None
    view.model.cfg.positional_embedding_type = "alibi"
    with pytest.raises(UserError, match="cannot be split .*alibi.* attribute.qk=false"):
        QkSplitter(view)


# -- the plants, end to end through the CLI -------------------------------------------------------------


def _cli_run(plant, tmp_path, capsys, *extra, until="explain"):
    import json

    from cli import run_cli
    from offline_llm import NAME as OFFLINE_LLM
    from planted import planted_corpus

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in planted_corpus(plant, n_docs=120)))
    out = tmp_path / "run"
    code, err = run_cli(capsys, "run", "--out", str(out), "--model", str(plant.directory), "--corpus", str(docs),
                        "--until", until, "corpus.context_size=16", "corpus.max_tokens=4000",
                        "corpus.min_documents=10", f"explain.backend={OFFLINE_LLM}", *extra)
    assert code == 0, err
    return out


def _planted_rows(out, unit="L2N37"):
    from sae_lens_ctx.core.records import iter_jsonl

    return [r for r in iter_jsonl(out / "qk.jsonl") if r["unit_id"] == unit]


def test_planted_trigger_heads_are_keyed_on_the_trigger_embedding(planted, tmp_path, capsys):
    """The first plant (layer-0 and layer-1 trigger heads reading the trigger's embedding): on every active
    train prompt the split of each planted head's score at its trigger puts ≥ 95 % of the gap on the key's
    `embed`, and the query side on what builds the constant query (GPT-2: `const`, the `b_Q` bias; Llama:
    `embed`, whose `u_const` every token carries); the look-up explanation says so in words, with counts."""
    from sae_lens_ctx.core.records import iter_jsonl

    out = _cli_run(planted, tmp_path, capsys)
    trigger = {f"L{l}H{h}": word for (l, h), word in planted.answer.heads.items()}
    rows = _planted_rows(out)
    assert {r["head"] for r in rows} == set(trigger)
    checked = 0
    for r in rows:
        if not (r["active"] and r["split"] == "train" and r["token"] == trigger[r["head"]]):
            continue
        assert r["status"] == "ok" and r["attention"] > 0.8
        assert sum(e["gap"] for e in r["key"]) == pytest.approx(r["gap"], abs=1e-4)
        top_key, top_query = r["key"][0], r["query"][0]
        assert top_key["component"] == "embed" and top_key["gap_share"] > 0.95, r["key"]
        assert top_query["component"] == ("const" if planted.arch == "gpt2" else "embed"), r["query"]
        assert top_query["gap_share"] > 0.95
        assert r["pairs"][0]["key"] == "embed" and r["grid"]["key"][0] == "embed"
        assert r["logit"] == pytest.approx(r["score"], abs=1e-5)  # no softcap
        checked += 1
    assert checked >= 4
    counts = json.loads((out / "attribute.json").read_text())["qk_records"]  # records per status
    assert sum(counts.values()) == len(list(iter_jsonl(out / "qk.jsonl"))) and counts["ok"] >= checked
    texts = {e["head"]: e["text"] for e in iter_jsonl(out / "explanations.jsonl")
             if e["unit_id"] == "L2N37" and e["explainer"] == "lookup" and e["head"] in trigger}
    assert set(texts) == set(trigger)
    for head, text in texts.items():  # the stable key-side reason, in words, with counts
        assert f'"{trigger[head]}" (looked up on' in text
        assert "keyed on the token itself (embedding, 100 % of the gap on " in text, text
    from sae_lens_ctx.stages.report.html import render
    from sae_lens_ctx.stages.report.qk import qk_blocks

    block = render("qk.html", blocks=qk_blocks(out, "L2N37"))  # the report's block: per planted head, its trigger
    for head, word in trigger.items():
        assert f"<h4>{head} looks up <code>{word}</code>" in block
    assert block.count("Key side led by embed on") == 2


def test_k_composition_plant_names_the_previous_token_head(tmp_path, capsys):
    """The second plant: head B (L1H5) looks up the token right after " louvre", keyed on what the
    previous-token head L0H1 wrote there; the split names L0H1 as the key-side reason (≥ 95 % of the gap and
    of the score) on every active train prompt, and the look-up explanation says so."""
    from planted_kcomp import make_planted_kcomp

    from sae_lens_ctx.core.records import iter_jsonl

    plant = make_planted_kcomp(tmp_path / "model")
    # head B's peaks run above head A's here, so it is active on 80 % of the top prompts: widen the band
    out = _cli_run(plant, tmp_path, capsys, "attribute.band_high=0.9")
    rows = [r for r in _planted_rows(out) if r["head"] == "L1H5" and r["active"] and r["split"] == "train"]
    looked_up = [r for r in rows if r["contribution"] > 0.5 * max(x["contribution"] for x in rows)]
    assert len(looked_up) >= 4
    contexts = {(c["split"], c["rank"]): c for c in iter_jsonl(out / "contexts.jsonl") if c["unit_id"] == "L2N37"
                and c["kind"] == "top"}
    louvre = plant.tokenizer.convert_tokens_to_ids("\u2581louvre")
    for r in looked_up:
        c = contexts[(r["split"], r["rank"])]
        assert c["tokens"][r["position"] - 2] == louvre  # the token before s (BOS offset 1) is the trigger
        assert r["status"] == "ok"
        key = {e["component"]: e for e in r["key"]}
        assert r["key"][0]["component"] == "L0H1", r["key"]
        assert key["L0H1"]["score_share"] > 0.95 and key["L0H1"]["gap_share"] > 0.95
        assert key["L0H1"]["reads_position"] == r["position"] - 1 and key["L0H1"]["reads_token"] == " louvre"
        assert key["L0H1"]["reads_attention"] > 0.99
        assert r["query"][0]["component"] == "embed"
    [e] = [e for e in iter_jsonl(out / "explanations.jsonl")
           if e["unit_id"] == "L2N37" and e["head"] == "L1H5" and e["explainer"] == "lookup"]
    assert e["status"] == "ok"
    assert "keyed on what L0H1 wrote there (100 % of the gap on " in e["text"], e["text"]
    assert "from the previous token ' louvre'), asked for by the query token's embedding" in e["text"]
    # the report's unit page: the QK block (heatmap and key-side bar) names L0H1
    from cli import run_cli

    code, err = run_cli(capsys, "report", "--out", str(out))
    assert code == 0, err
    page = (out / "report" / "index.html").read_text().split('id="unit-L2N37"')[1].split("</section>")[0]
    block = page.split("Why the head attended there")[1]
    assert "<h4>L1H5 looks up" in block and 'class="qk-grid"' in block and 'class="qk-bar"' in block
    assert "Key side led by L0H1 on" in block


def _qk(rank, lead, share, query="L9H2", token_id=7, position=4, **reads):
    from sae_lens_ctx.core.lookups import QkRecord

    key = [{"component": lead, "score": 1.0, "score_share": 0.5, "gap": share, "gap_share": share, **reads},
           {"component": "other", "n": 3, "score": 1.0, "score_share": 0.5, "gap": 1 - share, "gap_share": 1 - share}]
    return QkRecord(unit_id="U", head="L10H0", split="train", rank=rank, active=True, position=position,
                    token_id=token_id, token=" no", query_position=9, attention=0.5, contribution=1.0, score=2.0,
                    softcap=None, n_components=40, status="ok", logit=2.0, gap=1.0, key=key,
                    query=[{"component": query, "score": 2.0, "score_share": 1.0, "gap": 1.0, "gap_share": 1.0}])


def test_key_reason_wording_counts_and_stability():
    """A key component leading on most looked-up prompts is stated with its mean share and counts; one leading on
    fewer than half is not; an earlier head's source is named when stable; no QK records: no reason (the text
    is then the look-up explanation of before)."""
    from sae_lens_ctx.core.lookups import key_reason, key_reason_text

    rows = [_qk(r, "embed", 0.71) for r in range(9)] + [_qk(9, "L3H1", 0.6), _qk(10, "L3H1", 0.6)]
    reason = key_reason(rows, {7}, set(range(11)))
    assert (reason["component"], reason["n_prompts"], reason["n_looked_up"], reason["query"]) == ("embed", 9, 11, "L9H2")
    assert key_reason_text(reason) == (" — keyed on the token itself (embedding, 71 % of the gap on 9 of 11 prompts), "
                                       "asked for by L9H2 at the query")
    assert key_reason(rows, {7}, {9, 10}) is not None and key_reason(rows, {8}, set(range(11))) is None
    split = [_qk(r, "embed", 0.7) for r in range(3)] + [_qk(r, "L3H1", 0.7) for r in range(3, 7)] + \
        [_qk(r, "L2MLP", 0.7) for r in range(7, 11)]
    assert key_reason(split, {7}, set(range(11))) is None  # L3H1 leads on 4 of 11: not stable
    prev = [_qk(r, "L3H1", 0.8, query="const", reads_position=3, reads_token=" no", reads_attention=0.9)
            for r in range(4)]
    text = key_reason_text(key_reason(prev, {7}, set(range(4))))
    assert text == (" — keyed on what L3H1 wrote there (80 % of the gap on 4 of 4 prompts, from the previous token "
                    "' no'), asked for by a constant query (biases)")
    assert key_reason([], {7}, {0}) is None


def test_an_attention_the_view_cannot_split_is_refused_in_one_line_before_the_stage(family_dir, tmp_path, capsys,
                                                                                    monkeypatch):
    """An architecture whose attention the view does not know (here: a positional scheme it reports as unknown)
    stops the run with one line naming the switch, before any unit is attributed; with attribute.qk=false the
    same run goes through and writes an empty qk.jsonl."""
    from cli import assert_one_line_error, run_cli
    from tiny import PROSE

    from sae_lens_ctx.inputs.view import ModelView

    monkeypatch.setattr(ModelView, "qk_problem", lambda self: "positional embedding 'alibi' (test)")
    args = ["run", "--model", str(family_dir("gpt2")), "--corpus", str(PROSE), "--until", "attribute",
            "corpus.max_tokens=2500", "corpus.context_size=32", "corpus.min_documents=10", "discover.layers=[1]",
            "discover.top_k=1", "mine.top_k=4", "mine.n_test_prompts=2", "attribute.occlusion=false"]
    code, err = run_cli(capsys, *args, "--out", str(tmp_path / "a"))
    assert_one_line_error(code, err, "cannot be split", "alibi", "attribute.qk=false")
    assert not (tmp_path / "a" / "heads.jsonl").exists()
    code, err = run_cli(capsys, *args, "--out", str(tmp_path / "b"), "attribute.qk=false")
    assert code == 0, err
    assert (tmp_path / "b" / "qk.jsonl").read_text() == "" and (tmp_path / "b" / "heads.jsonl").exists()
    assert json.loads((tmp_path / "b" / "attribute.json").read_text())["qk_records"] is None
