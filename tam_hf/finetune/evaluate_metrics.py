"""The metrics of a recipe's ``eval.metrics`` that come from the ``evaluate`` library: ``evaluate:NAME[/CONFIG]``
(``evaluate.load(NAME, CONFIG)``; ``evaluate:glue/mrpc`` is the GLUE metric's MRPC configuration; when NAME is
no canonical evaluate metric, ``NAME/CONFIG`` is read as a community metric ``owner/name``) and local metric
scripts (``metrics/my_metric.py``, or a directory ``my_metric/`` holding ``my_metric.py``), computed here.

Which entries these are, and whether they load and fit the task, is settled when the recipe is validated
(:func:`~tam_hf.finetune.config.checks.parse_metric`, :func:`~tam_hf.finetune.config.checks.metric_problems`);
the built-in metrics are :mod:`tam_hf.finetune.metrics`.

Results are keyed by the metric's label (``glue/mrpc``, ``my_metric``), then ``/`` and the key the metric returns
(``glue/mrpc/f1``); a metric returning one value under its own name is keyed by its label alone.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from tam_hf.finetune.config.metric_rules import MetricSpec, load_metric, parse_metric

__all__ = ["evaluate_specs", "scores", "is_metric_key", "text_metrics"]


def evaluate_specs(names: list[str]) -> list[MetricSpec]:
    """The entries of ``names`` computed by evaluate (Hub metrics and metric scripts)."""
    return [s for s in map(parse_metric, names) if s.kind in ("hub", "local")]


def scores(spec: MetricSpec, result: Optional[dict]) -> dict[str, float]:
    """One metric's result keyed as the module docstring says."""
    out = {}
    for key, value in (result or {}).items():
        name = spec.label if len(result) == 1 and key == spec.label.rsplit("/", 1)[-1] else f"{spec.label}/{key}"
        out[name] = float(value) if isinstance(value, (int, float, np.number)) else value
    return out


def is_metric_key(key: str, names: list[str]) -> bool:
    """Whether an evaluation key (without ``eval_``) belongs to one of the recipe's metrics."""
    for spec in map(parse_metric, names):
        if key == spec.label or (spec.kind != "builtin" and key.startswith(spec.label + "/")):
            return True
    return False


def text_metrics(names: list[str], predictions: list[str], references: list[str]) -> dict[str, float]:
    """The evaluate metrics of ``names`` on generated answers (causal LM)."""
    out = {}
    for spec in evaluate_specs(names):
        out.update(scores(spec, load_metric(spec).compute(predictions=predictions, references=references)))
    return out
