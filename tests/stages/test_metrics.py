"""The score stage's statistics through scipy (issue 18, point 5) give the numbers the hand-written
formulas gave. The hand-written versions are kept here, as they were in `stages/score/metrics.py`,
as the independent reference: a per-resample Python loop over `rng.integers(0, n, (R, n))` that drops
the resamples where the statistic is undefined (one class left, a constant side) and needs at least
half of them defined."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from sae_lens_ctx.stages import score


# -- the formulas as they were written by hand (the reference) ------------------------------------


def old_balanced_accuracy(labels, predictions, single_class="skip"):
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


def old_auroc(labels, scores):
    y, s = np.asarray(labels, bool), np.asarray(scores, float)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = stats.rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def old_pearson(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def old_bootstrap_ci(statistic, arrays, n_resamples, confidence, seed):
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


def old_compare_interval(real, control, n_resamples, confidence, seed, paired):
    r, c = np.asarray(real, float), np.asarray(control, float)
    rng = np.random.default_rng(seed)
    if paired:
        d = r - c
        boot = d[rng.integers(0, d.size, size=(n_resamples, d.size))].mean(1)
    else:
        boot = r[rng.integers(0, r.size, (n_resamples, r.size))].mean(1) - \
            c[rng.integers(0, c.size, (n_resamples, c.size))].mean(1)
    tail = (1 - confidence) / 2 * 100
    return tuple(np.percentile(boot, [tail, 100 - tail]))


# -- samples ---------------------------------------------------------------------------------------

RNG = np.random.default_rng(7)
BALANCED = (RNG.random(40) < 0.5, RNG.random(40))  # two classes on (almost) every resample
FEW = (np.array([True, False, True, True, False, True, True, True]), RNG.random(8))  # some one-class resamples


def test_point_values_equal_the_hand_written_formulas():
    for y, s in (BALANCED, FEW):
        p = s > 0.5
        for rule in ("skip", "single-rate"):
            assert score.balanced_accuracy(y, p, rule) == pytest.approx(old_balanced_accuracy(y, p, rule))
        assert score.auroc(y, s) == pytest.approx(old_auroc(y, s))
        assert score.auroc(y, np.round(s, 1)) == pytest.approx(old_auroc(y, np.round(s, 1)))  # ties count ½
        assert score.pearson(s, s ** 2 + y) == pytest.approx(old_pearson(s, s ** 2 + y))
    one_class = np.ones(5, bool)
    assert score.balanced_accuracy(one_class, one_class) is None
    assert score.balanced_accuracy(one_class, one_class, "single-rate") == old_balanced_accuracy(one_class, one_class,
                                                                                                 "single-rate") == 1.0
    assert score.auroc(one_class, np.arange(5.0)) is None and score.pearson([1, 1, 1], [1, 2, 3]) is None


def test_vectorized_statistics_equal_the_scalar_ones_row_by_row():
    y = RNG.random((50, 9)) < 0.5
    s = np.round(RNG.random((50, 9)), 1)
    e, a = score.balanced_accuracy_along(y, s > 0.5), score.auroc_along(y, s)
    r = score.pearson_along(s, s ** 2 + y)
    for i in range(50):
        for got, want in ((e[i], old_balanced_accuracy(y[i], s[i] > 0.5)), (a[i], old_auroc(y[i], s[i])),
                          (r[i], old_pearson(s[i], s[i] ** 2 + y[i]))):
            assert (np.isnan(got) and want is None) or got == pytest.approx(want)


@pytest.mark.parametrize("sample", [BALANCED, FEW], ids=["every-resample-defined", "some-resamples-undefined"])
@pytest.mark.parametrize("confidence, seed", [(0.95, 0), (0.9, 3)])
def test_bootstrap_intervals_are_unchanged(sample, confidence, seed):
    """Where every resample is defined, scipy's own interval; where some are not (FEW: 8 prompts, 2
    negatives), the documented rule (drop them) gives the same numbers as the hand-written loop."""
    y, s = sample
    if sample is BALANCED:  # check the premise: scipy's own interval is used, nothing dropped
        idx = np.random.default_rng(seed).integers(0, len(y), (1000, len(y)))
        assert np.all(y[idx].any(1) & ~y[idx].all(1))
    cases = [((y, s > 0.5), score.balanced_accuracy_along, old_balanced_accuracy),
             ((y, s), score.auroc_along, old_auroc),
             ((s, s ** 2 + y), score.pearson_along, old_pearson)]
    for arrays, new, old in cases:
        got = score.bootstrap_ci(new, arrays, 1000, confidence, seed)
        assert got == pytest.approx(old_bootstrap_ci(old, arrays, 1000, confidence, seed), abs=1e-12)


def test_bootstrap_with_too_few_defined_resamples_gives_no_interval():
    y = np.array([True, False])  # two prompts: half the resamples (on average) hold one class only
    p = y.copy()
    idx = np.random.default_rng(0).integers(0, 2, (500, 2))
    assert (idx[:, 0] == idx[:, 1]).sum() > 250  # the premise: fewer than half defined with this seed
    assert old_bootstrap_ci(old_balanced_accuracy, (y, p), 500, 0.95, 0) == (None, None)
    assert score.bootstrap_ci(score.balanced_accuracy_along, (y, p), 500, 0.95, 0) == (None, None)
    assert score.bootstrap_ci(score.auroc_along, ([True], [0.3]), 500, 0.95, 0) == (None, None)


@pytest.mark.parametrize("paired", [True, False])
def test_comparison_intervals_are_unchanged(paired):
    real, control = RNG.random(12) + 0.2, RNG.random(12)
    got = score.compare(list(real), list(control), 1000, 0.95, seed=5, paired=paired)
    want = old_compare_interval(real, control, 1000, 0.95, 5, paired)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx(want, abs=1e-12)
