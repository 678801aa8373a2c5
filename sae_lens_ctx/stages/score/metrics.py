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
from ...core.rules import ROUND_OFF
from ...core.records import ScoreRecord
from .judge import Judgement

log = logging.getLogger(__name__)


def balanced_accuracy_along(labels: np.ndarray, predictions: np.ndarray, single_class: str = "skip",
                            axis: int = -1) -> np.ndarray:
    """E = ½(TPR + TNR) along `axis` of boolean arrays of one shape (`[..., n]` → `[...]`), vectorized over
    the other axes (bootstrap resamples): NaN where it is undefined. With one class only: NaN ('skip',
    round 2) or the one rate there is ('single-rate', round 1), as scikit-learn's `balanced_accuracy_score`
    averages the recalls of the classes present (paper-method §5.3)."""
    y = np.moveaxis(np.asarray(labels, bool), axis, -1)
    p = np.moveaxis(np.asarray(predictions, bool), axis, -1)
    n_pos, n_neg = y.sum(-1), (~y).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.where(n_pos > 0, (p & y).sum(-1) / n_pos, np.nan)
        tnr = np.where(n_neg > 0, (~p & ~y).sum(-1) / n_neg, np.nan)
    both = (tpr + tnr) / 2
    if single_class == "skip":
        return both
    return np.where(np.isnan(tpr), tnr, np.where(np.isnan(tnr), tpr, both))


def balanced_accuracy(labels: Sequence[bool], predictions: Sequence[bool], single_class: str = "skip") -> float | None:
    """E = ½(TPR + TNR) (paper-method §5.3; `balanced_accuracy_along` on one sample). With one class
    only: None ('skip', round 2) or the one rate there is ('single-rate', round 1). None for no examples."""
    y, p = np.asarray(labels, bool), np.asarray(predictions, bool)
    if y.size == 0:
        return None
    return _defined(balanced_accuracy_along(y, p, single_class))


def auroc_along(labels: np.ndarray, scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUROC along `axis` (`[..., n]` → `[...]`), vectorized over the other axes: the Mann-Whitney U of the
    positives from `scipy.stats.rankdata`'s average ranks (ties count ½), over n₊·n₋; NaN with one class."""
    y = np.moveaxis(np.asarray(labels, bool), axis, -1)
    ranks = stats.rankdata(np.moveaxis(np.asarray(scores, float), axis, -1), axis=-1)
    n_pos, n_neg = y.sum(-1), (~y).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        u = (ranks * y).sum(-1) - n_pos * (n_pos + 1) / 2
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def auroc(labels: Sequence[bool], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties counting ½:
    `scipy.stats.mannwhitneyu`'s U of the positives over n₊·n₋. None with one class."""
    y, s = np.asarray(labels, bool), np.asarray(scores, float)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    return float(stats.mannwhitneyu(s[y], s[~y]).statistic / (n_pos * n_neg))


def pearson_along(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pearson's r along `axis` (`scipy.stats.pearsonr`, vectorized over the other axes); NaN where
    either side is constant."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return np.asarray(stats.pearsonr(x, y, axis=axis).statistic, float)


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's r (`scipy.stats.pearsonr`); None with fewer than two values or a constant side."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return _defined(pearson_along(x, y))


def _defined(value: Any) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def bootstrap_ci(statistic: Callable[..., np.ndarray], arrays: Sequence[Sequence], n_resamples: int,
                 confidence: float, seed: int, paired: bool = True) -> tuple[float | None, float | None]:
    """Percentile bootstrap over items: `scipy.stats.bootstrap` with `paired=True` (the arrays are
    resampled together; `paired=False`: each on its own), `vectorized=True` and
    `rng=np.random.default_rng(seed)`.

    `statistic(*arrays, axis=-1)` is vectorized over resamples (`balanced_accuracy_along`, `auroc_along`,
    `pearson_along`) and NaN where it is undefined (one class left, a constant side). Undefined
    resamples: scipy's percentile interval is NaN as soon as one resample is (with a
    `DegenerateDataWarning`); here, as before this used scipy, they are dropped and the interval is the
    same percentiles of the defined ones (`scipy.stats.quantile`, 'linear', = `np.percentile`'s
    default); fewer than half defined gives (None, None). Where every resample is defined this is
    scipy's interval unchanged; the resamples themselves are the ones the hand-written loop drew
    (`rng.integers(0, n, (n_resamples, n))`), so the numbers are the same as before. (None, None) for
    fewer than two items."""
    columns = [np.asarray(a) for a in arrays]
    if len(columns[0]) < 2:
        return None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap(columns, statistic, n_resamples=n_resamples, confidence_level=confidence,
                              method="percentile", paired=paired, vectorized=True, rng=np.random.default_rng(seed))
    low, high = res.confidence_interval
    if np.isfinite(low) and np.isfinite(high):
        return float(low), float(high)
    values = res.bootstrap_distribution[np.isfinite(res.bootstrap_distribution)]
    if values.size < n_resamples / 2:
        return None, None
    tail = (1 - confidence) / 2
    low, high = stats.quantile(values, [tail, 1 - tail])
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


def _mean_along(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def _difference_of_means(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def compare(real: Sequence[float], control: Sequence[float], n_resamples: int, confidence: float, seed: int,
            paired: bool = False) -> dict[str, Any]:
    """real − control: the difference of means, its bootstrap CI, and a one-sided test that real is
    higher (Wilcoxon signed-rank when paired, Mann-Whitney U otherwise). The interval: `scipy.stats.bootstrap`
    (percentile) of the mean of the paired differences, or of the difference of the two means with each
    side resampled on its own (unpaired). `distinguishable` is True only
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
    ci = None
    if paired:
        if r.size > 1:
            ci = bootstrap_ci(_mean_along, (r - c,), n_resamples, confidence, seed)
        if np.any(r != c):
            out.update(test="wilcoxon signed-rank, one-sided",
                       pvalue=float(stats.wilcoxon(r, c, alternative="greater").pvalue))
    else:
        if r.size > 1 and c.size > 1:
            ci = bootstrap_ci(_difference_of_means, (r, c), n_resamples, confidence, seed, paired=False)
        out.update(test="mann-whitney U, one-sided",
                   pvalue=float(stats.mannwhitneyu(r, c, alternative="greater").pvalue))
    if ci is not None:
        out.update(ci_low=ci[0], ci_high=ci[1])
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
    D'Agostino's skewtest with the one-sided alternative 'greater' (paper-method §5.3, §7.1).

    As the authors' `7_results` notebook (f97f993): `std` is `np.std` (ddof=0, the population std they
    print; `std_ddof1` is the sample std beside it), and the share counts E at or above the threshold up
    to float round-off (`core.rules.ROUND_OFF`), as their red bins (the last three of
    `np.linspace(0, 1, 10)`, E >= 6/9) hold E = 2/3."""
    v = np.asarray([x for x in values if x is not None], float)
    # 0.1-wide bins [0, 0.1), ..., [0.9, 1.0]; the tiny offset keeps 0.7 out of the 0.6 bin (float edges)
    counts = np.bincount(np.clip((v * 10 + 1e-9).astype(int), 0, 9), minlength=10)
    edges = np.linspace(0.0, 1.0, 11)
    out: dict[str, Any] = {"n": int(v.size), "mean": float(v.mean()) if v.size else None,
                           "std": float(v.std(ddof=0)) if v.size else None,
                           "std_ddof1": float(v.std(ddof=1)) if v.size > 1 else None,
                           "histogram": {"edges": [round(e, 2) for e in edges], "counts": counts.tolist()},
                           "well_explained_threshold": well_explained,
                           "well_explained_fraction":
                               float((v >= well_explained - ROUND_OFF).mean()) if v.size else None,
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

    def e_stat(labels, answers, axis=-1):
        return balanced_accuracy_along(labels, answers, single, axis=axis)

    answers = np.array([j.answer for j in scored], bool)
    e = balanced_accuracy(y, answers, single)
    lo, hi = bootstrap_ci(e_stat, (y, answers), cfg.bootstrap_resamples, cfg.confidence, seed) if e is not None \
        else (None, None)
    reason = None if e is not None else ("no parsed judgements" if not scored else "one class only")
    out.append(ScoreRecord(scorer=f"{scorer_prefix}E", value=e, ci_low=lo, ci_high=hi, skipped=reason, **base))
    with_p = [j for j in scored if j.p_yes is not None]
    yp = np.array([j.label for j in with_p], bool)
    pp = np.array([j.p_yes for j in with_p], float)
    a = auroc(yp, pp) if with_p else None
    lo, hi = bootstrap_ci(auroc_along, (yp, pp), cfg.bootstrap_resamples, cfg.confidence, seed) if a is not None \
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
    lo, hi = bootstrap_ci(pearson_along, (np.array(true), np.array(sim)), cfg.bootstrap_resamples, cfg.confidence,
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
