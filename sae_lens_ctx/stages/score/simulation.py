"""OpenAI's simulate-and-score (Bills et al. 2023, neuron-explainer) on the run's held-out sequences.

An explanation is scored by how well a simulator that reads it predicts the unit's activation at **every
token** of held-out sequences: `score.simulation_n_top` top-activating and `score.simulation_n_random`
random sequences of the test split, each a window of its mined context (`mine/windows.py`, cut by
`cut_window`) with the unit's true activation at every token. neuron-explainer's own code does the rest:
its simulators (prompt builder, few-shot set, response parser), its `simulate_and_score` and its
`ev_correlation_score`, `rsquared_score` and `absolute_dev_explained_score` (pooled over all tokens of all
sequences, as it aggregates them).

Tiers (`ScoreRecord.tier`; never pooled):

* ``prompt-logprobs``: `ExplanationNeuronSimulator` (all at once, OpenAI's exact method): one prompt per
  sequence whose tokens are each followed by "unknown"; the expected value over "0".."10" of the
  next-token log-probabilities at every "unknown" position. Needs the backend's prompt logprobs
  (`core.llm.PromptLogprobs`: in-process exact; servers through `/v1/completions` with echo).
* ``token-by-token``: `ExplanationTokenByTokenSimulator` (one one-token chat completion with logprobs per
  token; at most `score.simulation_max_calls_per_sequence` a sequence).
* ``logprob-free``: `LogprobFreeExplanationTokenSimulator` (the activations written out as text, parsed by
  its own parser; 0.0.1's constructor bug fixed in `clients.neuron_explainer.simulator_module`).
* ``deterministic``: no LLM: a unit's look-up pattern at every token (`core.unit_lookups.judge` on the
  tokens up to t), and the confound controls (`length`: the position in the sequence; `token`: whether the
  unit's own token occurs at or before t).

`probe_tier` asks the backend once, before any simulation, with tiny requests, which tier it serves. A
sequence whose simulation fails (a failed call, a server that stopped giving logprobs, echo tokens that do
not align with the sequence) is left out and counted under its reason on the score (`failures`); a score
with no usable sequence, or an undefined correlation (the unit never fires on them), has value None and
its reason (`skipped`): never NaN.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...clients.llm import LLM, LOCAL_BACKENDS
from ...clients.neuron_explainer import (NeuronExplainerClient, UnreproducedSequence, neuron_explainer_imports,
                                         simulator_module)
from ...core.config import ScoreConfig
from ...core.llm import LLMError, PromptLogprobs
from ...core.records import ScoreRecord, iter_jsonl
from ...core.lookups import judge as head_judge
from ...core.unit_lookups import judge as unit_judge

log = logging.getLogger(__name__)

TIERS = ("prompt-logprobs", "token-by-token", "logprob-free", "deterministic")
"""Simulation tiers, best first (see the module)."""

METRICS = ("ev_correlation", "rsquared", "absolute_dev_explained")
"""neuron-explainer's scores of a simulation, as `ScoreRecord.metric` (scorer `sim_{metric}`)."""

UNPREDICTED = "token without a prediction (neuron-explainer sets its EV to 0: a newline folded into it, or no digit among the top logprobs)"


@dataclass(frozen=True)
class SimSequence:
    """One held-out sequence to simulate: the unit's true activation at every token."""

    kind: str
    """'top' or 'random'."""
    rank: int
    tokens: list[str]
    token_ids: list[int]
    activations: list[float]


@dataclass
class Simulated:
    """What simulating one explanation on a unit's sequences gave."""

    tier: str
    values: dict[str, float | None] = field(default_factory=dict)
    """Metric → value (None: undefined)."""
    true: list[list[float]] = field(default_factory=list)
    predicted: list[list[float]] = field(default_factory=list)
    """Per usable sequence: true and predicted activations (for the bootstrap)."""
    failures: Counter = field(default_factory=Counter)
    skipped: str | None = None


# --------------------------------------------------------------------------------------------
# Sequences
# --------------------------------------------------------------------------------------------


def cut_window(tokens: Sequence[Any], peak: int, kind: str, width: int) -> slice:
    """The window simulated of a mined context: `width` tokens centred on the peak of a top sequence (the
    peak at index width // 2 where the context allows), the first `width` of a random one; 0 = all."""
    n = len(tokens)
    if width <= 0 or n <= width:
        return slice(0, n)
    start = 0 if kind != "top" else min(max(0, peak - width // 2), n - width)
    return slice(start, start + width)


def _chosen_windows(path: Path, cfg: ScoreConfig) -> list[tuple[int, dict, slice]]:
    """(line, window, cut) of each unit's first `simulation_n_top` top and `simulation_n_random` random windows
    of `windows.jsonl`, in file order."""
    out = []
    counts: Counter = Counter()
    wanted = {"top": cfg.simulation_n_top, "random": cfg.simulation_n_random}
    for line, w in enumerate(iter_jsonl(path)):
        if counts[(w["unit_id"], w["kind"])] >= wanted.get(w["kind"], 0):
            continue
        counts[(w["unit_id"], w["kind"])] += 1
        out.append((line, w, cut_window(w["tokens"], w["peak"], w["kind"], cfg.simulation_window)))
    return out


def read_sequences(path: Path, cfg: ScoreConfig) -> dict[str, list[SimSequence]]:
    """unit_id → its first `simulation_n_top` top and `simulation_n_random` random windows of
    `windows.jsonl` (empty when the run has none: written before results format 3)."""
    if not path.is_file():
        return {}
    out: dict[str, list[SimSequence]] = {}
    for _, w, cut in _chosen_windows(path, cfg):
        out.setdefault(w["unit_id"], []).append(SimSequence(w["kind"], w["rank"], w["tokens"][cut],
                                                          w["token_ids"][cut], w["activations"][cut]))
    return out


def read_head_sequences(windows: Path, head_tokens: Path, cfg: ScoreConfig) -> dict[tuple[str, str], list[SimSequence]]:
    """(unit_id, head) → the unit's simulated windows (`read_sequences`, the same cuts) with the head's direct
    attribution at every token as the activations (`head_tokens.jsonl`, written by the attribute stage)."""
    if not (windows.is_file() and head_tokens.is_file()):
        return {}
    chosen = {line: (w, cut) for line, w, cut in _chosen_windows(windows, cfg)}
    out: dict[tuple[str, str], list[SimSequence]] = {}
    for r in iter_jsonl(head_tokens):
        if r["line"] in chosen:
            w, cut = chosen[r["line"]]
            out.setdefault((r["unit_id"], r["head"]), []).append(
                SimSequence(w["kind"], w["rank"], w["tokens"][cut], w["token_ids"][cut], r["attributions"][cut]))
    return out


def head_role(explanation: str, head: str, unit_id: str) -> str:
    """A head explanation as the simulator is given it: neuron-explainer's prompt asks what "the neuron"
    finds, so the head's role is named after the explanation (docs/simulation.md)."""
    return f"{explanation.rstrip('. ')} (the activation is attention head {head}'s direct contribution to unit {unit_id})"


# --------------------------------------------------------------------------------------------
# Tiers
# --------------------------------------------------------------------------------------------


def probe_tier(llm: LLM, wanted: str = "auto") -> tuple[str | None, str]:
    """(tier, why): the best LLM tier the backend serves, asked once with tiny requests (a 2-token prompt's
    logprobs, a one-token chat answer with logprobs, a short chat answer); a tier named in `wanted` is
    taken as is. None when no tier works (the reason says why)."""
    if wanted != "auto":
        return wanted, "set by score.simulate"
    why = []
    ask = [{"role": "user", "content": "Say 0."}]
    try:
        answer = llm.prompt_logprobs(["Activations: 0"], 2)[0]
        if isinstance(answer, PromptLogprobs) and any(answer.top_logprobs[1:]):
            return "prompt-logprobs", "the backend returns prompt logprobs"
        why.append(f"no prompt logprobs ({answer.reason if isinstance(answer, LLMError) else 'empty'})")
        chat = llm.call(ask, max_tokens=1, temperature=0.0, top_logprobs=2)
        if chat.ok and chat.response.logprobs and chat.response.logprobs[0].top:
            return "token-by-token", "; ".join(why) + ": chat answers carry token logprobs"
        why.append("no chat logprobs" if chat.ok else f"chat failed ({chat.reason})")
        plain = llm.call(ask, max_tokens=4, temperature=0.0)
        if plain.ok:
            return "logprob-free", "; ".join(why) + ": chat answers only"
        why.append(f"chat failed ({plain.reason})")
    except Exception as e:  # noqa: BLE001  (a backend that cannot take the probe: no LLM tier, not a crash)
        why.append(f"the probe failed ({type(e).__name__}: {str(e)[:120]})")
    return None, "; ".join(why)


def llm_simulator(tier: str, explanation: str, client: NeuronExplainerClient) -> Any:
    """neuron-explainer's simulator of `tier` for `explanation`, calling our `client`."""
    sim = simulator_module()
    with neuron_explainer_imports():
        from neuron_explainer.explanations.prompt_builder import PromptFormat
    if tier == "prompt-logprobs":
        s = sim.ExplanationNeuronSimulator("sae-lens-ctx", explanation)
    elif tier == "token-by-token":
        s = sim.ExplanationTokenByTokenSimulator("sae-lens-ctx", explanation, prompt_format=PromptFormat.HARMONY_V4)
    elif tier == "logprob-free":
        s = sim.LogprobFreeExplanationTokenSimulator("sae-lens-ctx", explanation,
                                                     prompt_format=PromptFormat.HARMONY_V4)
    else:
        raise ValueError(f"unknown simulation tier {tier!r}")
    s.api_client = client
    return s


class FixedSimulator:
    """A deterministic per-token simulator: `predict(sequence) -> activations`, looked up by its tokens."""

    def __init__(self, sequences: Sequence[SimSequence], predict: Callable[[SimSequence], list[float]]):
        self._by_tokens = {tuple(s.tokens): predict(s) for s in sequences}

    async def simulate(self, tokens: Sequence[str]) -> Any:
        with neuron_explainer_imports():
            from neuron_explainer.explanations.explanations import ActivationScale, SequenceSimulation
        return SequenceSimulation(tokens=list(tokens), expected_activations=list(self._by_tokens[tuple(tokens)]),
                                  activation_scale=ActivationScale.SIMULATED_NORMALIZED_ACTIVATIONS,
                                  distribution_values=[], distribution_probabilities=[])


def lookup_predictions(pattern: dict | None) -> Callable[[SimSequence], list[float]]:
    """A unit look-up pattern at every token: the graded judge on the tokens up to t (the rule matched at t)."""
    return lambda s: [unit_judge(pattern, s.token_ids[:t + 1])[1] for t in range(len(s.token_ids))]


def head_lookup_predictions(pattern: dict | None) -> Callable[[SimSequence], list[float]]:
    """A head look-up pattern at every token: the graded judge on the tokens up to t (a pattern token occurs at
    or before t, weighted as the judge weighs it)."""
    return lambda s: [head_judge(pattern, s.token_ids[:t + 1])[1] for t in range(len(s.token_ids))]


def position_predictions(s: SimSequence) -> list[float]:
    """The length control: the position in the sequence (what a simulator that only counts tokens knows)."""
    return [float(t) for t in range(len(s.tokens))]


def token_predictions(token_id: int | None) -> Callable[[SimSequence], list[float]]:
    """The token control: 1 from the first occurrence of the unit's own token (the one it predicts) on."""
    def predict(s: SimSequence) -> list[float]:
        seen, out = False, []
        for t in s.token_ids:
            seen = seen or (token_id is not None and int(t) == int(token_id))
            out.append(float(seen))
        return out
    return predict


# --------------------------------------------------------------------------------------------
# Simulate and score
# --------------------------------------------------------------------------------------------


def simulate(simulator: Any, sequences: Sequence[SimSequence], tier: str, max_calls: int | None = None) -> Simulated:
    """Simulate every sequence (together: an in-process model computes their shared prompt opening once),
    then neuron-explainer's `simulate_and_score` over the usable ones, replayed (see the module)."""
    with neuron_explainer_imports():
        from neuron_explainer.activations.activations import ActivationRecord
        from neuron_explainer.explanations.scoring import simulate_and_score
    out = Simulated(tier)
    todo = [s for s in sequences if max_calls is None or len(s.tokens) <= max_calls]
    if len(todo) < len(sequences):
        out.failures["longer than score.simulation_max_calls_per_sequence"] += len(sequences) - len(todo)

    async def all_of() -> list[Any]:
        return await asyncio.gather(*[simulator.simulate(s.tokens) for s in todo], return_exceptions=True)

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        results = asyncio.run(all_of())
    usable, replay = [], {}
    for s, r in zip(todo, results):
        reason = _failure(r, s)
        if reason:
            out.failures[reason] += 1
            continue
        unpredicted = sum(1 for d in (r.distribution_values or []) if not d) if tier != "logprob-free" and \
            tier != "deterministic" else 0
        if unpredicted:
            out.failures[UNPREDICTED] += unpredicted
        usable.append(s)
        replay[tuple(s.tokens)] = r
    if not usable:
        out.skipped = "no sequence simulated: " + (", ".join(sorted(out.failures)) or "no held-out sequences")
        out.values = dict.fromkeys(METRICS)
        return out

    class Replay:
        async def simulate(self, tokens: Sequence[str]) -> Any:
            return replay[tuple(tokens)]

    records = [ActivationRecord(tokens=list(s.tokens), activations=[float(a) for a in s.activations]) for s in usable]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        scored = asyncio.run(simulate_and_score(Replay(), records))
    out.true = [list(s.activations) for s in usable]
    out.predicted = [[float(x) for x in replay[tuple(s.tokens)].expected_activations] for s in usable]
    out.values = {"ev_correlation": _finite(scored.ev_correlation_score), "rsquared": _finite(scored.rsquared_score),
                  "absolute_dev_explained": _finite(scored.absolute_dev_explained_score)}
    if out.values["ev_correlation"] is None:
        true = np.concatenate([np.asarray(t, float) for t in out.true])
        pred = np.concatenate([np.asarray(p, float) for p in out.predicted])
        out.skipped = ("the unit's activation is constant on the simulated sequences (it never fires there)"
                       if np.ptp(true) == 0 else "the simulation is constant over every token"
                       if np.ptp(pred) == 0 else "undefined correlation")
    return out


def _failure(result: Any, s: SimSequence) -> str | None:
    """Why a sequence's simulation is unusable, or None."""
    if isinstance(result, LLMError):
        return f"call failed: {result.reason}"
    if isinstance(result, UnreproducedSequence):
        return "the logprob-free answer did not repeat the sequence's tokens"
    if isinstance(result, AssertionError):
        return "echo tokens misaligned with the sequence (neuron-explainer's parser)"
    if isinstance(result, BaseException):
        return f"simulator error: {type(result).__name__}"
    ev = list(result.expected_activations)
    if len(ev) != len(s.tokens):
        return "echo tokens misaligned with the sequence (fewer predictions than tokens)"
    if not all(np.isfinite(float(x)) for x in ev):
        return "non-finite prediction"
    return None


def _finite(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def sequence_bootstrap(true: Sequence[Sequence[float]], predicted: Sequence[Sequence[float]], metric: str,
                       n_resamples: int, confidence: float, seed: int) -> tuple[float | None, float | None]:
    """Percentile bootstrap of a pooled metric over sequences (resampled whole, as they were drawn);
    undefined resamples dropped; (None, None) for fewer than two sequences or half undefined.

    Every pooled metric is a function of sums over tokens, and a resample's sums are its sequences' sums
    weighted by how often it drew each: one `[n_resamples, n_sequences]` count matrix times the per-sequence
    sums computes every resample at once (the same draws as concatenating them; the values agree with
    `_pooled` on the concatenation to float64 round-off, values shifted by the overall means so that the
    correlation's variances do not cancel)."""
    if len(true) < 2:
        return None, None
    rng = np.random.default_rng(seed)
    t_arr = [np.asarray(t, float) for t in true]
    p_arr = [np.asarray(p, float) for p in predicted]
    picks = rng.integers(0, len(true), (n_resamples, len(true)))
    counts = np.zeros((n_resamples, len(true)))
    np.add.at(counts, (np.repeat(np.arange(n_resamples), len(true)), picks.ravel()), 1.0)
    t0 = np.concatenate(t_arr).mean() if metric == "ev_correlation" else 0.0
    p0 = np.concatenate(p_arr).mean() if metric == "ev_correlation" else 0.0
    sums = np.array([_sums(t - t0, p - p0) for t, p in zip(t_arr, p_arr)])  # [n_sequences, 8]
    n, st, sp, stt, spp, stp, sdd, sad, sat = (counts @ sums).T
    with np.errstate(all="ignore"):
        if metric == "ev_correlation":
            vt, vp = stt - st * st / n, spp - sp * sp / n
            zero = (vt <= 1e-12 * stt) | (vp <= 1e-12 * spp)
            v = np.where(zero, np.nan, (stp - st * sp / n) / np.sqrt(vt * vp))
        elif metric == "rsquared":
            v = 1 - sdd / stt
        else:
            v = 1 - sad / sat
    v = v[np.isfinite(v)]
    if len(v) < n_resamples / 2:
        return None, None
    alpha = (1 - confidence) / 2
    return float(np.percentile(v, 100 * alpha)), float(np.percentile(v, 100 * (1 - alpha)))


def _sums(t: np.ndarray, p: np.ndarray) -> list[float]:
    """One sequence's sums: tokens, Σt, Σp, Σt², Σp², Σtp, Σ(t−p)², Σ|t−p|, Σ|t|."""
    d = t - p
    return [len(t), t.sum(), p.sum(), t @ t, p @ p, t @ p, d @ d, np.abs(d).sum(), np.abs(t).sum()]


def score_records(sim: Simulated, unit_id: str, control: bool, explainer: str, control_kind: str | None,
                  cfg: ScoreConfig, seed: int, head: str | None = None) -> list[ScoreRecord]:
    """One `ScoreRecord` per metric of a simulation (scorer `sim_{metric}`; target 'unit', or 'head' for a
    head's explanation simulated on its per-token attribution)."""
    n_tokens = sum(len(t) for t in sim.true)
    out = []
    for metric in METRICS:
        value = sim.values.get(metric)
        lo, hi = (sequence_bootstrap(sim.true, sim.predicted, metric, cfg.bootstrap_resamples, cfg.confidence, seed)
                  if value is not None else (None, None))
        out.append(ScoreRecord(unit_id=unit_id, head=head, scorer=f"sim_{metric}", value=value, ci_low=lo,
                               ci_high=hi, n=len(sim.true), control=control,
                               n_failed=sum(v for k, v in sim.failures.items() if k != UNPREDICTED),
                               skipped=None if value is not None else (sim.skipped or "undefined"),
                               explainer=explainer, control_kind=control_kind,
                               target="unit" if head is None else "head", metric=metric,
                               tier=sim.tier, n_tokens=n_tokens, failures=dict(sim.failures) or None))
    return out


# --------------------------------------------------------------------------------------------
# The stage's part
# --------------------------------------------------------------------------------------------


@dataclass
class SimulationRun:
    """Every simulation score of a run and what it took."""

    scores: list[ScoreRecord]
    info: dict[str, Any]
    """For summary.json: the tier, the probe's answer, sequences, prompt tokens, prefix-cache share."""


def simulation_scores(llm: LLM | None, tier: str | None, inp: Any, sequences: dict[str, list[SimSequence]],
                      cfg: ScoreConfig, seed: int, partner: Callable[[list], dict],
                      head_sequences: dict[tuple[str, str], list[SimSequence]] | None = None) -> SimulationRun:
    """Per unit with held-out sequences: its LLM explanation simulated on the `tier` (when there is one)
    and its look-up pattern (deterministic), each with its shuffled control (another unit's explanation on
    this unit's sequences, `score.shuffled_control`); the length and token controls once per unit.
    `partner(keys)` is the stage's shuffled-control derangement (of unit ids, or of (unit, head) pairs).

    Heads, per token (issue #26): per relevant pair with `head_sequences` (the head's direct attribution at
    every token of its unit's windows), the pair's look-up pattern and, for at most
    `score.simulation_llm_heads` pairs, its LLM explanation (`head_role` names the head), each with its
    shuffled control (another pair's explanation), and the length and token controls; target 'head'."""
    from ...core.lookups import EXPLAINER as LOOKUP

    head_sequences = head_sequences or {}
    scores: list[ScoreRecord] = []
    before = _prefix_counts(llm)
    units = [u for u in sequences if u in inp.units]
    llm_text = {u: inp.unit_explanations[u] for u in units
                if u in inp.unit_explanations and inp.unit_explanations[u].status == "ok"} if llm and tier else {}
    lookup = {u: inp.lookup_explanations[(u, None)] for u in units
              if (u, None) in inp.lookup_explanations and inp.lookup_explanations[(u, None)].status == "ok"}
    llm_partner = partner(sorted(llm_text)) if cfg.shuffled_control else {}
    lookup_partner = partner(sorted(lookup)) if cfg.shuffled_control else {}
    max_calls = cfg.simulation_max_calls_per_sequence if tier == "token-by-token" else None
    pairs = [k for k in head_sequences if k[0] in inp.units]
    head_text = _llm_heads({k: inp.head_explanations[k] for k in pairs if k in inp.head_explanations
                            and inp.head_explanations[k].status == "ok"}, cfg.simulation_llm_heads) \
        if llm and tier else {}
    head_lookup = {k: inp.lookup_explanations[k] for k in pairs
                   if k in inp.lookup_explanations and inp.lookup_explanations[k].status == "ok"}
    head_partner = partner(sorted(head_text)) if cfg.shuffled_control else {}
    head_lookup_partner = partner(sorted(head_lookup)) if cfg.shuffled_control else {}

    def kind_of(unit_id: str, kind: str | None) -> str | None:
        return kind or ("random_unit" if inp.units[unit_id].control else None)

    # (unit, head or None, explainer, control kind, text shown, sequences)
    jobs = [(u, None, llm_text[u].explainer, kind, text, sequences[u]) for u in units if u in llm_text
            for text, kind in [(llm_text[u].text, None)]
            + ([(llm_text[llm_partner[u]].text, "shuffled")] if u in llm_partner else [])]
    jobs += [(u, h, head_text[(u, h)].explainer, kind, head_role(text, h, u), head_sequences[(u, h)])
             for (u, h) in head_text
             for text, kind in [(head_text[(u, h)].text, None)]
             + ([(head_text[head_partner[(u, h)]].text, "shuffled")] if (u, h) in head_partner else [])]
    prompt_tokens: list[int] = []

    def run(job: tuple) -> Simulated:
        _, _, _, _, text, seqs = job
        if not text.strip():
            return Simulated(tier, dict.fromkeys(METRICS), failures=Counter({"empty explanation": len(seqs)}),
                             skipped="empty explanation")
        client = NeuronExplainerClient(llm)  # one per explanation: its requests are computed together
        sim = simulate(llm_simulator(tier, text, client), seqs, tier, max_calls)
        prompt_tokens.extend(client.prompt_tokens)
        return sim

    from concurrent.futures import ThreadPoolExecutor

    workers = llm.max_concurrency if llm is not None else 1
    if llm is not None and llm.backend in LOCAL_BACKENDS:
        workers = min(workers, os.cpu_count() or 1)  # in-process: one explanation a core
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for (unit_id, head, explainer, kind, _, _), sim in zip(jobs, pool.map(run, jobs)):
            scores.extend(score_records(sim, unit_id, bool(inp.units[unit_id].control), explainer,
                                        kind_of(unit_id, kind), cfg, seed, head))

    def shown(patterns: dict, partners: dict, key) -> list[tuple[dict | None, str | None]]:
        """A look-up pattern and its shuffled control's (another unit's or pair's) pattern, where there is one."""
        if key not in patterns:
            return []
        return [(patterns[key].pattern, None)] + ([(patterns[partners[key]].pattern, "shuffled")] if key in partners
                                                  else [])

    # (unit, head or None, sequences, look-up patterns shown, their per-token predictor)
    fixed_jobs = [(u, None, sequences[u], shown(lookup, lookup_partner, u), lookup_predictions) for u in units]
    # every pair simulated (a look-up pattern or an LLM explanation) gets its length and token controls
    fixed_jobs += [(u, h, head_sequences[(u, h)], shown(head_lookup, head_lookup_partner, (u, h)),
                    head_lookup_predictions) for u, h in sorted(set(head_lookup) | set(head_text))]
    for unit_id, head, seqs, patterns, predictor in fixed_jobs:
        unit = inp.units[unit_id]
        fixed = [(LOOKUP, kind, predictor(pattern)) for pattern, kind in patterns]
        fixed += [("length", "length", position_predictions), ("token", "token", token_predictions(unit.token_id))]
        for explainer, kind, predict in fixed:
            sim = simulate(FixedSimulator(seqs, predict), seqs, "deterministic")
            scores.extend(score_records(sim, unit_id, bool(unit.control), explainer, kind_of(unit_id, kind), cfg,
                                        seed, head))
    after = _prefix_counts(llm)
    info: dict[str, Any] = {"tier": tier, "n_units": len(units),
                            "sequences_per_unit": {"top": cfg.simulation_n_top, "random": cfg.simulation_n_random},
                            "window": cfg.simulation_window}
    if prompt_tokens:
        total = sum(prompt_tokens)
        info["prompt_tokens_per_sequence"] = round(total / len(prompt_tokens), 1)
        if before is not None and after is not None:
            served, shared = (after[0] - before[0]) * after[2], after[3] - before[3]
            info["prefix_cache"] = {"prompt_tokens": total, "served_from_cache": served,
                                    "share": round(served / total, 3) if total else None,
                                    "shared_within_call": shared, "shared_share": round(shared / total, 3),
                                    "computed": total - served - shared}
    return SimulationRun(scores, info)


def _llm_heads(explained: dict[tuple[str, str], Any], limit: int) -> dict[tuple[str, str], Any]:
    """At most `limit` explained pairs: each unit's first pair (in head order), then every unit's second, ..."""
    by_unit: dict[str, list[tuple[str, str]]] = {}
    for key in sorted(explained):
        by_unit.setdefault(key[0], []).append(key)
    order = [keys[i] for i in range(max(map(len, by_unit.values()), default=0)) for keys in by_unit.values()
             if i < len(keys)]
    return {k: explained[k] for k in order[:limit]}


def _prefix_counts(llm: LLM | None) -> tuple[int, int, int, int] | None:
    counts = getattr(getattr(llm, "client", None), "prefix_cache_counts", None)
    return counts() if callable(counts) else None


def simulation_summary(scores: Sequence[ScoreRecord], cfg: ScoreConfig, seed: int,
                       target: str = "unit") -> dict[str, Any]:
    """summary.json's `simulation` block: per tier (never pooled), per explainer, per metric: the real
    units' scores, the random control units', the shuffled explanations' and the length/token controls',
    with real − control comparisons (paired by unit). `target='head'`: the same over head explanations
    simulated on their per-token attribution (paired by (unit, head); a control unit's pairs are the
    random-unit control)."""
    from .metrics import aggregate, compare

    boot = dict(n_resamples=cfg.bootstrap_resamples, confidence=cfg.confidence, seed=seed)
    sims = [s for s in scores if s.metric is not None and (s.target or "unit") == target]
    controls_by = {((s.unit_id, s.head), s.metric, s.control_kind): s.value for s in sims
                   if s.control_kind in ("length", "token")}
    out: dict[str, Any] = {}
    for tier in TIERS:
        for explainer in sorted({s.explainer for s in sims if s.tier == tier and s.control_kind in (None, "random_unit")}):
            block = out.setdefault(tier, {}).setdefault(explainer, {})
            for metric in METRICS:
                mine = [s for s in sims if s.tier == tier and s.explainer == explainer and s.metric == metric]
                real = {(s.unit_id, s.head): s.value for s in mine if s.control_kind is None}
                ctrl = [s.value for s in mine if s.control_kind == "random_unit"]
                shuffled = {(s.unit_id, s.head): s.value for s in mine if s.control_kind == "shuffled" and not s.control}
                m: dict[str, Any] = {"real": aggregate(list(real.values()), **boot),
                                     "random_units": aggregate(ctrl, **boot),
                                     "real_minus_random_units": compare(list(real.values()), ctrl, **boot),
                                     "shuffled_explanations": aggregate(list(shuffled.values()), **boot)}
                keys = [k for k in real if real[k] is not None and shuffled.get(k) is not None]
                m["real_minus_shuffled"] = compare([real[k] for k in keys], [shuffled[k] for k in keys], paired=True,
                                                   **boot)
                for kind in ("length", "token"):
                    keys = [k for k in real if real[k] is not None and controls_by.get((k, metric, kind)) is not None]
                    m[f"{kind}_control"] = aggregate([controls_by[(k, metric, kind)] for k in keys], **boot)
                    m[f"real_minus_{kind}"] = compare([real[k] for k in keys],
                                                      [controls_by[(k, metric, kind)] for k in keys], paired=True, **boot)
                block[metric] = m
    return out


def simulation_text(block: dict[str, Any]) -> str:
    """The console lines of summary.json's `simulation` block: per tier and explainer, ev_correlation real
    beside its controls."""
    def fmt(a: dict) -> str:
        if a["mean"] is None:
            return "n/a (n=0)"
        ci = f" [{a['ci_low']:.3f}, {a['ci_high']:.3f}]" if a["ci_low"] is not None else ""
        return f"{a['mean']:.3f}{ci} (n={a['n']})"

    lines = [f"simulation ({block.get('tier') or 'deterministic only'}; {block.get('probe', '')})"]
    for tier, by_explainer in block.get("tiers", {}).items():
        for explainer, metrics in by_explainer.items():
            m = metrics["ev_correlation"]
            lines.append(f"  {tier} {explainer} ev_correlation real {fmt(m['real'])}; shuffled "
                         f"{fmt(m['shuffled_explanations'])}; random units {fmt(m['random_units'])}; "
                         f"length {fmt(m['length_control'])}; token {fmt(m['token_control'])}")
    return "\n".join(lines)
