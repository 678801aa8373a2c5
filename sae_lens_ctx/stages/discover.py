"""Discover next-token units: congruence of every unit in one chunked pass, filters, selection, controls.

Congruence (paper §2.2) is `write · W_U`, with the final norm's gain folded into `W_U` and, in the
folded convention, the vocabulary mean removed (TL's `center_unembed`): the unit's direct effect on
the logits. A unit's congruence is the max over tokens (the min for suppression units). We also keep
the top-5 tokens, the min token, and the excess kurtosis and skew of the distribution over the
vocabulary (prediction units are heavy-tailed with positive skew).

`congruence_stats` streams blocks of units × blocks of vocabulary, keeping a running top-5 and float64
power sums for the moments, so memory is bounded by `unit_chunk × vocab_chunk` whatever the model.

Glitch tokens (instead of the paper's hand-written reject lists) are flagged from the weights, after
Land & Bartolo 2024 ("Fishing for Magikarp"): unembedding columns whose norm is a low outlier (rows
left near initialisation), columns close to the mean of known-unused tokens (ids past the
tokenizer, `<unused…>`/`<reserved…>` specials), tokens that do not survive decode → encode (cannot
appear in text as themselves), and optionally tokens never seen in the corpus.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import torch
from ..core.progress import tqdm  # a bar on a terminal, progress lines in a log

from ..core.config import DiscoverConfig
from ..core.errors import UserError
from ..inputs.view import ModelView
from ..inputs.context import RunContext
from ..core.records import write_jsonl
from ..inputs.sae import SaeSource
from ..core.records import UnitRecord, neuron_id, parse_neuron_id
from ..inputs.tokens import token_strings

log = logging.getLogger(__name__)

TOP = 5
"""How many strongest tokens each unit records."""


# -- congruence ---------------------------------------------------------------------------------


@dataclass
class CongruenceStats:
    """Per-unit statistics of `write · U` over the vocabulary (numpy arrays, one row per unit)."""

    top_values: np.ndarray
    """`[n, TOP]` largest values, descending."""
    top_tokens: np.ndarray
    """`[n, TOP]` their token ids."""
    bottom_values: np.ndarray
    """`[n, TOP]` smallest values, ascending."""
    bottom_tokens: np.ndarray
    kurtosis: np.ndarray
    """Excess (Fisher) kurtosis over the vocabulary."""
    skew: np.ndarray


@torch.inference_mode()
def congruence_stats(write: torch.Tensor, unembed: torch.Tensor, unit_chunk: int = 1024,
                     vocab_chunk: int = 16384) -> CongruenceStats:
    """Statistics of `write @ unembed` (`[n, d_model] @ [d_model, V]`) without materialising it."""
    n, vocab = write.shape[0], unembed.shape[1]
    top = min(TOP, vocab)
    out = {k: [] for k in ("tv", "tt", "bv", "bt", "k", "s")}
    for u0 in range(0, n, unit_chunk):
        w = write[u0:u0 + unit_chunk]
        m = w.shape[0]
        tv = torch.full((m, top), -torch.inf, device=w.device)
        tt = torch.zeros((m, top), dtype=torch.long, device=w.device)
        bv = torch.full((m, top), torch.inf, device=w.device)
        bt = torch.zeros((m, top), dtype=torch.long, device=w.device)
        sums = torch.zeros((4, m), dtype=torch.float64, device=w.device)
        for v0 in range(0, vocab, vocab_chunk):
            logits = (w @ unembed[:, v0:v0 + vocab_chunk]).float()
            ids = torch.arange(v0, v0 + logits.shape[1], device=w.device)
            tv, tt = _merge_top(tv, tt, logits, ids, largest=True)
            bv, bt = _merge_top(bv, bt, logits, ids, largest=False)
            x = logits.double()
            x2 = x * x
            sums += torch.stack([x.sum(1), x2.sum(1), (x2 * x).sum(1), (x2 * x2).sum(1)])
        mean, e2, e3, e4 = sums / vocab
        m2 = e2 - mean**2
        m3 = e3 - 3 * mean * e2 + 2 * mean**3
        m4 = e4 - 4 * mean * e3 + 6 * mean**2 * e2 - 3 * mean**4
        m2 = m2.clamp_min(1e-300)
        for key, value in (("tv", tv), ("tt", tt), ("bv", bv), ("bt", bt),
                           ("k", m4 / m2**2 - 3), ("s", m3 / m2**1.5)):
            out[key].append(value.cpu().numpy())
    cat = {k: np.concatenate(v) for k, v in out.items()}
    return CongruenceStats(cat["tv"], cat["tt"], cat["bv"], cat["bt"], cat["k"], cat["s"])


def _merge_top(values: torch.Tensor, ids: torch.Tensor, block: torch.Tensor, block_ids: torch.Tensor,
               largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    k = values.shape[1]
    bv, bi = block.topk(min(k, block.shape[1]), dim=1, largest=largest)
    merged_v = torch.cat([values, bv], dim=1)
    merged_i = torch.cat([ids, block_ids[bi]], dim=1)
    v, order = merged_v.topk(k, dim=1, largest=largest)
    return v, merged_i.gather(1, order)


# -- the vocabulary filter ----------------------------------------------------------------------


@dataclass(frozen=True)
class FlaggedToken:
    """A token discovery will not accept as a unit's token (a line of `vocab_filter.jsonl`)."""

    token_id: int
    token: str
    reason: str
    """'beyond-tokenizer', 'low-norm', 'near-unused', 'not-roundtrip' or 'not-in-corpus'."""
    score: float | None = None
    """The indicator's robust z-score, where the reason has one."""


_UNUSED_NAME = re.compile(r"^<\|?(unused|reserved|extra_id|placeholder)[_\-]?\d*.*>$", re.I)


def decode_vocab(tokenizer, d_vocab: int) -> list[str]:
    """Every id's text with its word-start space (`tokens.token_strings`: SentencePiece's `▁river` is
    ' river', not the 'river' that decoding it alone gives); ids past the tokenizer are ''."""
    n = min(len(tokenizer), d_vocab)
    return token_strings(tokenizer, range(n)) + [""] * (d_vocab - n)


def _robust_z(x: torch.Tensor) -> torch.Tensor:
    med = x.median()
    mad = (x - med).abs().median().clamp_min(1e-12)
    return (x - med) / (1.4826 * mad)


@torch.inference_mode()
def flag_glitch_tokens(view: ModelView, texts: list[str], zscore: float = 4.0,
                       corpus_token_ids: set[int] | None = None) -> list[FlaggedToken]:
    """Tokens that look under-trained or cannot occur in text, each with its reason (first reason wins)."""
    tokenizer = view.tokenizer
    n_tok = min(len(tokenizer), view.d_vocab)
    u = view.W_U.detach().float().T  # [V, d_model]
    u = u - u.mean(0, keepdim=True)   # drop the constant component shared by every token
    flags: dict[int, FlaggedToken] = {}

    def flag(i: int, reason: str, score: float | None = None) -> None:
        flags.setdefault(i, FlaggedToken(i, texts[i], reason, None if score is None else round(score, 3)))

    for i in range(n_tok, view.d_vocab):
        flag(i, "beyond-tokenizer")
    norm_z = _robust_z(u[:n_tok].norm(dim=1).log())
    for i in torch.nonzero(norm_z < -zscore).flatten().tolist():
        flag(i, "low-norm", float(norm_z[i]))
    specials = set(getattr(tokenizer, "all_special_ids", []))
    unused = [i for i in range(n_tok) if _UNUSED_NAME.match(tokenizer.convert_ids_to_tokens(i) or "")]
    unused += list(range(n_tok, view.d_vocab))
    if len(unused) >= 3:
        ref = torch.nn.functional.normalize(u[unused].mean(0), dim=0)
        cos = torch.nn.functional.normalize(u[:n_tok], dim=1) @ ref
        cos_z = _robust_z(cos)
        for i in torch.nonzero(cos_z > zscore).flatten().tolist():
            flag(i, "near-unused", float(cos_z[i]))
    candidates = [i for i in range(n_tok) if i not in specials and texts[i]]
    encoded = tokenizer([texts[i] for i in candidates], add_special_tokens=False)["input_ids"]
    for i, ids in zip(candidates, encoded):
        if ids != [i]:
            flag(i, "not-roundtrip")
    if corpus_token_ids is not None:
        for i in range(n_tok):
            if i not in corpus_token_ids and i not in specials:
                flag(i, "not-in-corpus")
    return sorted(flags.values(), key=lambda f: f.token_id)


# -- selection ----------------------------------------------------------------------------------


@dataclass
class UnitGroup:
    """Candidate units that are ranked together: one layer's neurons, or one SAE's latents."""

    name: str
    kind: str
    layer: int
    hook_name: str
    write: torch.Tensor
    sae_id: str | None = None
    sae_release: str | None = None
    neuronpedia_id: str | None = None

    def unit_id(self, index: int) -> str:
        return neuron_id(self.layer, index) if self.kind == "neuron" else f"{self.sae_id}:{index}"


def candidate_layers(view: ModelView, cfg: DiscoverConfig) -> list[int]:
    """Layers whose neurons are scored: those of explicit unit ids, else `layers`, else the last N."""
    if cfg.unit_ids:
        return sorted({p[0] for p in map(parse_neuron_id, cfg.unit_ids) if p})
    if not cfg.neurons:
        return []
    return cfg.layers or list(range(max(0, view.n_layers - cfg.n_last_layers), view.n_layers))


def neuron_groups(view: ModelView, layers: list[int]) -> list[UnitGroup]:
    for layer in layers:
        view._check_layer(layer)
    return [UnitGroup(f"L{layer}", "neuron", layer, view.hook_name("mlp_post", layer), view.mlp_write(layer))
            for layer in sorted(set(layers))]


def sae_groups(view: ModelView, saes: list[SaeSource]) -> list[UnitGroup]:
    return [UnitGroup(s.sae_id, "sae_latent", s.layer, s.hook_name, s.write_directions(view), sae_id=s.sae_id,
                      sae_release=s.release, neuronpedia_id=s.neuronpedia_id)
            for s in saes]


def discover_units(view: ModelView, cfg: DiscoverConfig, saes: list[SaeSource] = (), seed: int = 0,
                   corpus_token_ids: set[int] | None = None) -> tuple[list[UnitRecord], list[FlaggedToken]]:
    """Score every candidate unit, select per group, add controls; also return the flagged tokens."""
    groups = neuron_groups(view, candidate_layers(view, cfg)) + sae_groups(view, list(saes))
    for group in groups:
        if cfg.threshold is None and not cfg.unit_ids and cfg.top_k > group.write.shape[0]:
            raise UserError(f"discover.top_k={cfg.top_k} is larger than {group.name}, which has "
                            f"{group.write.shape[0]} units: lower discover.top_k")
    texts = decode_vocab(view.tokenizer, view.d_vocab)
    flagged = flag_glitch_tokens(view, texts, cfg.glitch_zscore, corpus_token_ids) if cfg.glitch_filter else []
    rejected = {f.token_id for f in flagged}
    unembed = view.unembed()
    wanted = set(cfg.unit_ids) or None
    units: list[UnitRecord] = []
    for group in tqdm(groups, desc="discover", unit="group", disable=None):
        stats = congruence_stats(group.write.to(unembed.dtype), unembed, cfg.unit_chunk, cfg.vocab_chunk)
        records = _group_records(group, stats, texts, cfg.direction)
        if wanted is not None:
            chosen = [r for r in records if r.unit_id in wanted]
        else:
            chosen = _select(records, cfg, rejected)
        units += chosen
        if cfg.controls and chosen and wanted is None:
            units += _controls(records, chosen, seed, group.name)
    if wanted is not None:
        missing = sorted(wanted - {u.unit_id for u in units})
        if missing:
            raise UserError(f"unit {missing[0]} does not exist in this model: neurons are L<layer>N<index> "
                            "within the model's layers and width, SAE latents <sae_id>:<index>")
    return units, flagged


def _group_records(group: UnitGroup, stats: CongruenceStats, texts: list[str], direction: str) -> list[UnitRecord]:
    promote = direction == "promote"
    best_v, best_t = (stats.top_values, stats.top_tokens) if promote else (stats.bottom_values, stats.bottom_tokens)
    other_v, other_t = (stats.bottom_values, stats.bottom_tokens) if promote else (stats.top_values, stats.top_tokens)
    strength = best_v[:, 0] if promote else -best_v[:, 0]
    rank = np.empty(len(strength), dtype=int)
    rank[np.argsort(-strength, kind="stable")] = np.arange(1, len(strength) + 1)
    return [
        UnitRecord(
            unit_id=group.unit_id(i), kind=group.kind, layer=group.layer, index=i, hook_name=group.hook_name,
            token_id=int(best_t[i, 0]), token=texts[int(best_t[i, 0])], congruence=float(best_v[i, 0]),
            control=False, direction=direction, rank_in_layer=int(rank[i]),
            top_tokens=[[texts[int(t)], round(float(v), 6)] for t, v in zip(best_t[i], best_v[i])],
            min_token=texts[int(other_t[i, 0])], min_value=float(other_v[i, 0]),
            kurtosis=float(stats.kurtosis[i]), skew=float(stats.skew[i]), sae_id=group.sae_id,
            sae_release=group.sae_release, neuronpedia_id=group.neuronpedia_id,
        )
        for i in range(len(strength))
    ]


def token_passes(token: str, min_length: int) -> bool:
    """The paper's token filter: a leading space and at least `min_length` characters in all."""
    return token.startswith(" ") and len(token) >= min_length and bool(token.strip())


def _select(records: list[UnitRecord], cfg: DiscoverConfig, rejected: set[int]) -> list[UnitRecord]:
    ranked = sorted(records, key=lambda r: r.rank_in_layer)
    chosen = []
    for r in ranked:
        if cfg.token_filter and not token_passes(r.token, cfg.min_token_length):
            continue
        if r.token_id in rejected:
            continue
        strength = r.congruence if cfg.direction == "promote" else -r.congruence
        if cfg.threshold is not None:
            if strength < cfg.threshold:
                break
        elif len(chosen) >= cfg.top_k:
            break
        chosen.append(r)
    return chosen


def _controls(records: list[UnitRecord], chosen: list[UnitRecord], seed: int, group: str) -> list[UnitRecord]:
    """As many random units of the same group as were chosen (none of them), seeded by run seed and group."""
    taken = {r.index for r in chosen}
    pool = [r for r in records if r.index not in taken]
    rng = np.random.default_rng([seed, *group.encode()])
    picks = rng.choice(len(pool), size=min(len(chosen), len(pool)), replace=False)
    return [_as_control(pool[i]) for i in sorted(picks)]


def _as_control(r: UnitRecord) -> UnitRecord:
    from dataclasses import replace

    return replace(r, control=True)


# -- the stage ----------------------------------------------------------------------------------


def run_stage(ctx: RunContext) -> None:
    """`sae-lens-ctx discover`: write `units.jsonl` and `vocab_filter.jsonl`; print a summary."""
    cfg = ctx.config.discover
    view = ctx.model
    saes = ctx.sae_sources()
    corpus_ids = None
    if cfg.corpus_filter:
        corpus_ids = {t for c in ctx.corpus.split("train") for t in c.tokens}
    units, flagged = discover_units(view, cfg, saes, seed=ctx.config.seed, corpus_token_ids=corpus_ids)
    write_jsonl(ctx.path("units.jsonl"), units)
    write_jsonl(ctx.path("vocab_filter.jsonl"), flagged)
    print(summary_text(units, flagged))


def summary_text(units: list[UnitRecord], flagged: list[FlaggedToken]) -> str:
    """One screen: units per layer, the top ten by congruence with their tokens."""
    real = [u for u in units if not u.control]
    lines = [f"discovered {len(real)} units and {len(units) - len(real)} controls; "
             f"{len(flagged)} tokens flagged by the vocabulary filter"]
    per_group: dict[str, int] = {}
    for u in real:
        key = f"L{u.layer}" if u.kind == "neuron" else str(u.sae_id)
        per_group[key] = per_group.get(key, 0) + 1
    lines.append("  per layer: " + ", ".join(f"{k}: {v}" for k, v in per_group.items()))
    for u in sorted(real, key=lambda u: -abs(u.congruence))[:10]:
        lines.append(f"  {u.unit_id:<14} {u.token!r:<18} congruence {u.congruence:8.3f}  "
                     f"kurtosis {u.kurtosis:7.1f}  skew {u.skew:5.2f}")
    return "\n".join(lines)
