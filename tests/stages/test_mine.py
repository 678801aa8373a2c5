"""Mining: streaming top-k == brute force, batched trimming == serial search, held-out split, flat
memory, kill-and-resume, the stage's files, bad input, and the embedded SmolLM2."""

import gc
import json
import random
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from planted import planted_corpus
from sae_lens_ctx.stages import mine
from sae_lens_ctx.stages import score
from sae_lens_ctx.core.config import CorpusConfig, DiscoverConfig, MineConfig, ModelConfig, RunConfig
from sae_lens_ctx.inputs.corpus import TokenContext, build_corpus
from sae_lens_ctx.core.errors import UserError
from sae_lens_ctx.stages.mine.scan import UnitReader, collect_prompts, scan
from sae_lens_ctx.stages.mine.trim import trim_prompts
from sae_lens_ctx.inputs.model import load_model
from sae_lens_ctx.inputs.context import RunContext
from sae_lens_ctx.pipeline.engine import run_pipeline
from sae_lens_ctx.core.records import iter_jsonl
from sae_lens_ctx.stages.mine.trim import trim_batched, trim_serial
from sae_lens_ctx.core.records import UnitRecord

CONTEXT_SIZE = 16


def neuron(layer, index, control=False):
    return UnitRecord(unit_id=f"L{layer}N{index}", kind="neuron", layer=layer, index=index,
                      hook_name=f"blocks.{layer}.mlp.hook_post", token_id=0, token="", congruence=0.0,
                      control=control, direction="promote", rank_in_layer=1)


def write_docs(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def corpus_of(view, path, **kwargs):
    return build_corpus(CorpusConfig(dataset_path=str(path), context_size=CONTEXT_SIZE, min_documents=10, **kwargs),
                        view.tokenizer, view.n_ctx)


def planted_units(plant):
    a = plant.answer
    return [neuron(a.neuron_layer, a.neuron_index), neuron(0, 5), neuron(1, 7), neuron(2, 111, control=True)]


def brute_force(view, units, contexts, bos):
    """Every context's full activation cache, computed one context at a time: `[unit][context]` → the
    unit's activations at the context's positions after BOS."""
    hooks = sorted({view.hook_name("mlp_post", u.layer) for u in units})
    acts = [[] for _ in units]
    for c in contexts:
        _, cache = view.model.run_with_cache(torch.tensor([c.tokens]), names_filter=hooks)
        for j, u in enumerate(units):
            acts[j].append(cache[view.hook_name("mlp_post", u.layer)][0, bos:, u.index].clone())
    return acts


def assert_track_is_brute_force(track, j, acts, bos, largest=True, tol=1e-5):
    """TopK row j equals the brute-force top-k of one unit: same contexts in the same order, positions and
    values. Values equal in exact arithmetic (contexts sharing a prefix) can differ by float round-off
    between batch shapes, so only contexts whose values agree within `tol` may trade places."""
    maxes = [(float(a.max()), int(a.argmax()) + bos) for a in acts]
    sign = -1 if largest else 1
    k = track.values.shape[1]
    expected = sorted(range(len(acts)), key=lambda i: (sign * maxes[i][0], i))[:k]
    swapped = 0
    for slot, want in enumerate(expected):
        got, pos, value = int(track.index[j, slot]), int(track.pos[j, slot]), float(track.values[j, slot])
        assert value == pytest.approx(maxes[want][0], abs=tol)
        assert value == pytest.approx(maxes[got][0], abs=tol)
        assert float(acts[got][pos - bos]) == pytest.approx(maxes[got][0], abs=tol)
        assert float(track.rows[j, slot, pos]) == value
        if got != want:
            swapped += 1
            assert abs(maxes[got][0] - maxes[want][0]) <= tol
    assert len(set(track.index[j].tolist())) == k
    near_ties = any(abs(maxes[a][0] - maxes[b][0]) <= tol for a, b in zip(expected, expected[1:]))
    near_ties |= any(abs(m[0] - maxes[expected[-1]][0]) <= tol for i, m in enumerate(maxes) if i not in expected)
    return swapped, near_ties


@pytest.fixture
def planted_setup(planted, tmp_path):
    view = load_model(ModelConfig(model_name=str(planted.directory)))
    corpus = corpus_of(view, write_docs(tmp_path / "docs.jsonl", planted_corpus(planted, n_docs=120)))
    return planted, view, corpus


# -- the scan -----------------------------------------------------------------------------------


def test_top_k_equals_brute_force_and_holds_the_trigger(planted_setup):
    plant, view, corpus = planted_setup
    units = planted_units(plant)
    contexts = corpus.split("train")
    k = 12
    result = scan(UnitReader(view, units), contexts, {"top": k, "low": 5}, batch_size=7, window=3)
    acts = brute_force(view, units, contexts, bos=1)
    for j in range(len(units)):
        swapped, near_ties = assert_track_is_brute_force(result.tracks["top"], j, acts[j], bos=1)
        assert swapped == 0 or near_ties
        assert_track_is_brute_force(result.tracks["low"], j, acts[j], bos=1, largest=False)
    # the planted neuron's top-k is exactly the brute-force one: no near-ties to blur it
    assert assert_track_is_brute_force(result.tracks["top"], 0, acts[0], bos=1) == (0, False)
    triggers = set(plant.answer.trigger_token_ids.values())
    top = result.tracks["top"]
    for slot in range(k):
        c = contexts[int(top.index[0, slot])]
        assert triggers & set(c.tokens[1:int(top.pos[0, slot]) + 1]), "a top context of the planted neuron lacks the trigger"


def test_result_does_not_depend_on_batching_and_stops_early(planted_gpt2, tmp_path):
    view = load_model(ModelConfig(model_name=str(planted_gpt2.directory)))
    contexts = corpus_of(view, write_docs(tmp_path / "d.jsonl", planted_corpus(planted_gpt2, n_docs=60))).split("train")
    units = [neuron(0, 5), neuron(1, 7), neuron(1, 9)]
    reader = UnitReader(view, units)
    assert reader.stop_at_layer == 2
    acts = brute_force(view, units, contexts, bos=1)
    runs = [scan(reader, contexts, {"top": 6, "random": 4}, batch_size=b, window=w, seed=3) for b, w in ((1, 1), (5, 2), (64, 8))]
    for run in runs:
        for j in range(len(units)):
            assert_track_is_brute_force(run.tracks["top"], j, acts[j], bos=1)
        assert torch.equal(run.tracks["random"].index, runs[0].tracks["random"].index)
    # random samples: seeded, different per unit and per seed
    again = scan(reader, contexts, {"random": 4}, seed=3).tracks["random"].index
    other_seed = scan(reader, contexts, {"random": 4}, seed=4).tracks["random"].index
    assert torch.equal(again, runs[0].tracks["random"].index) and not torch.equal(again, other_seed)
    assert not torch.equal(again[0], again[1])


HALF_PRECISION_TOLERANCE = {"bfloat16": 0.02, "float16": 0.003}
"""Relative to a unit's top fp32 activation: how far half-precision values may be from fp32, and how close to
the k-th fp32 value a context must be to enter or leave the top-k (the README states the same)."""


@pytest.mark.parametrize("dtype", list(HALF_PRECISION_TOLERANCE))
def test_half_precision_top_k_agrees_with_float32_up_to_near_ties(planted, tmp_path, dtype):
    fp32 = load_model(ModelConfig(model_name=str(planted.directory)))
    half = load_model(ModelConfig(model_name=str(planted.directory), dtype=dtype))
    assert half.dtype == getattr(torch, dtype)
    contexts = corpus_of(fp32, write_docs(tmp_path / "docs.jsonl", planted_corpus(planted, n_docs=120))).split("train")
    units, k, tol = planted_units(planted), 12, HALF_PRECISION_TOLERANCE[dtype]
    wide = scan(UnitReader(fp32, units), contexts, {"top": 3 * k}).tracks["top"]  # fp32 values beyond the k-th
    ours = scan(UnitReader(half, units), contexts, {"top": k}).tracks["top"]
    assert ours.values.dtype == wide.values.dtype  # activations come back as float32 whatever the model's dtype
    for j in range(len(units)):
        fp32_value = dict(zip(wide.index[j].tolist(), wide.values[j].tolist()))
        scale = abs(float(wide.values[j, 0]))
        kth = float(wide.values[j, k - 1])
        assert (ours.values[j] - wide.values[j, :k]).abs().max() <= tol * scale
        reference, got = set(wide.index[j, :k].tolist()), set(ours.index[j].tolist())
        for i in got ^ reference:  # a context that trades places is a near-tie with the k-th
            assert i in fp32_value and abs(fp32_value[i] - kth) <= tol * scale, (j, i)
        assert len(got & reference) >= k - 2


def test_compiled_scan_equals_eager(planted_gpt2, tmp_path):
    """`mine.compile`: the reader under torch.compile (graph breaks at the hooks) gives eager's top-k."""
    view = load_model(ModelConfig(model_name=str(planted_gpt2.directory)))
    contexts = corpus_of(view, write_docs(tmp_path / "d.jsonl", planted_corpus(planted_gpt2, n_docs=40))).split("train")
    units = planted_units(planted_gpt2)
    eager = scan(UnitReader(view, units), contexts, {"top": 6}, batch_size=16).tracks["top"]
    compiled = scan(UnitReader(view, units, compile=True), contexts, {"top": 6}, batch_size=16).tracks["top"]
    assert torch.equal(compiled.index, eager.index) and torch.equal(compiled.pos, eager.pos)
    assert torch.allclose(compiled.values, eager.values, atol=1e-5)
    assert torch.allclose(compiled.rows, eager.rows, atol=1e-5, equal_nan=True)


def test_compile_failure_falls_back_to_eager(planted_gpt2, tmp_path, caplog):
    view = load_model(ModelConfig(model_name=str(planted_gpt2.directory)))
    contexts = corpus_of(view, write_docs(tmp_path / "d.jsonl", planted_corpus(planted_gpt2, n_docs=20))).split("train")
    units = planted_units(planted_gpt2)
    reader = UnitReader(view, units, compile=True)

    def broken(tokens):  # a fault injected at the seam: what Dynamo raises on a model it cannot trace
        raise AssertionError("Guard failed on the same frame it was created (fault injected by the test)")
    reader._compiled = broken
    fallen_back = scan(reader, contexts, {"top": 4}, batch_size=16).tracks["top"]
    eager = scan(UnitReader(view, units), contexts, {"top": 4}, batch_size=16).tracks["top"]
    assert torch.equal(fallen_back.index, eager.index) and torch.equal(fallen_back.values, eager.values)
    assert reader.compile_error.startswith("AssertionError: Guard failed") and "scanning eagerly" in caplog.text


def test_sae_latents_are_encoded_on_the_fly(planted_gpt2, tmp_path):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from sae_lens_ctx.inputs.sae import SaeSource

    view = load_model(ModelConfig(model_name=str(planted_gpt2.directory)))
    contexts = corpus_of(view, write_docs(tmp_path / "d.jsonl", planted_corpus(planted_gpt2, n_docs=40))).split("train")
    saes, units = {}, []
    for name, hook, d_in in (("resid", "blocks.1.hook_resid_post", view.d_model),
                             ("z", "blocks.0.attn.hook_z", view.n_heads * view.d_head)):
        torch.manual_seed(0)
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=32, metadata=SAEMetadata(hook_name=hook)))
        saes[name] = SaeSource.from_sae(sae, sae_id=name)
        units += [UnitRecord(unit_id=f"{name}:{i}", kind="sae_latent", layer=saes[name].layer, index=i,
                             hook_name=hook, token_id=0, token="", congruence=0.0, control=False,
                             direction="promote", rank_in_layer=1, sae_id=name) for i in (3, 17)]
    units.append(neuron(0, 5))
    reader = UnitReader(view, units, saes)
    result = scan(reader, contexts, {"top": 5}, batch_size=8)
    for j, u in enumerate(units[:-1]):
        acts = []
        for c in contexts:
            _, cache = view.model.run_with_cache(torch.tensor([c.tokens]), names_filter=[u.hook_name])
            x = cache[u.hook_name][0]
            acts.append(saes[u.sae_id].sae.encode(x.flatten(-2) if x.dim() == 3 else x)[1:, u.index].detach())
        assert_track_is_brute_force(result.tracks["top"], j, acts, bos=1)
    with pytest.raises(UserError, match="discover.saes"):
        UnitReader(view, units, {})


class TableReader:
    """A stand-in for `UnitReader` whose 'model' is a fixed random table: activation = table[token, unit].
    It isolates the mining code's memory from the model's (the Bridge's per-call alias resolution keeps
    refilling the interpreter's attribute cache with fresh strings, a bounded but slowly saturating amount)."""

    def __init__(self, n_units, vocab=64, n_ctx=64):
        self.table = torch.randn(vocab, n_units, generator=torch.Generator().manual_seed(0))
        self.n_units, self.unit_ids = n_units, [f"L0N{i}" for i in range(n_units)]
        self.view = type("View", (), {"device": torch.device("cpu"), "n_ctx": n_ctx, "tokenizer": None})()

    def __call__(self, tokens):
        return self.table[tokens]


def synthetic_contexts(n, seed=0):
    rng = random.Random(seed)
    return [TokenContext(f"doc{i // 3}", "train", i % 3, 0, (1, *(rng.randrange(2, 64) for _ in range(rng.randint(1, 31)))))
            for i in range(n)]


def test_memory_stays_flat_when_the_corpus_grows_tenfold():
    reader = TableReader(n_units=64)
    small, big = synthetic_contexts(2000), synthetic_contexts(20000)
    tracks = {"top": 20, "low": 10, "random": 10}

    def peak(contexts):
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        result = scan(reader, contexts, tracks, batch_size=256)
        growth = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        assert result.n_contexts == len(contexts)
        return growth

    peak(small)  # warm-up: one-time caches
    small_peak, big_peak = peak(small), peak(big)
    print(f"tracemalloc peak of the scan: {small_peak} B for {len(small)} contexts, {big_peak} B for {len(big)}")
    assert big_peak <= 1.10 * small_peak, (small_peak, big_peak)
    # and the kept state is sized by units × k × context width only
    result = scan(reader, big, tracks, batch_size=256)
    assert result.tracks["top"].rows.shape == (64, 20, 32) and result.tracks["random"].values.shape == (64, 10)


class Killed(Exception):
    pass


def test_killed_scan_resumes_to_the_uninterrupted_result(planted_llama, tmp_path):
    view = load_model(ModelConfig(model_name=str(planted_llama.directory)))
    contexts = corpus_of(view, write_docs(tmp_path / "d.jsonl", planted_corpus(planted_llama, n_docs=80))).split("train")
    reader = UnitReader(view, planted_units(planted_llama))
    tracks = {"top": 8, "low": 3, "random": 3}
    kwargs = dict(batch_size=6, window=2, checkpoint_every=1, identity="x")
    whole = scan(reader, contexts, tracks, **kwargs)
    ckpt = tmp_path / "mine.ckpt.safetensors"

    def kill_after(n):
        def on_batch(done):
            if done == n:
                raise Killed
        return on_batch

    with pytest.raises(Killed):
        scan(reader, contexts, tracks, checkpoint=ckpt, on_batch=kill_after(5), **kwargs)
    assert ckpt.exists()
    with pytest.raises(Killed):  # killed again after resuming
        scan(reader, contexts, tracks, checkpoint=ckpt, on_batch=kill_after(9), **kwargs)
    resumed = scan(reader, contexts, tracks, checkpoint=ckpt, **kwargs)
    assert resumed.resumed_at > 5 * 6 and resumed.tokens_scanned < resumed.n_tokens
    for name in tracks:
        for field in ("values", "index", "pos", "rows"):
            torch.testing.assert_close(getattr(resumed.tracks[name], field), getattr(whole.tracks[name], field),
                                       rtol=0, atol=0, equal_nan=True)
    # a checkpoint written for another scan is ignored, not resumed from
    fresh = scan(reader, contexts, {"top": 8}, checkpoint=ckpt, **kwargs)
    assert fresh.resumed_at == 0


# -- trimming -----------------------------------------------------------------------------------


def test_batched_search_equals_serial_search_on_non_monotone_activations():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 70) for _ in range(rng.randint(1, 12))]
        tables = [[rng.uniform(-1, 2) for _ in range(n)] for n in lengths]

        def evaluate(requests):
            return [torch.tensor([0.0] * (lengths[i] - s - 1) + [tables[i][s]]) for i, s in requests]

        serial = [trim_serial(lambda s, t=t: t[s], n, t[0], 0.8) for n, t in zip(lengths, tables)]
        for lookahead in (1, 2, 3, 8):
            assert trim_batched(evaluate, lengths, [t[0] for t in tables], 0.8, lookahead).starts == serial


@pytest.mark.parametrize("with_bos", [True, False])
def test_batched_trimming_equals_serial_binary_search(planted_setup, with_bos):
    plant, view, corpus = planted_setup
    units = planted_units(plant)
    reader = UnitReader(view, units)
    prompts = []
    for split in ("train", "test"):
        contexts = corpus.split(split)
        result = scan(reader, contexts, {"top": 8}, batch_size=16)
        prompts += collect_prompts(result, split, contexts, bos=1, max_tokens=100)
    bos_ids = [view.tokenizer.bos_token_id] if with_bos else []

    def serial_start(p):
        tokens = list(p.context.tokens[1:p.end + 1])
        return trim_serial(lambda s: float(reader(torch.tensor([bos_ids + tokens[s:]]))[0, -1, p.unit]),
                           len(tokens), p.activation, 0.8)

    expected = [serial_start(p) for p in prompts]
    assert any(s > 0 for s in expected)
    for lookahead in (1, 2, 8):
        cfg = MineConfig(trim_lookahead=lookahead, batch_size=5, trim_with_bos=with_bos)
        stats = trim_prompts(reader, prompts, cfg, 1, bos_ids, CONTEXT_SIZE)
        assert [p.start for p in prompts] == expected, lookahead
        for p in prompts:
            assert len(p.acts) == p.end - p.start
            if with_bos or p.start > 0:  # without BOS an untrimmed prompt is not the context's prefix
                assert float(p.acts[-1]) >= 0.8 * p.activation - 1e-6
        assert stats["rounds"] <= -(-5 // lookahead) + 1


# -- the stage ----------------------------------------------------------------------------------


def mine_config(docs, **mine_kwargs):
    return RunConfig(model=ModelConfig(), corpus=CorpusConfig(dataset_path=str(docs), context_size=CONTEXT_SIZE,
                                                              min_documents=10),
                     discover=DiscoverConfig(n_last_layers=1, top_k=1),
                     mine=MineConfig(**{"top_k": 10, "n_test_prompts": 5, "n_random": 4, "batch_size": 8, **mine_kwargs}))


def run_mine(plant, cfg, out):
    cfg.model.model_name = str(plant.directory)
    for stage in ("load", "discover", "mine"):
        run_pipeline(cfg, out, only=stage)
    return list(iter_jsonl(out / "contexts.jsonl"))


def test_stage_writes_contexts_acts_and_summary(planted_gpt2, tmp_path):
    docs = write_docs(tmp_path / "docs.jsonl", planted_corpus(planted_gpt2, n_docs=160))
    out = tmp_path / "run"
    records = run_mine(planted_gpt2, mine_config(docs), out)
    acts = load_file(out / "context_acts.safetensors")
    report = json.loads((out / "mine.json").read_text())
    documents = {d["doc_id"]: d for d in iter_jsonl(out / "documents.jsonl")}
    assert not list(out.glob("mine.ckpt*"))
    assert len(acts) == len(records) == report["n_records"]
    target = f"L{planted_gpt2.answer.neuron_layer}N{planted_gpt2.answer.neuron_index}"
    view = load_model(ModelConfig(model_name=str(planted_gpt2.directory)))
    corpus = corpus_of(view, docs)
    ranks = {}
    for i, r in enumerate(records):
        for key in ("unit_id", "split", "rank", "doc_id", "text", "activation", "trimmed_activation", "start", "end",
                    "next_token"):
            assert key in r
        row = acts[f"row{i}"]
        assert row.dtype == torch.float32 and len(row) == len(r["tokens"]) == r["end"] - r["start"]
        assert float(row[-1]) == pytest.approx(r["trimmed_activation"], abs=1e-6)
        ranks.setdefault((r["unit_id"], r["split"], r["kind"]), []).append(r["rank"])
        assert documents[r["doc_id"]]["split"] == r["split"]
        doc_ids = view.tokenizer(corpus.text(r["doc_id"]), add_special_tokens=False)["input_ids"]
        assert doc_ids[r["start"]:r["end"]] == r["tokens"]
        assert r["next_token_id"] == (doc_ids[r["end"]] if r["end"] < len(doc_ids) else None)
        if r["kind"] == "top":
            assert r["trimmed_activation"] >= 0.8 * r["activation"] - 1e-6 and len(r["tokens"]) < 100
        if r["unit_id"] == target and r["kind"] == "top":
            assert {"france", "louvre"} & set(r["text"].split()), r["text"]
    assert all(v == list(range(len(v))) for v in ranks.values())
    counts = {u["unit_id"]: u for u in report["per_unit"]}
    assert counts[target]["train_top"] == 10 and counts[target]["test_top"] == 5
    assert counts[target]["test_low"] == counts[target]["test_random"] == 5 and counts[target]["train_random"] == 4
    assert report["never_fired"] == [] and report["splits"]["train"]["n_tokens"] > 0
    assert_negatives_match_positives(records, report)

    # held-out split: no test document in any train prompt, by id and by text
    train = [r for r in records if r["split"] == "train"]
    test_docs = {d for d, rec in documents.items() if rec["split"] == "test"}
    assert test_docs and not {r["doc_id"] for r in train} & test_docs
    for r in train:
        assert r["text"].strip() in corpus.text(r["doc_id"])
        assert not any(corpus.text(d) in r["text"] for d in test_docs)


def assert_negatives_match_positives(records, report):
    """Held-out negatives (issue 18): one per positive, of the positive's exact token length (so the
    classes' mean lengths agree, within 10 % as the issue asks), from another document, not firing
    at their last token, and mine.json records both classes' lengths."""
    per_unit = {u["unit_id"]: u for u in report["per_unit"]}
    units = {r["unit_id"] for r in records}
    for unit in units:
        top = [r for r in records if r["unit_id"] == unit and r["split"] == "test" and r["kind"] == "top"]
        low = [r for r in records if r["unit_id"] == unit and r["split"] == "test" and r["kind"] == "low"]
        assert len(low) == len(top), unit
        assert sorted(len(r["tokens"]) for r in low) == sorted(len(r["tokens"]) for r in top)
        if top:
            mean_top = np.mean([len(r["tokens"]) for r in top])
            assert abs(np.mean([len(r["tokens"]) for r in low]) - mean_top) <= 0.1 * mean_top
            assert max(r["activation"] for r in low) <= 0.1 * max(0.0, max(r["activation"] for r in top)) + 1e-6
            lengths_auroc = score.auroc([True] * len(top) + [False] * len(low), [len(r["tokens"]) for r in top + low])
            assert 0.40 <= lengths_auroc <= 0.60  # a judge that reads only the length is at chance
        assert not {(r["doc_id"], r["end"]) for r in low} & {(r["doc_id"], r["end"]) for r in top}  # never a positive
        lengths = per_unit[unit]["test_lengths"]
        assert lengths["top"]["lengths"] == [len(r["tokens"]) for r in top]
        assert lengths["low"]["lengths"] == [len(r["tokens"]) for r in low]
    assert report["trim"]["n_positives_without_negative"] == 0


def test_stage_killed_and_resumed_writes_the_uninterrupted_files(planted_gpt2, tmp_path, monkeypatch):
    docs = write_docs(tmp_path / "docs.jsonl", planted_corpus(planted_gpt2, n_docs=120))
    whole = run_mine(planted_gpt2, mine_config(docs, batch_size=4, checkpoint_every=1), tmp_path / "whole")

    def kill(split, n):
        if split == "test" and n == 3:
            raise Killed
    monkeypatch.setattr(mine, "_fault_injection_after_batch", kill)
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        run_mine(planted_gpt2, mine_config(docs, batch_size=4, checkpoint_every=1), out)
    assert (out / "mine.ckpt.train.safetensors").exists()
    monkeypatch.setattr(mine, "_fault_injection_after_batch", None)
    resumed = run_mine(planted_gpt2, mine_config(docs, batch_size=4, checkpoint_every=1), out)
    assert resumed == whole
    assert (out / "mine.json").read_bytes() == (tmp_path / "whole" / "mine.json").read_bytes()
    scan = json.loads((out / "stages.json").read_text())["stages"]["mine"]["this_run"]["splits"]
    report = json.loads((out / "mine.json").read_text())
    assert scan["train"]["resumed_at_context"] == report["splits"]["train"]["n_contexts"]  # train was done
    for key in load_file(tmp_path / "whole" / "context_acts.safetensors"):
        assert torch.equal(load_file(out / "context_acts.safetensors")[key],
                           load_file(tmp_path / "whole" / "context_acts.safetensors")[key])


# -- bad input ----------------------------------------------------------------------------------


def test_unit_that_never_fires_is_recorded_not_fatal(planted_gpt2, tmp_path, capsys):
    triggers = set(planted_gpt2.answer.trigger_words.values())
    texts = [t for t in planted_corpus(planted_gpt2, n_docs=160) if not triggers & set(t.split())]
    out = tmp_path / "run"
    records = run_mine(planted_gpt2, mine_config(write_docs(tmp_path / "d.jsonl", texts)), out)
    target = f"L{planted_gpt2.answer.neuron_layer}N{planted_gpt2.answer.neuron_index}"
    report = json.loads((out / "mine.json").read_text())
    assert report["never_fired"] == [target]
    assert "never fired" in capsys.readouterr().out
    assert not [r for r in records if r["unit_id"] == target and r["kind"] == "top"]
    # negatives are matched to positives one by one: no positive, no negative (the unit cannot be scored)
    assert not [r for r in records if r["unit_id"] == target and r["kind"] == "low"]


def test_bad_mine_input(planted_gpt2, tmp_path):
    docs = write_docs(tmp_path / "docs.jsonl", planted_corpus(planted_gpt2, n_docs=80))
    cfg = mine_config(docs)
    cfg.model.model_name = str(planted_gpt2.directory)
    out = tmp_path / "run"
    run_pipeline(cfg, out, only="load")
    ctx = RunContext(out=out, config=cfg)
    with pytest.raises(UserError, match="no units.jsonl: run the discover stage"):
        mine.run_stage(ctx)
    (out / "units.jsonl").write_text("")
    with pytest.raises(UserError, match="holds no units"):
        mine.run_stage(ctx)
    run_pipeline(cfg, out, only="discover")
    cfg.mine.top_k = 100_000
    with pytest.raises(UserError, match=r"fewer than mine.top_k=100000"):
        mine.run_stage(RunContext(out=out, config=cfg))
    for bad in (dict(top_k=0), dict(trim_ratio=1.5), dict(max_prompt_tokens=1), dict(trim_lookahead=-1)):
        with pytest.raises(UserError, match="mine."):
            MineConfig(**bad).validate()

    view = load_model(ModelConfig(model_name=str(planted_gpt2.directory)))
    reader = UnitReader(view, planted_units(planted_gpt2))
    with pytest.raises(UserError, match="longer than the model's n_ctx"):
        scan(reader, [TokenContext("d", "train", 0, 0, tuple([1] + [7] * view.n_ctx))], {"top": 1})
    empty = TokenContext("e", "train", 0, 0, (view.tokenizer.bos_token_id,))
    result = scan(reader, [empty, TokenContext("d", "train", 0, 0, (1, 7, 8, 5, 9))], {"top": 2})
    assert result.n_skipped == 1 and result.tracks["top"].index[0].tolist() == [1, mine.EMPTY]
    with pytest.raises(UserError, match="does not exist"):
        UnitReader(view, [neuron(2, 10_000)])


# -- the embedded model -------------------------------------------------------------------------


@pytest.mark.embedded
def test_embedded_mining_is_offline_and_covers_every_unit(embedded_view, tmp_path):
    cfg = RunConfig(corpus=CorpusConfig(max_tokens=6000), discover=DiscoverConfig(n_last_layers=2, top_k=1),
                    mine=MineConfig(top_k=5, n_test_prompts=3, n_random=3))
    out = tmp_path / "run"
    for stage in ("load", "discover", "mine"):
        run_pipeline(cfg, out, only=stage, model=embedded_view.model)
    records = list(iter_jsonl(out / "contexts.jsonl"))
    units = [u["unit_id"] for u in iter_jsonl(out / "units.jsonl")]
    acts = load_file(out / "context_acts.safetensors")
    assert len(units) == 4
    for unit in units:
        for split in ("train", "test"):
            assert [r for r in records if r["unit_id"] == unit and r["split"] == split and r["kind"] == "top"]
    for i, r in enumerate(records):
        assert len(acts[f"row{i}"]) == len(r["tokens"]) and r["text"]
        if r["kind"] == "top":
            assert r["activation"] > 0 and r["trimmed_activation"] >= 0.8 * r["activation"] - 1e-4


def test_the_negatives_pool_is_drawn_independently_of_the_random_prompts():
    """The `pool` track (candidates for matched negatives) and the `random` track rank contexts by keys of
    their own: with shared keys (before), the 5 random contexts were always among the pool's 20."""
    from sae_lens_ctx.stages.mine.scan import random_keys

    contexts = [TokenContext(f"d{i}", "test", i % 3, 0, (1, 2, 3)) for i in range(200)]
    units = ["L2N37", "L2N5"]
    rand, pool = random_keys(0, contexts, units), random_keys(0, contexts, units, "pool")
    assert np.array_equal(rand, random_keys(0, contexts, units, "random"))  # the random prompts are unchanged
    assert rand.shape == pool.shape and np.all((0 <= pool) & (pool < 1))
    for u in range(len(units)):
        assert abs(np.corrcoef(rand[u], pool[u])[0, 1]) < 0.25
        assert not set(np.argsort(rand[u])[:5]) <= set(np.argsort(pool[u])[:20])
