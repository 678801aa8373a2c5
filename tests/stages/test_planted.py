"""The planted models of tests/support/planted.py really contain the mechanism their answer key claims.

Checked for both architectures (GPT-2 style and Llama style), in the HF model, in a
TransformerBridge booted offline from the saved directory, and in a HookedTransformer built from
the same weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))

from planted import (  # noqa: E402
    PlantedModel,
    bridge,
    encode,
    hf_congruence,
    hf_doc_activations,
    hf_neuron_activations,
    hooked_sae_transformer,
    hooked_transformer,
    make_planted,
    planted_corpus,
)

ARCHS = ["gpt2", "llama"]


# --------------------------------------------------------------------------------------------
# fixtures (module-scoped: each plant is built once, ~1 s)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=ARCHS)
def plant(request, tmp_path_factory) -> PlantedModel:
    return make_planted(request.param, tmp_path_factory.mktemp(f"planted_{request.param}"))


@pytest.fixture(scope="module")
def ht(plant):
    return hooked_transformer(plant)


@pytest.fixture(scope="module")
def br(plant):
    return bridge(plant)


@pytest.fixture(scope="module")
def corpus(plant):
    return planted_corpus(plant)


@pytest.fixture(scope="module")
def doc_acts(plant, corpus):
    return hf_doc_activations(plant, corpus)


def _trigger_prompts(plant: PlantedModel) -> dict[tuple[int, int], str]:
    """(planted head) -> a prompt with that head's trigger, ending 4 words after it."""
    return {head: f"the city of {t.strip()} is old and the river" for head, t in plant.answer.heads.items()}


def _trigger_index(plant: PlantedModel, ids: torch.Tensor) -> int | None:
    trig = set(plant.answer.trigger_token_ids.values())
    hits = [i for i, t in enumerate(ids.tolist()) if t in trig]
    assert len(hits) <= 1
    return hits[0] if hits else None


# --------------------------------------------------------------------------------------------
# tokenizer, saved directory, config
# --------------------------------------------------------------------------------------------


def test_answer_key_shape(plant):
    a = plant.answer
    assert (a.neuron_layer, a.neuron_index) == (2, 37)
    assert a.heads == {(0, 3): " france", (1, 5): " louvre"}
    assert a.target_token == " paris"
    assert len(a.upstream_heads) == 16
    assert set(a.silent_heads) == set(a.upstream_heads) - set(a.heads)
    assert len(a.silent_heads) == 14
    for head, tid in a.trigger_token_ids.items():
        assert plant.tokenizer.decode([tid]) == a.heads[head]
    assert plant.tokenizer.decode([a.target_token_id]) == a.target_token
    if plant.arch == "llama":
        assert a.shared_kv_siblings == {(0, 3): (0, 2), (1, 5): (1, 4)}


def test_tokenizer_one_id_per_word(plant, corpus):
    tok = plant.tokenizer
    target = tok.decode([plant.answer.target_token_id])
    assert target.startswith(" ") and len(target.strip()) > 2  # the paper's token filter
    for doc in corpus:
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(doc.split())
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == " " + doc
    assert tok("paris france louvre", add_special_tokens=False)["input_ids"] == [4, 5, 6]
    assert len(tok("", add_special_tokens=True)["input_ids"]) == 0  # no BOS added by the tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")


def test_directory_loads_offline_with_auto_classes(plant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(plant.directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(plant.directory, local_files_only=True, dtype=torch.float32).eval()
    ids = encode(plant, "the city of france is old")
    assert tok("the city of france is old", add_special_tokens=False)["input_ids"] == ids[0, 1:].tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plant.hf_model(ids).logits, atol=1e-5, rtol=0)


def test_hf_config(plant):
    hf = plant.hf_model
    assert not hf.training and next(hf.parameters()).dtype == torch.float32
    assert hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()  # tied
    if plant.arch == "gpt2":
        assert type(hf).__name__ == "GPT2LMHeadModel"
        assert (hf.config.n_layer, hf.config.n_head) == (3, 8)
    else:
        c = hf.config
        assert type(hf).__name__ == "LlamaForCausalLM"
        assert (c.num_attention_heads, c.num_key_value_heads) == (8, 4)
        assert c.rope_parameters["rope_theta"] == 1e12
        assert not any(name.endswith("bias") for name, _ in hf.named_parameters())
        # GQA siblings of the planted heads write nothing
        for (layer, head), (_, sib) in plant.answer.shared_kv_siblings.items():
            o = hf.model.layers[layer].self_attn.o_proj.weight
            assert torch.count_nonzero(o[:, sib * 8 : (sib + 1) * 8]) == 0
            assert torch.count_nonzero(o[:, head * 8 : (head + 1) * 8]) > 0


# --------------------------------------------------------------------------------------------
# the mechanism in the HF model
# --------------------------------------------------------------------------------------------


def test_neuron_fires_after_either_trigger_and_is_silent_otherwise(plant, corpus, doc_acts):
    a = plant.answer
    after = {head: [] for head in a.heads}
    before, none = [], []
    for doc, acts in zip(corpus, doc_acts):
        ids = encode(plant, doc)[0]
        t = _trigger_index(plant, ids)
        if t is None:
            none.append(acts)
            continue
        head = next(h for h, tid in a.trigger_token_ids.items() if tid == ids[t])
        after[head].append(acts[t + 1 :])
        before.append(acts[:t])
    silent = torch.cat(none + before).abs().max()
    assert silent < 0.01
    for head, chunks in after.items():
        fired = torch.cat(chunks)
        assert fired.min() > 1.0, head
        assert fired.min() > 100 * silent, head
        assert fired.std() > 0.1  # activations vary across contexts, they are not all tied
    if plant.arch == "llama":
        assert silent < 1e-5  # silu(0) * 0


def test_top_contexts_split_between_the_two_heads(plant, corpus, doc_acts):
    """Each planted head drives ~50 % of the top-activating documents (inside the 25-75 % band)."""
    peaks = torch.stack([acts.max() for acts in doc_acts])
    order = peaks.argsort(descending=True).tolist()
    kind = ["a" if " france " in f" {d} " else "b" if " louvre " in f" {d} " else "-" for d in corpus]
    assert kind.count("a") == kind.count("b") == 50
    assert not any(" france " in f" {d} " and " louvre " in f" {d} " for d in corpus)
    assert all(8 <= len(d.split()) <= 40 for d in corpus)
    for k in (10, 20, 50):
        top = [kind[i] for i in order[:k]]
        assert "-" not in top
        assert 0.3 <= top.count("a") / k <= 0.7, (k, top)


def test_congruence_picks_the_planted_neuron_and_target(plant):
    a = plant.answer
    cong = hf_congruence(plant).detach()  # [d_mlp, d_vocab], final-norm gain applied
    assert cong[a.neuron_index].argmax().item() == a.target_token_id
    assert cong[a.neuron_index, a.target_token_id].item() == pytest.approx(a.expected_congruence, rel=1e-5)
    # exactly zero for every other token: only " paris" has a u_target component
    others = torch.cat([cong[a.neuron_index, : a.target_token_id], cong[a.neuron_index, a.target_token_id + 1 :]])
    assert others.abs().max() < 1e-5
    best = cong.max(-1).values
    assert best.argmax().item() == a.neuron_index
    runner_up = best.topk(2).values[1]
    assert runner_up < a.expected_congruence / 10
    for layer in range(a.neuron_layer):  # no neuron of an earlier layer competes either
        assert hf_congruence(plant, layer).max() < a.expected_congruence / 10
    # vocab-centred (what center_unembed does) keeps the same argmax
    centred = cong - cong.mean(-1, keepdim=True)
    assert centred[a.neuron_index].argmax().item() == a.target_token_id


def test_model_predicts_target_after_trigger(plant):
    a = plant.answer
    for head, prompt in _trigger_prompts(plant).items():
        ids = encode(plant, prompt)
        t = _trigger_index(plant, ids[0])
        with torch.no_grad():
            logits = plant.hf_model(ids).logits[0]
        logits = logits - logits.mean(-1, keepdim=True)
        assert (logits[t + 1 :].argmax(-1) == a.target_token_id).float().mean() >= 0.75, head
        assert logits[t + 1 :, a.target_token_id].min() > logits[:t, a.target_token_id].max() + 5


# --------------------------------------------------------------------------------------------
# TransformerLens views: same numbers as HF
# --------------------------------------------------------------------------------------------


def _batch(plant):
    return encode(plant, list(_trigger_prompts(plant).values()) + ["we the of the new market in a house"])


def _centre(x):
    return x - x.mean(-1, keepdim=True)


def test_bridge_matches_hf(plant, br):
    a = plant.answer
    ids = _batch(plant)
    with torch.no_grad():
        hf_logits = plant.hf_model(ids).logits
        logits, cache = br.run_with_cache(ids)
    torch.testing.assert_close(logits, hf_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(
        cache[f"blocks.{a.neuron_layer}.mlp.hook_post"][..., a.neuron_index],
        hf_neuron_activations(plant, ids),
        atol=1e-4,
        rtol=0,
    )
    assert br.to_tokens("the city of france").tolist() == encode(plant, "the city of france").tolist()


def test_bridge_compatibility_mode_matches_hf(plant):
    a = plant.answer
    b = bridge(plant, compatibility_mode=True)
    ids = _batch(plant)
    with torch.no_grad():
        logits, cache = b.run_with_cache(ids)
        hf_logits = plant.hf_model(ids).logits
    torch.testing.assert_close(_centre(logits), _centre(hf_logits), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        cache[f"blocks.{a.neuron_layer}.mlp.hook_post"][..., a.neuron_index],
        hf_neuron_activations(plant, ids),
        atol=1e-4,
        rtol=0,
    )


@pytest.mark.parametrize("sae", [False, True], ids=["HookedTransformer", "HookedSAETransformer"])
def test_hooked_transformer_matches_hf(plant, sae, ht):
    a = plant.answer
    model = hooked_sae_transformer(plant) if sae else ht
    if sae:
        from sae_lens import HookedSAETransformer

        assert isinstance(model, HookedSAETransformer)
    assert model.cfg.normalization_type == ("LNPre" if plant.arch == "gpt2" else "RMSPre")
    ids = _batch(plant)
    with torch.no_grad():
        hf_logits = plant.hf_model(ids).logits
        logits, cache = model.run_with_cache(ids)
    # center_unembed shifts each position's logits by a constant
    torch.testing.assert_close(_centre(logits), _centre(hf_logits), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        cache[f"blocks.{a.neuron_layer}.mlp.hook_post"][..., a.neuron_index],
        hf_neuron_activations(plant, ids),
        atol=1e-4,
        rtol=0,
    )
    assert model.to_tokens("the city of france").tolist() == encode(plant, "the city of france").tolist()
    # folded congruence: W_out @ W_U (gain folded, unembedding centred) still points at the target
    cong = (model.W_out[a.neuron_layer] @ model.W_U).detach()
    assert cong.max(-1).values.argmax().item() == a.neuron_index
    assert cong[a.neuron_index].argmax().item() == a.target_token_id


# --------------------------------------------------------------------------------------------
# attention look-ups, direct attribution, ablation
# --------------------------------------------------------------------------------------------


def test_planted_heads_attend_to_their_trigger(plant, ht):
    for (layer, head), prompt in _trigger_prompts(plant).items():
        ids = encode(plant, prompt)
        t = _trigger_index(plant, ids[0])
        with torch.no_grad():
            _, cache = ht.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, head]  # [q, k]
        assert (pattern[t:].argmax(-1) == t).all()
        assert pattern[t:, t].min() > 0.8


@pytest.mark.parametrize("plant", ["llama"], indirect=True)  # rotary only: the Llama-style planted model
def test_llama_lookup_is_position_independent(plant, ht):
    """RoPE with theta 1e12 and the q.k content on the lowest-frequency pair: the score of head
    A from a fixed query token to the trigger does not depend on the distance."""
    (layer, head), trig = next(iter(plant.answer.heads.items()))
    ids = encode(plant, trig.strip() + " the" * 39)
    with torch.no_grad():
        _, cache = ht.run_with_cache(ids, names_filter=lambda n: n.endswith("attn_scores"))
    scores = cache[f"blocks.{layer}.attn.hook_attn_scores"][0, head, 2:, 1]  # queries " the" -> trigger
    assert scores.min() > 3.0
    assert (scores.max() - scores.min()) < 1e-3


def _direct_head_attribution(model, cache, plant, pos: int) -> torch.Tensor:
    """Per upstream head: z[pos, h] @ W_O[h] @ w_read / ln2_scale[pos] (folded HT weights)."""
    b, n = plant.answer.neuron_layer, plant.answer.neuron_index
    w_read = model.W_gate[b][:, n] if model.cfg.gated_mlp else model.W_in[b][:, n]
    scale = cache[f"blocks.{b}.ln2.hook_scale"][0, pos]
    rows = []
    for layer in range(b):
        z = cache[f"blocks.{layer}.attn.hook_z"][0, pos]  # [n_heads, d_head]
        rows.append(torch.einsum("hd,hdm->hm", z, model.W_O[layer]) @ w_read / scale)
    return torch.cat(rows)  # [n_layers_before * n_heads], order (layer, head)


def test_direct_attribution_singles_out_the_planted_head(plant, ht):
    a = plant.answer
    heads = a.upstream_heads
    for planted, prompt in _trigger_prompts(plant).items():
        ids = encode(plant, prompt)
        T = ids.shape[1] - 1
        with torch.no_grad():
            _, cache = ht.run_with_cache(ids)
            attr = _direct_head_attribution(ht, cache, plant, T)
        i = heads.index(planted)
        assert attr.argmax().item() == i
        assert attr[i] > 2.0
        others = torch.cat([attr[:i], attr[i + 1 :]])
        assert others.abs().max() < 1e-4 * attr[i]  # silent heads (and the other planted head)
        active = attr > attr.mean() + 2 * attr.std()  # the paper's rule, sample std
        assert active.nonzero().flatten().tolist() == [i]

        # Exactness: the full decomposition of the MLP input reproduces hook_pre (gate branch).
        b, n = a.neuron_layer, a.neuron_index
        with torch.no_grad():
            stack = cache.decompose_resid(layer=b, mlp_input=True, pos_slice=T)
            normed = cache.apply_ln_to_stack(stack, layer=b, mlp_input=True, pos_slice=T)
            w_read = ht.W_gate[b][:, n] if ht.cfg.gated_mlp else ht.W_in[b][:, n]
            const = 0.0 if ht.cfg.gated_mlp else ht.b_in[b][n]
            total = (normed @ w_read).sum(0)[0] + const
            heads_from_cache = cache.apply_ln_to_stack(
                cache.stack_head_results(layer=b, pos_slice=T), layer=b, mlp_input=True, pos_slice=T
            ) @ w_read
        torch.testing.assert_close(total, cache[f"blocks.{b}.mlp.hook_pre"][0, T, n], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(heads_from_cache[:, 0], attr, atol=1e-4, rtol=1e-4)


def test_direct_attribution_on_raw_bridge(plant, br):
    """Same attribution from the raw-weight Bridge, folding the ln2 gain (and centring, LN) by hand."""
    a = plant.answer
    b, n = a.neuron_layer, a.neuron_index
    for planted, prompt in _trigger_prompts(plant).items():
        ids = encode(plant, prompt)
        T = ids.shape[1] - 1
        with torch.no_grad():
            _, cache = br.run_with_cache(ids)
            w_read = br.blocks[b].ln2.weight * (br.W_gate[b][:, n] if plant.arch == "llama" else br.W_in[b][:, n])
            scale = cache[f"blocks.{b}.ln2.hook_scale"][0, T]
            rows = []
            for layer in range(b):
                out = torch.einsum("hd,hdm->hm", cache[f"blocks.{layer}.attn.hook_z"][0, T], br.W_O[layer])
                if plant.arch == "gpt2":
                    out = out - out.mean(-1, keepdim=True)
                rows.append(out @ w_read / scale)
            attr = torch.cat(rows)
        i = a.upstream_heads.index(planted)
        assert attr.argmax().item() == i
        assert (attr > attr.mean() + 2 * attr.std()).nonzero().flatten().tolist() == [i]


def test_ablating_the_planted_head_silences_the_neuron(plant, ht):
    a = plant.answer
    b, n = a.neuron_layer, a.neuron_index
    post_name = f"blocks.{b}.mlp.hook_post"

    def run(ids, ablate):
        store = {}

        def zero(z, hook):
            for layer, head in ablate:
                if hook.layer() == layer:
                    z[:, :, head] = 0.0
            return z

        def keep(act, hook):
            store["post"] = act[..., n].clone()

        hooks = [(f"blocks.{layer}.attn.hook_z", zero) for layer in {l for l, _ in ablate}]
        with torch.no_grad():
            ht.run_with_hooks(ids, fwd_hooks=hooks + [(post_name, keep)], return_type=None)
        return store["post"][0]

    for planted, prompt in _trigger_prompts(plant).items():
        ids = encode(plant, prompt)
        t = _trigger_index(plant, ids[0])
        clean = run(ids, [])[t + 1 :]
        assert clean.min() > 1.0
        assert run(ids, [planted])[t + 1 :].abs().max() < 0.01
        other = [h for h in a.heads if h != planted]
        torch.testing.assert_close(run(ids, other)[t + 1 :], clean, atol=1e-5, rtol=0)
        without_silent = run(ids, a.silent_heads)[t + 1 :]
        assert ((without_silent - clean).abs() / clean).max() < 0.05
