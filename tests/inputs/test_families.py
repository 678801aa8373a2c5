"""Every model family gets the right numbers (issue 17).

For each tiny family of `tiny.py` (GPT-2, Llama with GQA, Gemma with `1 + w` norms, Gemma 2 with
sandwich norms, GPT-NeoX with parallel blocks) and both weight conventions, a run's load → discover →
mine → attribute output is recomputed here with plain `transformers` (no TransformerLens): every
unit's congruence and token, every mined per-token activation, every head attribution; and the
package's decomposition sums to the hooked pre-activation.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import FAMILIES, PROSE, make_tiny

from sae_lens_ctx.stages.attribute import ablation_drops, decompose_pre_activation, unit_read
from sae_lens_ctx.core.config import AttributeConfig, CorpusConfig, DiscoverConfig, MineConfig, ModelConfig, RunConfig
from sae_lens_ctx.inputs.model import load_model
from sae_lens_ctx.pipeline.engine import run_pipeline
from sae_lens_ctx.core.records import UnitRecord


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """family → its tiny model directory, each built once per session on first use."""
    built: dict[str, object] = {}

    def get(arch: str, **kwargs):
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = make_tiny(arch, tmp_path_factory.mktemp(arch), **kwargs)
        return built[key]
    return get


# -- the independent recomputation (transformers only) ----------------------------------------------


class Reference:
    """One family's pieces read straight from the Hugging Face module tree."""

    def __init__(self, directory, arch: str):
        from transformers import AutoModelForCausalLM

        self.arch = arch
        self.hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        c = self.hf.config
        self.n_heads = c.num_attention_heads if hasattr(c, "num_attention_heads") else c.n_head
        self.gemma = arch.startswith("gemma")
        self.ln = arch in ("gpt2", "neox")
        if arch == "gpt2":
            body = self.hf.transformer
            self.layers, self.final = body.h, body.ln_f
        elif arch == "neox":
            body = self.hf.gpt_neox
            self.layers, self.final = body.layers, body.final_layer_norm
        else:
            self.layers, self.final = self.hf.model.layers, self.hf.model.norm
        self.W_U = self.hf.get_output_embeddings().weight.detach().T  # [d_model, V]

    def gain(self, norm) -> torch.Tensor:
        w = norm.weight.detach()
        return 1.0 + w if self.gemma else w

    def eps(self, norm) -> float:
        return float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-5)))

    def scale(self, norm, x: torch.Tensor) -> torch.Tensor:
        """The norm's scale at each position of `x` (`[pos, d]` → `[pos, 1]`)."""
        if self.ln:
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1, keepdim=True) + self.eps(norm)).sqrt()

    def modules(self, layer: int) -> dict:
        b = self.layers[layer]
        if self.arch == "gpt2":
            return dict(norm=b.ln_2, read={"in": b.mlp.c_fc.weight.detach().T}, down=b.mlp.c_proj,
                        w_out=b.mlp.c_proj.weight.detach().T, o=b.attn.c_proj, w_o=b.attn.c_proj.weight.detach().T)
        if self.arch == "neox":
            return dict(norm=b.post_attention_layernorm, read={"in": b.mlp.dense_h_to_4h.weight.detach()},
                        down=b.mlp.dense_4h_to_h, w_out=b.mlp.dense_4h_to_h.weight.detach(), o=b.attention.dense,
                        w_o=b.attention.dense.weight.detach())
        norm = b.pre_feedforward_layernorm if self.arch == "gemma2" else b.post_attention_layernorm
        return dict(norm=norm, read={"gate": b.mlp.gate_proj.weight.detach(), "up": b.mlp.up_proj.weight.detach()},
                    down=b.mlp.down_proj, w_out=b.mlp.down_proj.weight.detach(), o=b.self_attn.o_proj,
                    w_o=b.self_attn.o_proj.weight.detach(),
                    post_attn=b.post_attention_layernorm if self.arch == "gemma2" else None,
                    post_ff=b.post_feedforward_layernorm if self.arch == "gemma2" else None)

    def congruence(self, layer: int, folded: bool) -> torch.Tensor:
        """`[d_mlp, V]`: each neuron's write (through a sandwich norm's gain) on the final-norm-gained
        unembedding; centred over d_model (LayerNorm) and over the vocabulary in the folded convention."""
        m = self.modules(layer)
        write = m["w_out"].T  # [d_mlp, d_model]
        if m.get("post_ff") is not None:
            write = write * self.gain(m["post_ff"])
        if folded and self.ln:
            write = write - write.mean(-1, keepdim=True)
        u = self.gain(self.final)[:, None] * self.W_U
        if folded:
            u = u - u.mean(-1, keepdim=True)
        return write @ u

    def value_bias(self, layer: int) -> torch.Tensor:
        """`[n_heads, d_head]` value of a zero normalised input: the value bias plus the input
        LayerNorm's bias through W_V (zeros for the bias-less RMS families)."""
        b = self.layers[layer]
        d = self.W_U.shape[0]
        if self.arch == "gpt2":
            return b.attn.c_attn(b.ln_1.bias.detach())[2 * d:].reshape(self.n_heads, -1)
        if self.arch == "neox":
            return b.attention.query_key_value(b.input_layernorm.bias.detach()).reshape(self.n_heads, 3, -1)[:, 2]
        v = b.self_attn.v_proj.bias
        return torch.zeros(self.n_heads, d // self.n_heads) if v is None else v.detach().reshape(self.n_heads, -1)

    @torch.inference_mode()
    def run(self, ids: list[int], layer: int, fold_value_bias: bool = False) -> dict:
        """One forward: the MLP's input residual stream and output activations at `layer`, and every
        earlier layer's per-head outputs into the residual stream (`[pos, n_heads, d_model]`).
        `fold_value_bias`: each head's value bias counts as the layer's output bias, not the head's
        (TransformerLens's `fold_value_biases`, part of the folded convention; attention weights sum to 1)."""
        got: dict = {}
        handles = []
        m = self.modules(layer)
        handles.append(m["norm"].register_forward_pre_hook(lambda mod, a: got.__setitem__("resid", a[0][0])))
        handles.append(m["down"].register_forward_pre_hook(lambda mod, a: got.__setitem__("post", a[0][0])))
        for l in range(layer + 1):
            o = self.modules(l)["o"]
            handles.append(o.register_forward_pre_hook(lambda mod, a, l=l: got.__setitem__(f"z{l}", a[0][0])))
        try:
            self.hf(torch.tensor([ids]))
        finally:
            for h in handles:
                h.remove()
        for l in range(layer + 1):
            ml = self.modules(l)
            z = got[f"z{l}"].reshape(len(ids), self.n_heads, -1)
            if fold_value_bias:
                z = z - self.value_bias(l)
            w_o = ml["w_o"].reshape(ml["w_o"].shape[0], self.n_heads, -1)  # [d_model, H, d_head]
            heads = torch.einsum("phd,mhd->phm", z, w_o)
            if ml.get("post_attn") is not None:  # Gemma 2: o_proj output → post-attention RMSNorm
                total = got[f"z{l}"] @ ml["w_o"].T
                heads = heads / self.scale(ml["post_attn"], total)[:, None] * self.gain(ml["post_attn"])
            got[f"heads{l}"] = heads
        return got

    def attributions(self, ids: list[int], layer: int, index: int, branch: str, head_layers: list[int],
                     folded: bool) -> torch.Tensor:
        """`[n_upstream_heads]` direct attributions at the last position: head output → the MLP's norm
        (centred for LayerNorm, divided by its scale) → the neuron's read row with the norm gain."""
        got = self.run(ids, layer, fold_value_bias=folded)
        m = self.modules(layer)
        w = self.gain(m["norm"]) * m["read"][branch][index]
        s = self.scale(m["norm"], got["resid"])[-1]
        out = []
        for l in head_layers:
            h = got[f"heads{l}"][-1]  # [H, d_model]
            if self.ln:
                h = h - h.mean(-1, keepdim=True)
            out.append(h @ w / s)
        return torch.cat(out) if out else torch.zeros(0)


# -- a run per family and weight convention ----------------------------------------------------------


def family_config(directory, weights: str, **corpus) -> RunConfig:
    return RunConfig(
        model=ModelConfig(model_name=str(directory), weights=weights),
        corpus=CorpusConfig(dataset_path=str(PROSE), context_size=32, max_tokens=2500, min_documents=10, **corpus),
        discover=DiscoverConfig(layers=[1], top_k=2),
        mine=MineConfig(top_k=6, n_test_prompts=3, n_random=2, batch_size=16),
        attribute=AttributeConfig(n_prompts=6, include_same_layer=True, rule="topk:2"))


def _rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.mark.parametrize("weights", ["folded", "raw"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_run_matches_transformers(arch, weights, family_dirs, tmp_path):
    directory = family_dirs(arch)
    out = tmp_path / "run"
    run_pipeline(family_config(directory, weights), out, until="attribute")
    ref = Reference(directory, arch)
    folded = weights == "folded"
    units = _rows(out / "units.jsonl")
    assert units and any(not u["control"] for u in units)

    # discover: congruence and token of every unit (real and control)
    cong = ref.congruence(1, folded)
    for u in units:
        value, token = cong[u["index"]].max(0)
        assert u["token_id"] == int(token), u["unit_id"]
        assert u["congruence"] == pytest.approx(float(value), rel=1e-4, abs=1e-5), u["unit_id"]

    # mine: every per-token activation of every prompt (run with BOS, as the stage does)
    contexts = _rows(out / "contexts.jsonl")
    acts = load_file(str(out / "context_acts.safetensors"))
    bos = ref.hf.config.bos_token_id
    by_unit = {u["unit_id"]: u for u in units}
    for line, c in enumerate(contexts):
        row = acts[f"row{line}"].float()
        got = ref.run([bos] + c["tokens"], 1)["post"][:, by_unit[c["unit_id"]]["index"]]
        got = got if len(row) == len(got) else got[1:]
        torch.testing.assert_close(row, got, rtol=1e-4, atol=1e-5)

    # attribute: every head attribution of every prompt; heads of the unit's own layer only in a sequential block
    matrices = load_file(str(out / "attributions.safetensors"))
    head_layers = [0] if arch == "neox" else [0, 1]
    branch = "in" if arch in ("gpt2", "neox") else "gate"
    n_checked = 0
    for u in units:
        top = sorted((c for c in contexts if c["unit_id"] == u["unit_id"] and c["kind"] == "top"
                      and c["split"] == "train"), key=lambda c: c["rank"])[:6]
        if not top:
            continue
        mat = matrices[f"{u['unit_id']}/train/{branch}"]
        assert mat.shape == (len(top), len(head_layers) * ref.n_heads)
        for p, c in enumerate(top):
            want = ref.attributions([bos] + c["tokens"], 1, u["index"], branch, head_layers, folded)
            torch.testing.assert_close(mat[p], want, rtol=1e-4, atol=1e-5)
            n_checked += 1
    assert n_checked

    # the decomposition sums to the hooked pre-activation
    view = load_model(ModelConfig(model_name=str(directory), weights=weights))
    for u in units[:2]:
        read = unit_read(view, UnitRecord(**u), AttributeConfig(include_same_layer=True), {})
        tokens = torch.tensor([bos] + contexts[0]["tokens"])
        for b in read.directions:
            _, contrib, reference = decompose_pre_activation(view, read, tokens, b)
            torch.testing.assert_close(contrib.sum(0), reference, rtol=1e-4, atol=1e-5)
    model = json.loads((out / "model.json").read_text())
    assert model["norm_gain"] == ("1+w" if arch.startswith("gemma") else "w")
    assert model["block"] == {"neox": "parallel", "gemma2": "sandwich"}.get(arch, "sequential")


# -- per-head ablation under grouped-query attention (case 07) ----------------------------------------


def test_gqa_ablation_removes_one_query_head_in_every_mode(family_dirs):
    from sae_lens_ctx.stages.attribute import attribute_prompts, mean_head_outputs

    view = load_model(ModelConfig(model_name=str(family_dirs("llama-gqa")), weights="raw"))
    assert (view.n_heads, view.n_kv_heads) == (4, 2)
    unit = UnitRecord(unit_id="L1N62", kind="neuron", layer=1, index=62, hook_name="blocks.1.mlp.hook_post",
                      token_id=5, token=" x", congruence=0.0, control=False, direction="promote", rank_in_layer=1)
    read = unit_read(view, unit, AttributeConfig(), {})
    texts = ["The river carried the forgotten map as the sun went down.",
             "A young painter visited the evening market without any help."]
    prompts = [[view.tokenizer.bos_token_id] + view.tokenizer(t)["input_ids"] for t in texts]
    heads = [(0, h) for h in range(4)]  # query heads 0, 1 share KV head 0; 2, 3 share KV head 1
    attributions = attribute_prompts(view, read, prompts)[0]["gate"]
    assert not torch.allclose(attributions[:, 0], attributions[:, 1])
    mean_z = mean_head_outputs(view, prompts, [0])
    drops = {mode: ablation_drops(view, read, prompts, heads, mode, mean_z)[1] for mode in ("z", "v", "mean")}
    for mode, act in drops.items():
        for a, b in ((0, 1), (2, 3)):  # two heads of one KV group get different drops
            assert not torch.allclose(act[:, a], act[:, b], atol=1e-6), mode
    torch.testing.assert_close(drops["v"], drops["z"])  # zeroing one head's values zeroes its z
    # the z drop equals an independent ablation in transformers: head h's slice of o_proj's input zeroed
    ref = Reference(family_dirs("llama-gqa"), "llama-gqa")
    o_proj = ref.modules(0)["o"]
    clean = torch.stack([ref.run(p, 1)["post"][-1, 62] for p in prompts])
    for h in range(4):
        def zero_head(mod, args, h=h):
            z = args[0].clone()
            z[..., h * 16:(h + 1) * 16] = 0.0
            return (z,)
        handle = o_proj.register_forward_pre_hook(zero_head)
        try:
            ablated = torch.stack([ref.run(p, 1)["post"][-1, 62] for p in prompts])
        finally:
            handle.remove()
        torch.testing.assert_close(drops["z"][:, h], clean - ablated, rtol=1e-4, atol=1e-6)


# -- tokens as words (cases 11 and 12) ---------------------------------------------------------------


def test_sentencepiece_units_pass_the_paper_filter_with_their_leading_space(family_dirs, tmp_path):
    """Case 12: `▁river` decodes alone to 'river'; read in context it is ' river', so the paper's
    leading-space filter (on by default) keeps word-start tokens and the run finds units."""
    from transformers import AutoTokenizer

    from sae_lens_ctx.inputs.tokens import token_strings

    directory = family_dirs("llama-gqa", tok="sentencepiece")
    tok = AutoTokenizer.from_pretrained(directory)
    river = tok.convert_tokens_to_ids("\u2581river")
    assert tok.decode([river]) == "river" and token_strings(tok, [river]) == [" river"]
    out = tmp_path / "run"
    run_pipeline(family_config(directory, "folded"), out, until="discover")
    real = [u for u in _rows(out / "units.jsonl") if not u["control"]]
    assert len(real) == 2
    for u in real:
        piece = tok.convert_ids_to_tokens(u["token_id"])
        assert piece.startswith("\u2581") and u["token"] == " " + piece[1:]
        assert u["top_tokens"][0][0] == u["token"]


@pytest.mark.parametrize("tok", ["bytelevel", "sentencepiece"])
def test_pieces_spell_emoji_and_cjk_text(tok):
    """Case 11: characters split over several byte-level tokens render as pieces that concatenate to
    the text (the old splitter repeated the whole prefix after a half character)."""
    from tiny import PROSE, build_tokenizer

    from sae_lens_ctx.stages.report.html import ContextRenderer
    from sae_lens_ctx.inputs.tokens import token_pieces

    tokenizer = build_tokenizer(tok)
    rare = (PROSE.parent / "rare.txt").read_text(encoding="utf-8").split("\n\n")
    texts = ["party \U0001F389\U0001F680 time", "the farmer \u946b\u9f98 river", *rare[:12]]
    renderer = ContextRenderer(PROSE.parent, tokenizer)
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces = token_pieces(tokenizer, ids)
        assert len(pieces) == len(ids)
        assert "".join(pieces) == tokenizer.decode(ids) == text
        assert "\ufffd" not in "".join(pieces)
        assert renderer.pieces({"tokens": ids, "text": text}) == pieces  # shaded, not shown whole
    assert any(ord(c) > 0xFFFF for c in texts[0])  # an emoji that byte-level BPE splits


# -- tokenizer facts (cases 05 and B7) -----------------------------------------------------------------


def test_a_tokenizer_without_bos_is_refused_or_recorded(family_dirs, tmp_path, capsys):
    """Case 05: TransformerLens gives a BOS-less tokenizer EOS as its BOS; that counts as none, so the
    documented error fires (exit 2); with corpus.prepend_bos=false the run proceeds and model.json says so."""
    from cli import assert_one_line_error, run_cli

    directory = family_dirs("gpt2", bos=False)
    code, err = run_cli(capsys, "run", "--out", str(tmp_path / "r"), "--model", str(directory), "--corpus", str(PROSE),
                        "corpus.max_tokens=3000")
    assert_one_line_error(code, err, "no BOS token", "corpus.prepend_bos=false")
    out = tmp_path / "ok"
    cfg = family_config(directory, "folded", prepend_bos=False)
    run_pipeline(cfg, out, until="load")
    model = json.loads((out / "model.json").read_text())
    assert model["prepend_bos"] is False and model["bos_token"] is None
    run_pipeline(family_config(family_dirs("gpt2"), "folded"), tmp_path / "bos", until="load")  # its BOS-ful twin
    model = json.loads((tmp_path / "bos" / "model.json").read_text())
    assert model["prepend_bos"] is True and model["bos_token"] == "<|bos|>"


def test_a_model_directory_without_tokenizer_files_is_refused_before_its_weights(family_dirs, tmp_path, capsys):
    """Case B7: transformers 5 returns an empty tokenizer for a directory without tokenizer files; the
    documented error names the tokenizer (exit 2), before the weights (here unreadable) or the corpus load."""
    import shutil

    from cli import assert_one_line_error, run_cli

    directory = tmp_path / "m_notok"
    shutil.copytree(family_dirs("gpt2", tokenizer=False), directory)
    (directory / "model.safetensors").write_bytes(b"not weights")
    code, err = run_cli(capsys, "run", "--out", str(tmp_path / "r"), "--model", str(directory), "--corpus", str(PROSE),
                        "corpus.max_tokens=3000")
    assert_one_line_error(code, err, "no tokenizer files", "tokenizer.save_pretrained")  # preflight, before any load


def test_a_norm_read_with_the_wrong_gain_is_refused(family_dirs):
    """The view checks each norm on a probe vector at load: reading a plain RMSNorm as Gemma's `1 + w`
    (or Gemma's as `w`) is a one-line error, not silently wrong numbers."""
    from sae_lens_ctx.core.errors import UserError
    from sae_lens_ctx.inputs.model import check_norms

    for arch in ("llama-gqa", "gemma"):
        view = load_model(ModelConfig(model_name=str(family_dirs(arch)), weights="raw"))
        check_norms(view)
        view.norm_offset = not view.norm_offset
        with pytest.raises(UserError, match="computes something other than .* not supported"):
            check_norms(view)
