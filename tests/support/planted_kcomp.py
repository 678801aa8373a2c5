"""A second plant for the QK split: head B's key reads what an earlier previous-token head wrote (K-composition).

The Llama plant of `planted.py` (same vocabulary, neuron L2N37 → " paris", head A = L0H3 looking up " france"),
changed so that head B (L1H5) no longer keys on the " louvre" embedding:

* Every token embedding has the same norm (8), so layer 0's RMS scale is 1 at every position, and a new
  feature direction `u_prev = (e12 - e13) / sqrt(2)` is cleared of everything else (dims 12 and 13 leave the
  filler subspace).
* **Previous-token head P = L0H1** (its KV sibling L0H0 gets a zero `o_proj` slice): constant query and key
  from `u_const` on the two fastest rotary pairs (rope_theta 1e4: 1 and 0.1 rad per position), with the
  query's phase set back one position, so its score is `A · (cos(Δ − 1) + cos(0.1 (Δ − 1)))` for the
  distance Δ to the key (A ≈ 30): ≥ 0.99 of its attention on the previous token. Its value reads
  `u_trig_b` and its `W_O` writes `u_prev`: the position right after " louvre" holds 5 `u_prev`,
  every other position nothing.
* **Head B = L1H5** keeps its constant query; its key and value read `u_prev` instead of `u_trig_b`. So
  it looks up the token right after " louvre", and its key there holds only what P wrote: the QK split of
  that score must name `L0H1` as the key-side reason.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from planted import (D_HEAD, D_MODEL, F_CONST, F_TRIG_B, HEAD_B, N_CTX, N_HEADS, N_LAYERS, PlantedModel,
                     _build_weights, _finish, _u, _vocab, _write_llama)

PREV_HEAD = (0, 1)
"""The previous-token head whose output head B's key reads."""
PREV_DIMS = (12, 13)
EMBED_NORM = 8.0
PREV_SCORE = 3.1  # query and key magnitude per rotary pair (times u_const's 3 after the norm)


def _u_prev() -> torch.Tensor:
    v = torch.zeros(D_MODEL)
    v[PREV_DIMS[0]], v[PREV_DIMS[1]] = 1 / math.sqrt(2), -1 / math.sqrt(2)
    return v


def make_planted_kcomp(directory: Path, seed: int = 0) -> PlantedModel:
    """The K-composition plant (module doc); its answer is the Llama plant's (head B's trigger " louvre" is
    what P reads; head B looks up the token after it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    d_vocab, d_mlp, n_kv = len(_vocab()), 2 * D_MODEL, N_HEADS // 2
    w = _build_weights("llama", d_vocab, d_mlp, n_kv, g)
    lo, hi = PREV_DIMS[0], PREV_DIMS[1] + 1
    # clear u_prev's dims everywhere, then give every embedding the same norm (layer 0's scale is 1 everywhere)
    w.W_E[:, lo:hi] = 0.0
    feature = w.W_E[:, :hi].norm(dim=-1, keepdim=True)
    filler = w.W_E[:, hi:]
    w.W_E[:, hi:] = filler / filler.norm(dim=-1, keepdim=True) * (EMBED_NORM ** 2 - feature ** 2).sqrt()
    for p in w.layers:
        for k in ("W_Q", "W_K", "W_V"):
            p[k][:, lo:hi] = 0.0
        p["W_O"][..., lo:hi] = 0.0
        p["W_in"][lo:hi] = 0.0
        p["W_gate"][lo:hi] = 0.0
        p["W_out"][:, lo:hi] = 0.0
        p["ln1_w"][lo:hi] = 1.0
        p["ln2_w"][lo:hi] = 1.0
    u_const, u_prev = _u(F_CONST), _u_prev()
    # the previous-token head P: score A (cos(Δ - 1) + cos(0.1 (Δ - 1))) on rotary pairs (0, 4) and (1, 5)
    p0 = w.layers[PREV_HEAD[0]]
    head, kv = PREV_HEAD[1], PREV_HEAD[1] // (N_HEADS // n_kv)
    for k in ("W_Q",):
        p0[k][head] = 0.0
    p0["W_K"][kv] = 0.0
    p0["W_V"][kv] = 0.0
    for pair, omega in ((0, 1.0), (1, 0.1)):
        p0["W_Q"][head, :, pair] = PREV_SCORE * math.cos(omega) * u_const
        p0["W_Q"][head, :, pair + D_HEAD // 2] = -PREV_SCORE * math.sin(omega) * u_const
        p0["W_K"][kv, :, pair] = PREV_SCORE * u_const
    p0["W_V"][kv, :, 0] = _u(F_TRIG_B)
    p0["W_O"][head] = 0.0
    p0["W_O"][head, 0] = u_prev
    for sib in range(kv * (N_HEADS // n_kv), (kv + 1) * (N_HEADS // n_kv)):
        if sib != head:
            p0["W_O"][sib] = 0.0
    # head B keys on (and reads) what P wrote
    pb = w.layers[HEAD_B[0]]
    kv_b = HEAD_B[1] // (N_HEADS // n_kv)
    qk_dim = D_HEAD // 2 - 1
    pb["W_K"][kv_b, :, qk_dim] = u_prev
    pb["W_V"][kv_b, :, 0] = u_prev
    cfg = LlamaConfig(vocab_size=d_vocab, hidden_size=D_MODEL, intermediate_size=d_mlp, num_hidden_layers=N_LAYERS,
                      num_attention_heads=N_HEADS, num_key_value_heads=n_kv, head_dim=D_HEAD, hidden_act="silu",
                      max_position_embeddings=N_CTX, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e4}, attention_bias=False,
                      mlp_bias=False, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = LlamaForCausalLM(cfg).float()
    _write_llama(model, w)
    return _finish("llama", model, directory, n_kv)
