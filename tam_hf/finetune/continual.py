"""The continual-learning numbers of a staged run, from the matrix of its evaluations (no torch, no run code).

``a[i][j]`` is the metric on stage j's eval set after training stage i (0-based, T stages). Following Lopez-Paz &
Ranzato (2017, GEM) and Chaudhry et al. (2018, RWalk):

* final average   = mean over j of a[T-1][j]: the final model on every stage's eval set;
* forgetting      = mean over j < T-1 of (best_{j <= i < T-1} a[i][j] - a[T-1][j]): how far each earlier stage
  fell from its best value before the last stage;
* backward transfer = mean over j < T-1 of (a[T-1][j] - a[j][j]): what training on the later stages did to each
  earlier stage, measured from the moment that stage was learnt.

Signs are fixed so that they read the same for every metric: **positive forgetting is worse** and **positive
backward transfer is better**. For a metric where lower is better (a loss, perplexity) "best" is the minimum and
both differences are negated. With one stage forgetting and backward transfer are None (there is no earlier stage),
and so is any number whose inputs include a missing value.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

__all__ = ["LOWER_IS_BETTER", "higher_is_better", "continual_metrics", "mean_metrics"]

LOWER_IS_BETTER = ("loss", "perplexity")  # every other built-in metric (accuracy, f1, mcc, ...) is higher-is-better


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mean(values: list) -> Optional[float]:
    return sum(values) / len(values) if values and all(_number(v) for v in values) else None


def continual_metrics(a: Sequence[Sequence[Optional[float]]], higher_better: bool) -> dict[str, Optional[float]]:
    """{final_average, forgetting, backward_transfer} of the T x T matrix ``a`` (rows: after stage i, columns:
    stage j's eval set)."""
    t = len(a)
    if t == 0 or any(len(row) != t for row in a):
        raise ValueError(f"expected a square matrix of evaluations, one row and one column per stage, got {a!r}")
    sign, best = (1.0, max) if higher_better else (-1.0, min)
    last = a[-1]
    earlier = range(t - 1)
    forgetting = backward = None
    if t > 1 and all(_number(a[i][j]) for j in earlier for i in range(j, t)):
        forgetting = _mean([sign * (best(a[i][j] for i in range(j, t - 1)) - last[j]) for j in earlier])
        backward = _mean([sign * (last[j] - a[j][j]) for j in earlier])
    return {"final_average": _mean(list(last)), "forgetting": forgetting, "backward_transfer": backward}


def mean_metrics(evaluations: list[dict]) -> dict[str, Optional[float]]:
    """Each metric's mean over ``evaluations`` (one {metric: value} per stage), for the metrics every stage has;
    None where a stage's value is missing or not finite."""
    if not evaluations:
        return {}
    keys = [k for k in evaluations[0] if all(k in e for e in evaluations)]
    return {k: _mean([e[k] for e in evaluations]) for k in keys}
