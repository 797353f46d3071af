"""The statistics of the compare report: a 95% confidence interval of a mean over seeds, and the difference of
two arms paired by seed.

Seeds are the unit: every arm trains each seed from the same initial weights and data order, so two arms' runs
of one seed are a pair, and the difference of the pair removes what the seed alone decides. Intervals are
Student t with n - 1 degrees of freedom (n seeds: few, so the normal 1.96 would be too narrow); the paired
test is scipy's ``ttest_rel`` (two-sided). Fewer than two values give no interval and no test (NaN).
"""

from __future__ import annotations

import math
import warnings

__all__ = ["LEVEL", "mean_ci", "paired"]

LEVEL = 0.95


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the LEVEL confidence interval of the mean; NaN bounds with fewer than two values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    from scipy import stats

    sem = float(stats.sem(values))
    if sem == 0.0:  # every seed gave the same value: scipy would answer NaN for a zero-width interval
        return mean, mean, mean
    low, high = stats.t.interval(LEVEL, n - 1, loc=mean, scale=sem)
    return mean, float(low), float(high)


def paired(values: dict[int, float], base: dict[int, float]) -> dict[str, float]:
    """The difference ``values - base`` over the seeds both have (seed -> value): ``delta_n`` pairs, ``delta`` the
    mean difference, ``delta_se`` its standard error, ``delta_low`` / ``delta_high`` its LEVEL interval, and
    ``p_value`` of the paired t-test (NaN below two pairs, or when every pair differs by the same amount)."""
    seeds = sorted(set(values) & set(base))
    out = dict(delta_n=len(seeds), delta=math.nan, delta_se=math.nan, delta_low=math.nan, delta_high=math.nan,
               p_value=math.nan)
    if not seeds:
        return out
    differences = [values[s] - base[s] for s in seeds]
    out["delta"], out["delta_low"], out["delta_high"] = mean_ci(differences)
    if len(seeds) > 1:
        from scipy import stats

        out["delta_se"] = float(stats.sem(differences))
        with warnings.catch_warnings():  # identical differences: scipy warns and answers NaN, which we keep
            warnings.simplefilter("ignore", RuntimeWarning)
            out["p_value"] = float(stats.ttest_rel([values[s] for s in seeds], [base[s] for s in seeds]).pvalue)
    return out
