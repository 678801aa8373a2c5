"""Planted-mechanism models: tiny transformers whose weights are set by hand, with a known answer.

Nothing here is trained and nothing is downloaded. Each factory seeds a random init, overwrites
the weights that carry the mechanism, saves the Hugging Face model and its word-level tokenizer
with ``save_pretrained`` into a directory, and reloads both from that directory (so what a test
holds is exactly what is on disk, and ``AutoTokenizer`` / ``AutoModelForCausalLM`` /
``TransformerBridge.boot_transformers`` can load it offline).

ANSWER KEY (identical for both architectures)
=============================================

=================  ==========================================================================
next-token neuron  ``blocks.2.mlp`` neuron **37** (``neuron_layer=2``, ``neuron_index=37``)
target token       ``" paris"``  (vocab id 4): ``W_out[37] = 2.0 * u_target``, and only the
                   target's embedding has a ``u_target`` component (4.0), so with tied
                   embeddings its congruence is 8.0 for " paris" and exactly 0 for every other
                   token (before vocab-centering); every other neuron in the model has
                   congruence < 0.5.
planted head A     ``(layer 0, head 3)`` looks up trigger ``" france"`` (id 5)
planted head B     ``(layer 1, head 5)`` looks up trigger ``" louvre"`` (id 6)
silent heads       the other 14 heads of layers 0-1 (their direct effect on the neuron is 0)
=================  ==========================================================================

Residual-stream layout (``d_model = 64``). Six "feature" directions, each a mean-zero pair of
dimensions ``u_f = (e_{2f} - e_{2f+1}) / sqrt(2)`` so LayerNorm's centring leaves them alone:

====  ========  ===================================================================
f     name      written by
====  ========  ===================================================================
0     const     every token embedding (3.0), Llama only: source of a constant query
1     trig_a    the embedding of " france" (5.0)
2     trig_b    the embedding of " louvre" (5.0)
3     sig_a     head A's output
4     sig_b     head B's output
5     target    the embedding (= unembedding, tied) of " paris" (4.0)
====  ========  ===================================================================

Dimensions 12..63 are the "filler" subspace (mean-zero vectors only): every token embedding has
a random filler part (norm 5..10; the two triggers share one filler part of norm 7, so nothing
but the plant can tell them apart), GPT-2 position embeddings are small random filler vectors, and
everything that is not part of the plant reads and writes only there: the silent heads (random
Q/K/V reading filler dims, small random ``W_O`` into filler dims), the MLPs of layers 0 and 1,
and the other neurons of layer 2. Nothing ever writes the sig or trig directions except the
plant, so a silent head's direct contribution to the neuron is exactly 0 (up to float32
round-off).

Mechanism:

* Head A (L0H3) has a constant query (GPT-2: ``b_Q``; Llama: ``W_Q`` reads the ``const``
  direction) on one head dimension, and its key on that dimension reads ``trig_a``; so every
  position attends to an earlier ``" france"`` (score ~4.5 against exactly 0 for every other
  token, 0.84-0.99 of the attention). Its value reads ``trig_a`` and ``W_O`` writes ``sig_a``.
  Without " france" in context its value is 0 at every position, so its output is exactly 0.
  Head B (L1H5) is the same with ``" louvre"`` -> ``sig_b``. Head B's output gain is calibrated
  once at build time so that the neuron's peak activation on mirrored prompts is on average the
  same for both triggers (the top-activating contexts then split about 50/50 between the heads).
* Llama: RoPE with ``rope_theta = 1e12`` and the q.k content placed on head dimension 3, which
  pairs with dimension 7 in the lowest-frequency rotary pair (angle ``pos * 1e-9``), so the
  look-up does not depend on position. GQA 8 query / 4 KV heads: head A's KV head 1 is shared with
  query head 2, head B's KV head 2 with query head 4; those siblings have a zero ``o_proj`` slice.
* Neuron 37 of layer 2 reads ``sig_a + sig_b`` (GPT-2: ``W_in`` with bias -3.0 so GELU is ~0
  without a trigger; Llama: both ``gate_proj`` and ``up_proj`` read it, so ``silu(gate) * up`` is
  exactly 0 without a trigger and clearly positive with one). It fires at the trigger position and
  every later position; activations vary with the current token's embedding norm and with how
  diluted the look-up is.
* ``W_out[37]`` writes ``u_target``; final-norm gains are 1 on the feature dimensions and 0.1-0.3 on
  the filler dimensions, so after either trigger the model's top prediction is (nearly always)
  " paris"; its logit rises by > 5 over its value before the trigger.

``planted_corpus`` writes the A and B documents as mirrored pairs (same words, only the trigger
differs), so the neuron's top-activating documents split ~50/50 between the heads for any top-k
(checked: 40-60 % for top-10/20/50, seeds 0-3 of both the plant and the corpus).

There are 16 heads upstream of the neuron (2 layers x 8 heads), so one outlier passes the
``attribution > mean + 2 * std`` (sample std) rule; on a prompt with one trigger exactly one head
has a non-zero direct attribution.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "PlantAnswer",
    "PlantedModel",
    "make_planted_gpt2",
    "make_planted_llama",
    "make_planted",
    "planted_corpus",
    "hooked_transformer",
    "hooked_sae_transformer",
    "bridge",
    "encode",
    "hf_mlp_post",
    "hf_neuron_activations",
    "hf_doc_activations",
    "hf_congruence",
    "TARGET_WORD",
    "TRIGGER_A_WORD",
    "TRIGGER_B_WORD",
    "FILLER_WORDS",
]

# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3
TARGET_WORD = "paris"  # id 4
TRIGGER_A_WORD = "france"  # id 5
TRIGGER_B_WORD = "louvre"  # id 6
FILLER_WORDS = (
    "the", "a", "of", "and", "to", "in", "is", "was", "it", "that", "for", "on", "with", "as",
    "by", "at", "from", "his", "her", "they", "we", "city", "river", "old", "new", "small",
    "large", "house", "book", "time", "year", "people", "water", "music", "food", "garden",
    "morning", "evening", "train", "bridge", "market", "school", "street", "winter", "summer",
)  # fmt: skip
META = "\u2581"  # "▁", the Metaspace marker

D_MODEL = 64
N_HEADS = 8
D_HEAD = 8
N_LAYERS = 3
N_CTX = 128

NEURON_LAYER = 2
NEURON_INDEX = 37
HEAD_A = (0, 3)
HEAD_B = (1, 5)

# feature directions (index f -> dims 2f, 2f+1)
F_CONST, F_TRIG_A, F_TRIG_B, F_SIG_A, F_SIG_B, F_TARGET = range(6)
N_FEATURE_DIMS = 12

# magnitudes
TRIG_MAG = 5.0  # trigger embeddings along their trig direction
TRIG_FILLER_NORM = 7.0  # the triggers' filler part (same for A and B)
TARGET_MAG = 4.0  # target embedding along u_target
CONST_MAG = 3.0  # Llama: every embedding along u_const
Q_GPT2 = 2.8  # b_Q of a planted head (GPT-2): look-up score ~4.5 against 0
Q_LLAMA = 1.0  # W_Q . u_const of a planted head (Llama): look-up score ~4.5 against 0
ALPHA = 2.0  # W_out[neuron] = ALPHA * u_target
EXPECTED_CONGRUENCE = ALPHA * TARGET_MAG  # 8.0 (HF weights, final-norm gain applied, uncentred)


@dataclass(frozen=True)
class PlantAnswer:
    """What a correct pipeline must recover from a planted model."""

    neuron_layer: int
    neuron_index: int
    target_token: str  # decoded, e.g. " paris"
    target_token_id: int
    heads: dict[tuple[int, int], str]  # (layer, head) -> decoded trigger token, the planted heads
    trigger_token_ids: dict[tuple[int, int], int]
    silent_heads: list[tuple[int, int]]  # every other head in layers < neuron_layer
    expected_congruence: float = EXPECTED_CONGRUENCE  # W_out[n] . W_U[:, target], HF weights
    filler_words: tuple[str, ...] = FILLER_WORDS  # plain words (no leading space) for corpora
    upstream_heads: list[tuple[int, int]] = field(default_factory=list)  # all heads in layers < b
    shared_kv_siblings: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    # Llama/GQA only: planted head -> the query head sharing its KV head (zero o_proj slice)

    @property
    def trigger_words(self) -> dict[tuple[int, int], str]:
        """(layer, head) -> trigger as a plain word, e.g. "france"."""
        return {h: t.strip() for h, t in self.heads.items()}

    @property
    def head_for_trigger(self) -> dict[str, tuple[int, int]]:
        """Plain trigger word -> the planted head that looks it up."""
        return {t.strip(): h for h, t in self.heads.items()}


@dataclass
class PlantedModel:
    arch: str  # "gpt2" | "llama"
    hf_model: "PreTrainedModel"  # eval mode, float32
    tokenizer: "PreTrainedTokenizerBase"
    directory: Path  # save_pretrained dir with model + tokenizer
    answer: PlantAnswer


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _vocab() -> dict[str, int]:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in (TARGET_WORD, TRIGGER_A_WORD, TRIGGER_B_WORD, *FILLER_WORDS):
        vocab[META + w] = len(vocab)
    return vocab


def _build_tokenizer():
    """Word-level tokenizer; tokens look like "▁paris" and decode with a leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab=_vocab(), unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement=META, prepend_scheme="always")
    # "never": keep the space of the first token too, so decode([id]) == " paris"
    tk.decoder = decoders.Metaspace(replacement=META, prepend_scheme="never")
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=N_CTX,
    )


# --------------------------------------------------------------------------------------------
# Weight construction (in TransformerLens layout, then written into the HF modules)
# --------------------------------------------------------------------------------------------


def _u(f: int) -> torch.Tensor:
    v = torch.zeros(D_MODEL)
    v[2 * f] = 1 / math.sqrt(2)
    v[2 * f + 1] = -1 / math.sqrt(2)
    return v


def _filler(g: torch.Generator, n: int, norm: float | torch.Tensor = 1.0) -> torch.Tensor:
    """n random mean-zero vectors living in the filler dims only, each with the given norm."""
    x = torch.zeros(n, D_MODEL)
    r = torch.randn(n, D_MODEL - N_FEATURE_DIMS, generator=g)
    r = r - r.mean(-1, keepdim=True)
    x[:, N_FEATURE_DIMS:] = r / r.norm(dim=-1, keepdim=True)
    norm = torch.as_tensor(norm, dtype=torch.float32).reshape(-1, 1) if torch.is_tensor(norm) else norm
    return x * norm


def _norm_gain(g: torch.Generator, lo: float, hi: float) -> torch.Tensor:
    w = torch.ones(D_MODEL)
    w[N_FEATURE_DIMS:] = lo + (hi - lo) * torch.rand(D_MODEL - N_FEATURE_DIMS, generator=g)
    return w


@dataclass
class _Weights:
    """Everything in TL layout: W_Q [n_heads, d_model, d_head], W_O [n_heads, d_head, d_model]..."""

    W_E: torch.Tensor
    W_pos: torch.Tensor | None
    layers: list[dict[str, torch.Tensor]]
    ln_final_w: torch.Tensor
    ln_final_b: torch.Tensor | None


def _build_weights(arch: str, d_vocab: int, d_mlp: int, n_kv: int, g: torch.Generator) -> _Weights:
    gpt2 = arch == "gpt2"
    vocab = _vocab()
    tid = {w: vocab[META + w] for w in (TARGET_WORD, TRIGGER_A_WORD, TRIGGER_B_WORD)}

    # ---- embeddings
    norms = 5.0 + 5.0 * torch.rand(d_vocab, generator=g)
    W_E = _filler(g, d_vocab, norms)
    # the two triggers share one filler part: only the plant can tell them apart
    W_E[tid[TRIGGER_B_WORD]] = W_E[tid[TRIGGER_A_WORD]] = _filler(g, 1, TRIG_FILLER_NORM)[0]
    W_E[tid[TRIGGER_A_WORD]] += TRIG_MAG * _u(F_TRIG_A)
    W_E[tid[TRIGGER_B_WORD]] += TRIG_MAG * _u(F_TRIG_B)
    W_E[tid[TARGET_WORD]] += TARGET_MAG * _u(F_TARGET)
    if not gpt2:
        W_E += CONST_MAG * _u(F_CONST)
    W_pos = _filler(g, N_CTX, 0.5 + torch.rand(N_CTX, generator=g)) if gpt2 else None

    layers = []
    n_rep = N_HEADS // n_kv
    for layer in range(N_LAYERS):
        p: dict[str, torch.Tensor] = {}
        # ---- attention: silent heads everywhere first
        # silent heads read the filler dims only: blind to the triggers and to the signals
        p["W_Q"] = 0.15 * torch.randn(N_HEADS, D_MODEL, D_HEAD, generator=g)
        p["W_K"] = 0.15 * torch.randn(n_kv, D_MODEL, D_HEAD, generator=g)
        p["W_V"] = 0.15 * torch.randn(n_kv, D_MODEL, D_HEAD, generator=g)
        for k in ("W_Q", "W_K", "W_V"):
            p[k][:, :N_FEATURE_DIMS] = 0.0
        p["W_O"] = torch.stack([_filler(g, D_HEAD, 0.1) for _ in range(N_HEADS)])
        p["b_Q"] = torch.zeros(N_HEADS, D_HEAD)
        p["b_K"] = torch.zeros(n_kv, D_HEAD)
        p["b_V"] = torch.zeros(n_kv, D_HEAD)
        # ---- planted head of this layer (if any)
        for (pl, ph), f_trig, f_sig in ((HEAD_A, F_TRIG_A, F_SIG_A), (HEAD_B, F_TRIG_B, F_SIG_B)):
            if pl != layer:
                continue
            kv = ph // n_rep
            qk_dim = D_HEAD // 2 - 1  # 3: lowest-frequency rotary pair (3, 7) under rotate_half
            p["W_Q"][ph] = 0.0
            if gpt2:
                p["b_Q"][ph, qk_dim] = Q_GPT2  # constant query from the bias
            else:
                p["W_Q"][ph, :, qk_dim] = Q_LLAMA * _u(F_CONST)  # constant query from u_const
            p["W_K"][kv, :, qk_dim] = _u(f_trig)
            p["W_K"][kv, :, D_HEAD - 1] = 0.0  # rotary partner of qk_dim
            p["W_V"][kv, :, 0] = _u(f_trig)
            p["W_O"][ph] = 0.0
            p["W_O"][ph, 0] = 1.25 * _u(f_sig)
            for sib in range(kv * n_rep, (kv + 1) * n_rep):  # GQA siblings sharing this KV head
                if sib != ph:
                    p["W_O"][sib] = 0.0
        # ---- norms
        p["ln1_w"] = _norm_gain(g, 0.8, 1.2)
        p["ln2_w"] = _norm_gain(g, 0.8, 1.2)
        if gpt2:
            p["ln1_b"] = torch.zeros(D_MODEL)
            p["ln1_b"][N_FEATURE_DIMS:] = 0.05 * torch.randn(D_MODEL - N_FEATURE_DIMS, generator=g)
            p["ln2_b"] = torch.zeros(D_MODEL)
            p["ln2_b"][N_FEATURE_DIMS:] = 0.05 * torch.randn(D_MODEL - N_FEATURE_DIMS, generator=g)
        # ---- MLP: random neurons reading and writing filler dims only
        p["W_in"] = _filler(g, d_mlp, 1.0).T.contiguous()  # [d_model, d_mlp]
        p["W_out"] = _filler(g, d_mlp, 0.05)  # [d_mlp, d_model]
        if gpt2:
            p["b_in"] = 0.1 * torch.randn(d_mlp, generator=g)
        else:
            p["W_gate"] = _filler(g, d_mlp, 1.0).T.contiguous()
        if layer == NEURON_LAYER:
            read = _u(F_SIG_A) + _u(F_SIG_B)
            if gpt2:
                p["W_in"][:, NEURON_INDEX] = 1.5 * read
                p["b_in"][NEURON_INDEX] = -3.0
            else:
                p["W_gate"][:, NEURON_INDEX] = 1.0 * read
                p["W_in"][:, NEURON_INDEX] = 0.4 * read
            p["W_out"][NEURON_INDEX] = ALPHA * _u(F_TARGET)
        layers.append(p)

    ln_final_w = _norm_gain(g, 0.1, 0.3)
    ln_final_b = torch.zeros(D_MODEL) if gpt2 else None
    return _Weights(W_E, W_pos, layers, ln_final_w, ln_final_b)


def _write_gpt2(model, w: _Weights) -> None:
    tr = model.transformer
    with torch.no_grad():
        tr.wte.weight.copy_(w.W_E)  # tied with lm_head
        tr.wpe.weight.copy_(w.W_pos)
        for layer, p in enumerate(w.layers):
            blk = tr.h[layer]
            blk.ln_1.weight.copy_(p["ln1_w"])
            blk.ln_1.bias.copy_(p["ln1_b"])
            blk.ln_2.weight.copy_(p["ln2_w"])
            blk.ln_2.bias.copy_(p["ln2_b"])
            flat = [p[k].permute(1, 0, 2).reshape(D_MODEL, N_HEADS * D_HEAD) for k in ("W_Q", "W_K", "W_V")]
            blk.attn.c_attn.weight.copy_(torch.cat(flat, dim=1))
            blk.attn.c_attn.bias.copy_(torch.cat([p[k].reshape(-1) for k in ("b_Q", "b_K", "b_V")]))
            blk.attn.c_proj.weight.copy_(p["W_O"].reshape(N_HEADS * D_HEAD, D_MODEL))
            blk.attn.c_proj.bias.zero_()
            blk.mlp.c_fc.weight.copy_(p["W_in"])
            blk.mlp.c_fc.bias.copy_(p["b_in"])
            blk.mlp.c_proj.weight.copy_(p["W_out"])
            blk.mlp.c_proj.bias.zero_()
        tr.ln_f.weight.copy_(w.ln_final_w)
        tr.ln_f.bias.copy_(w.ln_final_b)


def _write_llama(model, w: _Weights) -> None:
    m = model.model
    with torch.no_grad():
        m.embed_tokens.weight.copy_(w.W_E)  # tied with lm_head
        for layer, p in enumerate(w.layers):
            blk = m.layers[layer]
            blk.input_layernorm.weight.copy_(p["ln1_w"])
            blk.post_attention_layernorm.weight.copy_(p["ln2_w"])
            a = blk.self_attn
            a.q_proj.weight.copy_(p["W_Q"].permute(0, 2, 1).reshape(-1, D_MODEL))
            a.k_proj.weight.copy_(p["W_K"].permute(0, 2, 1).reshape(-1, D_MODEL))
            a.v_proj.weight.copy_(p["W_V"].permute(0, 2, 1).reshape(-1, D_MODEL))
            a.o_proj.weight.copy_(p["W_O"].reshape(N_HEADS * D_HEAD, D_MODEL).T)
            blk.mlp.gate_proj.weight.copy_(p["W_gate"].T)
            blk.mlp.up_proj.weight.copy_(p["W_in"].T)
            blk.mlp.down_proj.weight.copy_(p["W_out"].T)
        m.norm.weight.copy_(w.ln_final_w)


# --------------------------------------------------------------------------------------------
# HF helpers
# --------------------------------------------------------------------------------------------


def _mlp_out_proj(plant_or_model, layer: int):
    model = plant_or_model.hf_model if isinstance(plant_or_model, PlantedModel) else plant_or_model
    if hasattr(model, "transformer"):  # GPT-2
        return model.transformer.h[layer].mlp.c_proj
    return model.model.layers[layer].mlp.down_proj


def hf_mlp_post(model, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """MLP post-activations [batch, pos, d_mlp] of ``layer`` (the input of c_proj / down_proj)."""
    store: dict[str, torch.Tensor] = {}

    def hook(_mod, args):
        store["post"] = args[0].detach()

    h = _mlp_out_proj(model, layer).register_forward_pre_hook(hook)
    try:
        hf = model.hf_model if isinstance(model, PlantedModel) else model
        with torch.no_grad():
            hf(input_ids=input_ids)
    finally:
        h.remove()
    return store["post"]


def hf_neuron_activations(plant: PlantedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """The planted neuron's post-activation [batch, pos] in the HF model."""
    a = plant.answer
    return hf_mlp_post(plant, input_ids, a.neuron_layer)[..., a.neuron_index]


def hf_doc_activations(plant: PlantedModel, docs: list[str], prepend_bos: bool = True) -> list[torch.Tensor]:
    """The planted neuron's HF post-activation for each document (1-D, one value per token).

    One batched forward pass: documents are right-padded, which cannot change the activations of
    real tokens (causal attention, absolute positions start at 0 for every row).
    """
    rows = [plant.tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    if prepend_bos:
        rows = [[plant.tokenizer.bos_token_id, *r] for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), plant.tokenizer.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    acts = hf_neuron_activations(plant, ids)
    return [acts[i, : len(r)] for i, r in enumerate(rows)]


def hf_congruence(plant: PlantedModel, layer: int | None = None) -> torch.Tensor:
    """W_out[layer] (with the final-norm gain applied) @ W_U, shape [d_mlp, d_vocab], uncentred."""
    hf = plant.hf_model
    layer = plant.answer.neuron_layer if layer is None else layer
    if plant.arch == "gpt2":
        W_out = hf.transformer.h[layer].mlp.c_proj.weight  # [d_mlp, d_model]
        gain = hf.transformer.ln_f.weight
    else:
        W_out = hf.model.layers[layer].mlp.down_proj.weight.T
        gain = hf.model.norm.weight
    W_U = hf.lm_head.weight.T  # [d_model, d_vocab]
    return (W_out * gain) @ W_U


def encode(plant: PlantedModel, text: str | list[str], prepend_bos: bool = True) -> torch.Tensor:
    """Token ids [batch, pos] (one id per word); BOS prepended by default, like TL's to_tokens."""
    texts = [text] if isinstance(text, str) else list(text)
    rows = [plant.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if prepend_bos:
        rows = [[plant.tokenizer.bos_token_id, *r] for r in rows]
    if len({len(r) for r in rows}) != 1:
        raise ValueError("encode() batches need equal lengths")
    return torch.tensor(rows, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Factories
# --------------------------------------------------------------------------------------------


def _answer(arch: str, tokenizer, n_kv: int) -> PlantAnswer:
    vocab = _vocab()
    ids = {w: vocab[META + w] for w in (TARGET_WORD, TRIGGER_A_WORD, TRIGGER_B_WORD)}
    upstream = [(l, h) for l in range(NEURON_LAYER) for h in range(N_HEADS)]
    heads = {HEAD_A: tokenizer.decode([ids[TRIGGER_A_WORD]]), HEAD_B: tokenizer.decode([ids[TRIGGER_B_WORD]])}
    siblings = {}
    if n_kv < N_HEADS:
        n_rep = N_HEADS // n_kv
        for l, h in heads:
            kv = h // n_rep
            siblings[(l, h)] = next((l, s) for s in range(kv * n_rep, (kv + 1) * n_rep) if s != h)
    return PlantAnswer(
        neuron_layer=NEURON_LAYER,
        neuron_index=NEURON_INDEX,
        target_token=tokenizer.decode([ids[TARGET_WORD]]),
        target_token_id=ids[TARGET_WORD],
        heads=heads,
        trigger_token_ids={HEAD_A: ids[TRIGGER_A_WORD], HEAD_B: ids[TRIGGER_B_WORD]},
        silent_heads=[h for h in upstream if h not in heads],
        upstream_heads=upstream,
        shared_kv_siblings=siblings,
    )


def _calibration_ids(seed: int = 1234, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirrored batches: identical filler prompts with " france" resp. " louvre" at the same spot."""
    vocab = _vocab()
    rng = random.Random(seed)
    fill = [vocab[META + w] for w in FILLER_WORDS]
    a_rows, b_rows = [], []
    for _ in range(n):
        row = [vocab["<s>"]] + [rng.choice(fill) for _ in range(24)]
        pos = rng.randrange(1, 20)
        a_row, b_row = list(row), list(row)
        a_row[pos] = vocab[META + TRIGGER_A_WORD]
        b_row[pos] = vocab[META + TRIGGER_B_WORD]
        a_rows.append(a_row)
        b_rows.append(b_row)
    return torch.tensor(a_rows), torch.tensor(b_rows)


def _calibrate_head_b(arch: str, model) -> None:
    """Rescale head B's output so that, on mirrored prompts, the neuron's peak activation is on
    average the same for both triggers (peaks are what top-activating-context mining ranks)."""
    a_ids, b_ids = _calibration_ids()
    layer, head = HEAD_B
    for _ in range(3):
        peak_a = hf_mlp_post(model, a_ids, NEURON_LAYER)[..., NEURON_INDEX].max(-1).values
        peak_b = hf_mlp_post(model, b_ids, NEURON_LAYER)[..., NEURON_INDEX].max(-1).values
        ratio = float((peak_a / peak_b).mean())
        with torch.no_grad():
            if arch == "gpt2":
                model.transformer.h[layer].attn.c_proj.weight[head * D_HEAD : (head + 1) * D_HEAD].mul_(ratio)
            else:
                model.model.layers[layer].self_attn.o_proj.weight[:, head * D_HEAD : (head + 1) * D_HEAD].mul_(ratio)


def _finish(arch: str, model, directory: Path, n_kv: int) -> PlantedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.eval()
    _calibrate_head_b(arch, model)
    model.save_pretrained(directory)
    _build_tokenizer().save_pretrained(directory)
    # Reload from disk: what tests hold is exactly what the directory holds, and the tokenizer
    # gets a name_or_path (TransformerLens re-loads it from there with add_bos_token=True).
    tok = AutoTokenizer.from_pretrained(directory)
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return PlantedModel(arch=arch, hf_model=hf, tokenizer=tok, directory=directory, answer=_answer(arch, tok, n_kv))


def make_planted_gpt2(directory: Path, seed: int = 0) -> PlantedModel:
    """GPT-2 style plant: LayerNorm, GELU (gelu_new), learned positions, tied embeddings.

    3 layers x 8 heads, d_model 64, d_head 8, d_mlp 256, vocab 52, n_positions 128.
    Answer: neuron L2N37 -> " paris"; L0H3 looks up " france", L1H5 looks up " louvre".
    Constant queries come from ``b_Q`` (GPT-2 has q/k/v biases); the neuron's bias is -3, so
    GELU(pre) is -0.0036 without a trigger and 1.3-6 after one (planted_corpus, seed 0).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    d_vocab, d_mlp = len(_vocab()), 4 * D_MODEL
    cfg = GPT2Config(
        vocab_size=d_vocab,
        n_positions=N_CTX,
        n_embd=D_MODEL,
        n_layer=N_LAYERS,
        n_head=N_HEADS,
        n_inner=d_mlp,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(cfg).float()
    _write_gpt2(model, _build_weights("gpt2", d_vocab, d_mlp, N_HEADS, g))
    return _finish("gpt2", model, directory, N_HEADS)


def make_planted_llama(directory: Path, seed: int = 0) -> PlantedModel:
    """Llama style plant: RMSNorm, gated SiLU MLP, RoPE (theta 1e12), GQA 8 query / 4 KV heads.

    3 layers, hidden 64, head_dim 8, intermediate 128, vocab 52, no biases, tied embeddings.
    Answer: neuron L2N37 -> " paris"; L0H3 looks up " france", L1H5 looks up " louvre";
    L0H2 and L1H4 share KV heads with the planted heads and have zero ``o_proj`` slices.
    Constant queries read ``u_const``, which every embedding sets to 3.0.
    ``post = silu(gate) * up`` with gate = up / 0.4 = sig_a + sig_b: exactly 0 without a trigger,
    1.5-12 after one (planted_corpus, seed 0).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    d_vocab, d_mlp, n_kv = len(_vocab()), 2 * D_MODEL, N_HEADS // 2
    cfg = LlamaConfig(
        vocab_size=d_vocab,
        hidden_size=D_MODEL,
        intermediate_size=d_mlp,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=n_kv,
        head_dim=D_HEAD,
        hidden_act="silu",
        max_position_embeddings=N_CTX,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e12},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    model = LlamaForCausalLM(cfg).float()
    _write_llama(model, _build_weights("llama", d_vocab, d_mlp, n_kv, g))
    return _finish("llama", model, directory, n_kv)


def make_planted(arch: str, directory: Path, seed: int = 0) -> PlantedModel:
    if arch == "gpt2":
        return make_planted_gpt2(directory, seed)
    if arch == "llama":
        return make_planted_llama(directory, seed)
    raise ValueError(f"unknown arch {arch!r}")


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


def planted_corpus(plant: PlantedModel, n_docs: int = 200, seed: int = 0) -> list[str]:
    """Documents of 8..40 space-separated vocab words (plain words, no leading space).

    ``n_docs // 4`` documents contain trigger A once and ``n_docs // 4`` contain trigger B once;
    the rest contain neither (never both; the target word never appears; the trigger is never the
    last word, so the neuron fires on at least two positions of a trigger document).

    The A and B documents come in mirrored pairs (same words, same trigger position, only the
    trigger differs), shuffled among the others. The plant is calibrated to respond equally to
    both triggers, so the neuron's top-activating documents split close to 50/50 between head A
    and head B for any top-k, rather than depending on which trigger happened to land early in a
    document (activation falls with the number of tokens the look-up is diluted over).
    """
    rng = random.Random(seed)
    trig_a, trig_b = plant.answer.heads[HEAD_A].strip(), plant.answer.heads[HEAD_B].strip()
    fillers = plant.answer.filler_words
    docs: list[list[str]] = []
    for _ in range(n_docs // 4):
        n = rng.randint(8, 40)
        words = [rng.choice(fillers) for _ in range(n)]
        pos = rng.randrange(0, n - 1)
        docs.append(words[:pos] + [trig_a] + words[pos + 1 :])
        docs.append(words[:pos] + [trig_b] + words[pos + 1 :])
    while len(docs) < n_docs:
        docs.append([rng.choice(fillers) for _ in range(rng.randint(8, 40))])
    rng.shuffle(docs)
    return [" ".join(d) for d in docs]


# --------------------------------------------------------------------------------------------
# TransformerLens views
# --------------------------------------------------------------------------------------------


def _ht_config(plant: PlantedModel):
    from transformer_lens import HookedTransformerConfig

    c = plant.hf_model.config
    common = dict(
        n_layers=N_LAYERS,
        n_heads=N_HEADS,
        d_head=D_HEAD,
        d_model=D_MODEL,
        n_ctx=N_CTX,
        d_vocab=c.vocab_size,
        default_prepend_bos=True,
        tokenizer_prepends_bos=False,
        device="cpu",
        dtype=torch.float32,
    )
    if plant.arch == "gpt2":
        return HookedTransformerConfig(
            **common,
            d_mlp=c.n_inner,
            eps=c.layer_norm_epsilon,
            act_fn=c.activation_function,
            normalization_type="LN",
            positional_embedding_type="standard",
            use_attn_scale=True,
            scale_attn_by_inverse_layer_idx=False,
            original_architecture="GPT2LMHeadModel",
        )
    return HookedTransformerConfig(
        **common,
        d_mlp=c.intermediate_size,
        eps=c.rms_norm_eps,
        act_fn=c.hidden_act,
        n_key_value_heads=c.num_key_value_heads,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=D_HEAD,
        rotary_base=c.rope_parameters["rope_theta"],
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
    )


def hooked_transformer(
    plant: PlantedModel,
    *,
    sae: bool = False,
    fold_ln: bool = True,
    center_writing_weights: bool | None = None,
    center_unembed: bool = True,
):
    """The plant as a ``transformer_lens.HookedTransformer`` (``sae=True``: HookedSAETransformer).

    Processed like ``HookedTransformer.from_pretrained``: fold_ln, centre writing weights (GPT-2
    only; LN models), centre the unembedding (logits shift by a per-position constant).
    """
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_llama_weights

    if sae:
        from sae_lens import HookedSAETransformer as cls
    else:
        from transformer_lens import HookedTransformer as cls

    cfg = _ht_config(plant)
    model = cls(cfg, tokenizer=plant.tokenizer)
    convert = convert_gpt2_weights if plant.arch == "gpt2" else convert_llama_weights
    sd = {k: v.detach().clone() for k, v in convert(plant.hf_model, cfg).items()}
    if center_writing_weights is None:
        center_writing_weights = plant.arch == "gpt2"
    model.load_and_process_state_dict(
        sd,
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
    )
    return model.eval()


def hooked_sae_transformer(plant: PlantedModel, **kwargs):
    """``sae_lens.HookedSAETransformer`` with the plant's weights."""
    return hooked_transformer(plant, sae=True, **kwargs)


def bridge(plant: PlantedModel, *, compatibility_mode: bool = False):
    """``TransformerBridge`` booted offline from the plant's saved directory (raw HF weights)."""
    from transformer_lens.model_bridge import TransformerBridge

    b = TransformerBridge.boot_transformers(str(plant.directory), device="cpu")
    if compatibility_mode:
        b.enable_compatibility_mode(disable_warnings=True)
    return b
