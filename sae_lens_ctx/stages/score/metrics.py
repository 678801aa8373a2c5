"""Metrics as pure functions of labels and judge outputs: balanced accuracy E (the paper's score), AUROC,
Pearson, bootstrap intervals, comparisons with controls, and the per-group `ScoreRecord`s."""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats

from ...clients.neuron_explainer import neuron_explainer_imports
from ...core.config import ScoreConfig
from ...core.records import ScoreRecord
from .judge import Judgement

log = logging.getLogger(__name__)


def balanced_accuracy(labels: Sequence[bool], predictions: Sequence[bool], single_class: str = "skip") -> float | None:
    """E = ½(TPR + TNR) (paper-method §5.3). With one class only: None ('skip', round 2) or the one
    rate there is ('single-rate', round 1). None for no examples."""
    y, p = np.asarray(labels, bool), np.asarray(predictions, bool)
    if y.size == 0:
        return None
    rates = []
    if y.any():
        rates.append(float((p & y).sum() / y.sum()))
    if (~y).any():
        rates.append(float((~p & ~y).sum() / (~y).sum()))
    if len(rates) == 1 and single_class == "skip":
        return None
    return sum(rates) / len(rates)


def auroc(labels: Sequence[bool], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties counting ½
    (the Mann-Whitney U over n₊·n₋). None with one class."""
    y, s = np.asarray(labels, bool), np.asarray(scores, float)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = stats.rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def bootstrap_ci(statistic: Callable[..., float | None], arrays: Sequence[Sequence], n_resamples: int,
                 confidence: float, seed: int) -> tuple[float | None, float | None]:
    """Percentile bootstrap over items (the arrays are resampled together). Resamples on which the
    statistic is undefined (one class left) are dropped; fewer than half defined gives (None, None)."""
    columns = [np.asarray(a) for a in arrays]
    n = len(columns[0])
    if n < 2:
        return None, None
    rng = np.random.default_rng(seed)
    values = []
    for idx in rng.integers(0, n, size=(n_resamples, n)):
        v = statistic(*(c[idx] for c in columns))
        if v is not None and np.isfinite(v):
            values.append(v)
    if len(values) < n_resamples / 2:
        return None, None
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def aggregate(values: Sequence[float], n_resamples: int, confidence: float, seed: int) -> dict[str, Any]:
    """Mean, std and a bootstrap CI of the mean over items (scipy.stats.bootstrap, percentile)."""
    v = np.asarray([x for x in values if x is not None], float)
    out: dict[str, Any] = {"n": int(v.size), "mean": None, "std": None, "ci_low": None, "ci_high": None}
    if v.size == 0:
        return out
    out.update(mean=float(v.mean()), std=float(v.std(ddof=1)) if v.size > 1 else 0.0)
    if v.size > 1 and np.ptp(v) > 0:
        ci = stats.bootstrap((v,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                             method="percentile", random_state=np.random.default_rng(seed)).confidence_interval
        out.update(ci_low=float(ci.low), ci_high=float(ci.high))
    elif v.size > 1:
        out.update(ci_low=float(v[0]), ci_high=float(v[0]))
    return out


def compare(real: Sequence[float], control: Sequence[float], n_resamples: int, confidence: float, seed: int,
            paired: bool = False) -> dict[str, Any]:
    """real − control: the difference of means, its bootstrap CI, and a one-sided test that real is
    higher (Wilcoxon signed-rank when paired, Mann-Whitney U otherwise). `distinguishable` is True only
    when the whole interval lies above 0; the `verdict` says it in words."""
    r = np.asarray([x for x in real if x is not None], float)
    c = np.asarray([x for x in control if x is not None], float)
    out: dict[str, Any] = {"n_real": int(r.size), "n_control": int(c.size), "difference": None,
                           "ci_low": None, "ci_high": None, "pvalue": None, "test": None}
    if paired and len(real) != len(control):
        raise ValueError("paired comparison needs equally long sequences")
    if paired:
        both = [(a, b) for a, b in zip(real, control) if a is not None and b is not None]
        r, c = np.asarray([a for a, _ in both], float), np.asarray([b for _, b in both], float)
        out.update(n_real=len(both), n_control=len(both))
    if r.size == 0 or c.size == 0:
        out.update(distinguishable=False, verdict="cannot compare: no scores on one side")
        return out
    out["difference"] = float(r.mean() - c.mean())
    rng = np.random.default_rng(seed)
    boot = None
    if paired:
        d = r - c
        if r.size > 1:
            idx = rng.integers(0, d.size, size=(n_resamples, d.size))
            boot = d[idx].mean(1)
        if np.any(d != 0):
            out.update(test="wilcoxon signed-rank, one-sided",
                       pvalue=float(stats.wilcoxon(r, c, alternative="greater").pvalue))
    else:
        if r.size > 1 and c.size > 1:
            boot = r[rng.integers(0, r.size, (n_resamples, r.size))].mean(1) - \
                c[rng.integers(0, c.size, (n_resamples, c.size))].mean(1)
        out.update(test="mann-whitney U, one-sided",
                   pvalue=float(stats.mannwhitneyu(r, c, alternative="greater").pvalue))
    if boot is not None:
        tail = (1 - confidence) / 2 * 100
        lo, hi = np.percentile(boot, [tail, 100 - tail])
        out.update(ci_low=float(lo), ci_high=float(hi))
    out["distinguishable"] = bool(out["ci_low"] is not None and out["ci_low"] > 0)
    if out["ci_low"] is None:
        out["verdict"] = "too few scores for an interval: real and control cannot be told apart"
    elif out["distinguishable"]:
        out["verdict"] = "real scores above control"
    else:
        out["verdict"] = "real and control cannot be told apart (the interval of the difference holds 0)"
    return out


def paper_statistics(values: Sequence[float], well_explained: float) -> dict[str, Any]:
    """mean ± std, the histogram in 0.1 bins, the share at or above `well_explained`, the skew and
    D'Agostino's skewtest with the one-sided alternative 'greater' (paper-method §5.3, §7.1)."""
    v = np.asarray([x for x in values if x is not None], float)
    # 0.1-wide bins [0, 0.1), ..., [0.9, 1.0]; the tiny offset keeps 0.7 out of the 0.6 bin (float edges)
    counts = np.bincount(np.clip((v * 10 + 1e-9).astype(int), 0, 9), minlength=10)
    edges = np.linspace(0.0, 1.0, 11)
    out: dict[str, Any] = {"n": int(v.size), "mean": float(v.mean()) if v.size else None,
                           "std": float(v.std(ddof=1)) if v.size > 1 else None,
                           "histogram": {"edges": [round(e, 2) for e in edges], "counts": counts.tolist()},
                           "well_explained_threshold": well_explained,
                           "well_explained_fraction": float((v >= well_explained).mean()) if v.size else None,
                           "skew": None, "skewtest_pvalue": None}
    if v.size > 2 and np.ptp(v) > 0:
        out["skew"] = float(stats.skew(v))
    if v.size >= 8 and np.ptp(v) > 0:  # the test's own minimum
        out["skewtest_pvalue"] = float(stats.skewtest(v, alternative="greater").pvalue)
    else:
        out["skewtest_note"] = "skewtest needs at least 8 distinct-valued scores"
    return out


def _counts(js: Sequence[Judgement]) -> dict[str, int]:
    c = Counter(j.status for j in js)
    return {"n_parsed": c["ok"], "n_unparsed": c["unparsed"], "n_failed": c["failed"]}


def score_group(js: Sequence[Judgement], unit_id: str, head: str | None, scorer_prefix: str, control: bool,
                cfg: ScoreConfig, seed: int) -> list[ScoreRecord]:
    """E and AUROC of one group of judgements (one pair, or one unit), with bootstrap CIs over prompts."""
    counts = _counts(js)
    scored = [j for j in js if j.status == "ok" and j.label is not None]
    y = np.array([j.label for j in scored], bool)
    base = dict(unit_id=unit_id, head=head, control=control, n=len(scored), n_positive=int(y.sum()),
                n_negative=int((~y).sum()), **counts)
    out = []
    single = cfg.single_class

    def e_stat(labels, answers):
        return balanced_accuracy(labels, answers, single)

    answers = np.array([j.answer for j in scored], bool)
    e = e_stat(y, answers)
    lo, hi = bootstrap_ci(e_stat, (y, answers), cfg.bootstrap_resamples, cfg.confidence, seed) if e is not None \
        else (None, None)
    reason = None if e is not None else ("no parsed judgements" if not scored else "one class only")
    out.append(ScoreRecord(scorer=f"{scorer_prefix}E", value=e, ci_low=lo, ci_high=hi, skipped=reason, **base))
    with_p = [j for j in scored if j.p_yes is not None]
    yp = np.array([j.label for j in with_p], bool)
    pp = np.array([j.p_yes for j in with_p], float)
    a = auroc(yp, pp) if with_p else None
    lo, hi = bootstrap_ci(auroc, (yp, pp), cfg.bootstrap_resamples, cfg.confidence, seed) if a is not None \
        else (None, None)
    reason = None if a is not None else ("no parsed judgements" if not scored else
                                         "no logprobs from the judge" if not with_p else "one class only")
    out.append(ScoreRecord(scorer=f"{scorer_prefix}auroc", value=a, ci_low=lo, ci_high=hi, skipped=reason,
                           **{**base, "n": len(with_p)}))
    return out


def simulation_score(js: Sequence[Judgement], unit_id: str, control: bool, cfg: ScoreConfig,
                     seed: int) -> ScoreRecord:
    """neuron-explainer's simulate-and-score correlation on the unit's held-out prompts (see module doc)."""
    usable = [j for j in js if j.status == "ok"]
    counts = _counts(js)
    sim = [10.0 * (j.p_yes if j.p_yes is not None else float(j.answer)) for j in usable]
    true = [j.activation for j in usable]
    value = simulate_and_score_correlation(true, sim) if len(usable) > 1 else None
    lo, hi = bootstrap_ci(pearson, (np.array(true), np.array(sim)), cfg.bootstrap_resamples, cfg.confidence,
                          seed) if value is not None else (None, None)
    reason = None if value is not None else "fewer than two judged prompts, or constant values"
    return ScoreRecord(unit_id=unit_id, head=None, scorer="unit_sim_correlation", value=value, ci_low=lo,
                       ci_high=hi, n=len(usable), control=control, skipped=reason, **counts)


def simulate_and_score_correlation(true: Sequence[float], simulated: Sequence[float]) -> float | None:
    """neuron-explainer's `simulate_and_score` on one-token records (one per prompt), with a simulator
    that returns the judge's simulated activations: its `ev_correlation_score`, the correlation pooled
    over every record."""
    with neuron_explainer_imports():
        from neuron_explainer.activations.activations import ActivationRecord
        from neuron_explainer.explanations.explanations import ActivationScale, SequenceSimulation
        from neuron_explainer.explanations.scoring import simulate_and_score
        from neuron_explainer.explanations.simulator import NeuronSimulator

    class PrecomputedSimulator(NeuronSimulator):
        """Returns the judge's answers computed beforehand (a record's one token is its index)."""

        async def simulate(self, tokens: Sequence[str]) -> SequenceSimulation:
            value = simulated[int(tokens[0])]
            return SequenceSimulation(tokens=list(tokens), expected_activations=[value],
                                      activation_scale=ActivationScale.SIMULATED_NORMALIZED_ACTIVATIONS,
                                      distribution_values=[], distribution_probabilities=[])

    records = [ActivationRecord(tokens=[str(i)], activations=[float(a)]) for i, a in enumerate(true)]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # per-record correlations of one value are NaN, by design
        scored = asyncio.run(simulate_and_score(PrecomputedSimulator(), records))
    value = scored.ev_correlation_score
    return None if value is None or not np.isfinite(value) else float(value)
