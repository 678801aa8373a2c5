"""Per-token simulate-and-score (stages/score/simulation.py, docs/simulation.md): neuron-explainer's simulators
and scoring through our clients, on every tier, with the tier recorded; the planted models' known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sae_lens_ctx.core.config import ScoreConfig
from sae_lens_ctx.core.records import iter_jsonl
from sae_lens_ctx.stages.score.simulation import (FixedSimulator, SimSequence, cut_window, score_records,
                                                   simulate, simulation_summary, simulation_text, token_predictions)


# -- windows, fixed simulators, records ----------------------------------------------------------


def test_windows_are_centred_on_the_peak_and_clipped_to_the_context():
    tokens = list(range(63))
    assert cut_window(tokens, 40, "top", 32) == slice(24, 56)
    assert cut_window(tokens, 3, "top", 32) == slice(0, 32)
    assert cut_window(tokens, 60, "top", 32) == slice(31, 63)
    assert cut_window(tokens, 60, "random", 32) == slice(0, 32)
    assert cut_window(tokens, 60, "top", 0) == slice(0, 63)


def _seq(acts, ids=None, kind="top"):
    ids = ids or list(range(len(acts)))
    return SimSequence(kind, 0, [f" t{i}" for i in ids], ids, [float(a) for a in acts])


def test_a_fixed_simulator_scores_through_simulate_and_score_by_hand():
    """ev_correlation is the Pearson correlation pooled over every token of every sequence (neuron-explainer's
    aggregation), rsquared and absolute_dev_explained its formulas; the token control is 1 from the unit's
    token on."""
    seqs = [_seq([0, 1, 3, 0], [5, 7, 9, 2]), _seq([2, 0, 0, 1], [7, 1, 1, 9])]
    predict = token_predictions(7)
    sim = simulate(FixedSimulator(seqs, predict), seqs, "deterministic")
    true = np.array([0, 1, 3, 0, 2, 0, 0, 1], float)
    pred = np.array([0, 1, 1, 1, 1, 1, 1, 1], float)
    assert sim.values["ev_correlation"] == pytest.approx(np.corrcoef(true, pred)[0, 1], abs=1e-12)
    assert sim.values["rsquared"] == pytest.approx(1 - np.mean((true - pred) ** 2) / np.mean(true ** 2), abs=1e-12)
    assert sim.values["absolute_dev_explained"] == pytest.approx(1 - np.mean(abs(true - pred)) / np.mean(abs(true)))
    records = score_records(sim, "L1N2", False, "token", "token", ScoreConfig(bootstrap_resamples=200), 0)
    assert [r.metric for r in records] == ["ev_correlation", "rsquared", "absolute_dev_explained"]
    assert all(r.tier == "deterministic" and r.target == "unit" and r.n == 2 and r.n_tokens == 8 for r in records)


def test_a_unit_that_never_fires_is_skipped_with_its_reason_never_nan():
    seqs = [_seq([0, 0, 0]), _seq([0, 0])]
    sim = simulate(FixedSimulator(seqs, lambda s: [float(t) for t in range(len(s.tokens))]), seqs, "deterministic")
    [ev] = [r for r in score_records(sim, "u", False, "lookup", None, ScoreConfig(), 0) if r.metric == "ev_correlation"]
    assert ev.value is None and "never fires" in ev.skipped
    summary = simulation_summary(score_records(sim, "u", False, "lookup", None, ScoreConfig(), 0), ScoreConfig(), 0)
    block = summary["deterministic"]["lookup"]["ev_correlation"]
    assert block["real"]["n"] == 0 and block["real"]["mean"] is None
    text = simulation_text({"tier": None, "probe": "score.simulate is off", "tiers": summary})
    assert "deterministic only" in text and "deterministic lookup ev_correlation real n/a (n=0)" in text


def test_failed_sequences_are_counted_by_reason_and_the_rest_scored():
    from sae_lens_ctx.core.llm import LLMError

    class Flaky:
        """A simulator made for this test: fails on sequences that start with ' t9'."""

        async def simulate(self, tokens):
            if tokens[0] == " t9":
                raise LLMError("no_prompt_logprobs", "stopped")
            return await FixedSimulator(seqs, lambda s: s.activations).simulate(tokens)

    seqs = [_seq([0, 1, 2]), _seq([2, 0, 1], [9, 1, 2]), _seq([1, 3, 0], [4, 5, 6])]
    sim = simulate(Flaky(), seqs, "prompt-logprobs")
    assert sim.failures == {"call failed: no_prompt_logprobs": 1}
    assert sim.values["ev_correlation"] == pytest.approx(1.0)
    [ev] = [r for r in score_records(sim, "u", False, "x", None, ScoreConfig(), 0) if r.metric == "ev_correlation"]
    assert ev.n == 2 and ev.n_failed == 1 and ev.failures == {"call failed: no_prompt_logprobs": 1}


# -- the planted models --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted_sim_run(planted, tmp_path_factory):
    """The whole pipeline on the planted model (offline test LLM: chat only, no logprobs), once per architecture."""
    from test_lookups import _run_planted

    return _run_planted(planted, tmp_path_factory.mktemp(f"sim-{planted.arch}"))


def test_planted_unit_lookup_simulates_per_token_and_its_shuffled_control_does_not(planted, planted_sim_run):
    """The planted neuron fires after either trigger: its look-up pattern, simulated at every token of held-out
    top and random windows (the deterministic tier), has ev_correlation >= 0.9; another unit's pattern on the
    same windows <= 0.3. The offline test LLM serves chat without logprobs: the probe picks the logprob-free
    tier, and the records say so."""
    out = planted_sim_run
    a = planted.answer
    unit = f"L{a.neuron_layer}N{a.neuron_index}"
    windows = [w for w in iter_jsonl(out / "windows.jsonl") if w["unit_id"] == unit]
    assert {w["kind"] for w in windows} == {"top", "random"}
    assert all(len(w["tokens"]) == len(w["activations"]) == len(w["token_ids"]) for w in windows)
    sims = [s for s in iter_jsonl(out / "scores.jsonl") if s["unit_id"] == unit and s["metric"] == "ev_correlation"
            and s["target"] == "unit"]
    by = {(s["explainer"], s["control_kind"]): s for s in sims}
    own = by[("lookup", None)]
    assert own["tier"] == "deterministic" and own["target"] == "unit" and own["n"] >= 6
    assert own["value"] >= 0.9 and own["ci_low"] is not None
    shuffled = by.get(("lookup", "shuffled"))
    assert shuffled is None or shuffled["value"] is None or shuffled["value"] <= 0.3
    llm = [s for s in sims if s["explainer"] not in ("lookup", "length", "token")]
    assert llm and {s["tier"] for s in llm} == {"logprob-free"}
    summary = json.loads((out / "summary.json").read_text())["simulation"]
    assert summary["tier"] == "logprob-free" and "chat answers only" in summary["probe"]
    assert summary["tiers"]["deterministic"]["lookup"]["ev_correlation"]["real"]["n"] >= 1
    assert "prompt-logprobs" not in summary["tiers"]



def test_planted_pairs_simulate_on_their_heads_per_token_attribution(planted, planted_sim_run):
    """Heads per token (#26 point 4): each planted head's direct attribution at every token of the planted
    neuron's held-out windows is in head_tokens.jsonl (one value a token), and the pair's look-up pattern,
    simulated on it, has ev_correlation >= 0.8 (deterministic tier, target 'head'); the LLM head explanations
    are simulated too (logprob-free tier here), each with its shuffled control, and summary.json's
    `simulation.heads` block holds them apart from the units'."""
    out = planted_sim_run
    a = planted.answer
    unit = f"L{a.neuron_layer}N{a.neuron_index}"
    planted_heads = {f"L{l}H{h}" for l, h in a.heads}
    windows = list(iter_jsonl(out / "windows.jsonl"))
    rows = [r for r in iter_jsonl(out / "head_tokens.jsonl") if r["unit_id"] == unit]
    assert {r["head"] for r in rows} >= planted_heads
    for r in rows:
        assert len(r["attributions"]) == len(windows[r["line"]]["tokens"]) and windows[r["line"]]["unit_id"] == unit
    sims = [s for s in iter_jsonl(out / "scores.jsonl") if s["target"] == "head" and s["unit_id"] == unit
            and s["metric"] == "ev_correlation"]
    for head in planted_heads:
        own = next(s for s in sims if s["head"] == head and s["explainer"] == "lookup" and s["control_kind"] is None)
        assert own["tier"] == "deterministic" and own["n"] >= 6 and own["value"] >= 0.8, own
    llm = [s for s in sims if s["explainer"] not in ("lookup", "length", "token")]
    assert llm and {s["tier"] for s in llm} == {"logprob-free"}
    assert {s["control_kind"] for s in llm} >= {None, "shuffled"}
    every = [s for s in iter_jsonl(out / "scores.jsonl") if s["target"] == "head" and s["metric"] == "ev_correlation"]
    for pair in {(s["unit_id"], s["head"]) for s in every if s["explainer"] not in ("lookup", "length", "token")}:
        # every pair with a simulated LLM explanation has its confound controls, a look-up pattern or not
        kinds = {s["control_kind"] for s in every if (s["unit_id"], s["head"]) == pair}
        assert {"length", "token"} <= kinds, (pair, kinds)
    heads = json.loads((out / "summary.json").read_text())["simulation"]["heads"]
    assert heads["deterministic"]["lookup"]["ev_correlation"]["real"]["n"] >= len(planted_heads)

def test_sequence_bootstrap_equals_the_metric_on_each_concatenated_resample():
    """The bootstrap computes every resample from per-sequence sums; here each resample is concatenated and
    its metric computed directly (OpenAI's pooled definitions), with the same draws: the same interval to
    float64 round-off, and the same None where the metric is undefined (constant or zero predictions)."""
    import warnings

    import numpy as np

    from sae_lens_ctx.stages.score.simulation import sequence_bootstrap

    direct = {"ev_correlation": lambda t, p: float(np.corrcoef(t, p)[0, 1]),
              "rsquared": lambda t, p: float(1 - np.mean((t - p) ** 2) / np.mean(t ** 2)),
              "absolute_dev_explained": lambda t, p: float(1 - np.mean(np.abs(t - p)) / np.mean(np.abs(t)))}

    def concatenated(true, pred, metric, n, confidence, seed):
        rng = np.random.default_rng(seed)
        values = []
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            for _ in range(n):
                pick = rng.integers(0, len(true), len(true))
                values.append(direct[metric](np.concatenate([true[i] for i in pick]), np.concatenate([pred[i] for i in pick])))
        v = np.asarray(values)
        v = v[np.isfinite(v)]
        if len(v) < n / 2:
            return None, None
        return float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))

    rng = np.random.default_rng(1)
    for case in range(6):
        true = [rng.gamma(0.5, 2, rng.integers(1, 33)) * (case != 4) for _ in range([2, 5, 10, 10, 3, 8][case])]
        pred = [np.full(len(t), 2.0) if case == 3 else np.zeros(len(t)) if case == 5
                else np.clip(t + rng.normal(0, 1, len(t)), 0, 10) for t in true]
        for metric in direct:
            want, got = concatenated(true, pred, metric, 1000, 0.95, 7), sequence_bootstrap(true, pred, metric, 1000, 0.95, 7)
            assert (want[0] is None) == (got[0] is None), (case, metric)
            if want[0] is not None:
                np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
