"""ModelView: every model path gives the same answers; directions are exact; the embedded model loads offline."""

import pytest
import torch

from sae_lens_ctx.core.config import ModelConfig
from sae_lens_ctx.core.embedded import embedded_gguf_path
from sae_lens_ctx.inputs.model import ModelView, load_model, resolve_source


def _hooked(view, tokens, kinds, layer):
    """Activations of the hooks `kinds` at `layer`, keyed by kind (hook names differ on a Bridge)."""
    got = {}

    def saver(kind):
        def save(x, hook):
            got[kind] = x.detach().clone()
        return save

    view.run_with_hooks(tokens, [(view.hook_name(k, layer), saver(k)) for k in kinds], stop_at_layer=layer + 1)
    return got


def assert_mlp_read_exact(view, tokens, layer):
    """normalised input @ read + bias reproduces the hooked pre-activations of every branch."""
    kinds = ["resid_mid", "ln2_scale", "mlp_pre"] + (["mlp_pre_linear"] if view.gated else [])
    acts = _hooked(view, tokens, kinds, layer)
    x = acts["resid_mid"]
    if view.normalization == "LN":
        x = x - x.mean(-1, keepdim=True)
    normed = x / acts["ln2_scale"]
    read = view.mlp_read(layer)
    branches = {"gate": "mlp_pre", "up": "mlp_pre_linear"} if view.gated else {"in": "mlp_pre"}
    assert set(read.weights) == set(branches)
    for branch, kind in branches.items():
        pred = normed @ read.weights[branch] + read.bias[branch]
        torch.testing.assert_close(pred, acts[kind], atol=1e-4, rtol=1e-4)


CONVENTIONS = {"hf-directory/folded": "folded", "hf-directory/raw": "raw", "object/bridge": "raw",
               "object/hooked": "folded", "object/hooked-sae": "folded"}
"""The weight convention each path should report (a Bridge booted by hand keeps the raw weights)."""


def planted_views(plant):
    """The planted model through every model path the plugin supports."""
    from planted import bridge, hooked_transformer

    yield "hf-directory/folded", load_model(ModelConfig(model_name=str(plant.directory)))
    yield "hf-directory/raw", load_model(ModelConfig(model_name=str(plant.directory), weights="raw"))
    yield "object/bridge", ModelView.from_object(bridge(plant))
    yield "object/hooked", ModelView.from_object(hooked_transformer(plant))
    yield "object/hooked-sae", ModelView.from_object(hooked_transformer(plant, sae=True))


def test_planted_models_load_through_every_path_and_agree(planted):
    answer = planted.answer
    text = planted_corpus_text(planted)
    congruences = {}
    for label, view in planted_views(planted):
        assert view.weights == CONVENTIONS[label], label
        assert view.n_layers == planted.hf_model.config.num_hidden_layers, label
        assert view.gated == (planted.arch == "llama"), label
        tokens = view.to_tokens([text])
        assert_mlp_read_exact(view, tokens, answer.neuron_layer)
        # the planted neuron's output promotes the target token, in every path and convention
        logit_w = view.mlp_write(answer.neuron_layer)[answer.neuron_index] @ view.unembed()
        assert int(logit_w.argmax()) == answer.target_token_id, label
        congruences[label] = float(logit_w.max())
        # the neuron fires after a trigger: its activation there is far above the quiet level
        post = _hooked(view, tokens, ["mlp_post"], answer.neuron_layer)["mlp_post"][0, :, answer.neuron_index]
        assert post.max() > 0.5, label
    # TL processing is the reference: the same convention gives the same congruence whatever the path
    for convention in ("folded", "raw"):
        values = [congruences[k] for k, c in CONVENTIONS.items() if c == convention]
        assert max(values) - min(values) < 1e-3 * max(abs(v) for v in values), convention


def planted_corpus_text(plant):
    """A document of the plant's vocabulary with both triggers in it."""
    triggers = list(plant.answer.heads.values())
    return " ".join(["the", triggers[0].strip(), "and", "then", triggers[1].strip(), "and", "so"])


def test_resolve_source_classifies_names(tmp_path):
    assert resolve_source("embedded") == ("embedded-gguf", embedded_gguf_path())
    assert resolve_source("gpt2") == ("hub", "gpt2")
    assert resolve_source("EleutherAI/pythia-160m") == ("hub", "EleutherAI/pythia-160m")
    (tmp_path / "config.json").write_text("{}")
    assert resolve_source(str(tmp_path)) == ("hf-directory", tmp_path)


@pytest.mark.embedded
def test_embedded_model_loads_offline_and_matches_transformers(embedded_view):
    from transformers import AutoModelForCausalLM

    record = embedded_view.record()
    assert (record.source, record.model_class, record.weights) == ("embedded-gguf", "TransformerBridge", "folded")
    assert (record.n_layers, record.n_heads, record.n_kv_heads, record.d_mlp) == (30, 9, 3, 1536)
    assert embedded_view.gated and embedded_view.normalization == "RMS"
    path = embedded_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokens = embedded_view.to_tokens(["The quick brown fox jumps over the lazy dog because it was"])
    with torch.inference_mode():
        expected = reference(tokens).logits
    got = embedded_view.logits(tokens)
    # folded weights centre the unembedding: logits move by a per-position constant, probabilities do not
    torch.testing.assert_close(got.log_softmax(-1), expected.log_softmax(-1), atol=2e-4, rtol=1e-4)
    assert_mlp_read_exact(embedded_view, tokens, layer=5)


def test_length_batches_cover_every_row_once_within_the_budget_and_beat_one_batch_per_width():
    import random

    from sae_lens_ctx.inputs.view import FORWARD_OVERHEAD_TOKENS, length_batches

    rng = random.Random(0)
    lengths = [rng.choice([2, 3, 12, 13, 14, 40, 44]) for _ in range(200)]
    batches = list(length_batches(lengths, max_tokens=512))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 512
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    cost = lambda bs: sum(FORWARD_OVERHEAD_TOKENS + len(b) * max(lengths[i] for i in b) for b in bs)  # noqa: E731
    # the old rule: longest first, as many rows as fit the longest's width
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    greedy, i = [], 0
    while i < len(order):
        n = max(1, 512 // lengths[order[i]])
        greedy.append(order[i:i + n])
        i += n
    assert cost(batches) < cost(greedy)
    assert sorted(len(b) for b in length_batches([5] * 3, max_tokens=1, min_rows=2)) == [1, 2]  # min_rows wins
    assert list(length_batches([], 64)) == []
