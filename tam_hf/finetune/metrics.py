"""The built-in evaluation metrics (``METRIC_TASKS`` of the recipe schema names them) and the Trainer's
``compute_metrics`` for classification (:func:`classification_metrics`, which adds a recipe's ``evaluate:``
metrics from :mod:`tam_hf.finetune.evaluate_metrics`).

Classification and correlation metrics are scikit-learn's and scipy's, with the definitions GLUE's evaluation
uses: accuracy (MNLI, SST-2, ...), F1 binary on class 1 for a two-class task
(MRPC, QQP) and macro-averaged over the classes present otherwise, Matthews correlation (CoLA), Pearson and
Spearman correlation (STS-B). Perplexity and exact match are a few lines of their own. Everything works
offline (``evaluate.load`` fetches its metric scripts from the Hub).

Degenerate evaluation sets get defined numbers, never NaN (which is not JSON) and never a warning:

* no rows: every metric is 0.0;
* F1 of a class never predicted and never present, MCC with constant predictions or a single class: 0.0
  (scikit-learn's ``zero_division=0`` convention, what GLUE's scripts report, here without the warning);
* Pearson/Spearman with a constant (or non-finite) side, or fewer than two rows: 0.0, no measurable
  correlation (scipy returns NaN with a ``ConstantInputWarning``);
* perplexity of a loss whose exponential is beyond float range: None (``null`` in summary.json).
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
from scipy import stats
from sklearn import metrics as sk

__all__ = ["accuracy", "f1", "mcc", "pearson", "spearman", "perplexity", "exact_match", "classification_metrics",
           "METRICS"]


def _classes(values) -> np.ndarray:
    return np.asarray(values).ravel().astype(np.int64)


def accuracy(pred, label) -> float:
    pred, label = _classes(pred), _classes(label)
    return float(sk.accuracy_score(label, pred)) if label.size else 0.0


def f1(pred, label, num_classes: int | None = None) -> float:
    """Binary F1 of class 1 for a two-class task, else the macro average over the classes that occur in
    ``label`` or ``pred``. ``num_classes``: the task's number of classes (the classifier's outputs); unset, a
    task is two-class when only 0 and 1 occur."""
    pred, label = _classes(pred), _classes(label)
    if not label.size:
        return 0.0
    binary = num_classes == 2 if num_classes is not None else set(np.union1d(pred, label)) <= {0, 1}
    return float(sk.f1_score(label, pred, average="binary" if binary else "macro", zero_division=0.0))


def mcc(pred, label) -> float:
    """Matthews correlation (multiclass: Gorodkin's form, as scikit-learn)."""
    pred, label = _classes(pred), _classes(label)
    if np.union1d(pred, label).size < 2:  # no rows, or one class only: 0, as scikit-learn (which warns)
        return 0.0
    with warnings.catch_warnings():  # constant predictions: 0/0, defined as 0
        warnings.simplefilter("ignore", RuntimeWarning)
        return _finite(sk.matthews_corrcoef(label, pred))


def _correlation(test, pred, label) -> float:
    x, y = np.asarray(pred, dtype=float).ravel(), np.asarray(label, dtype=float).ravel()
    if x.size < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()) or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    with warnings.catch_warnings():  # nearly constant: scipy warns that the value may be inaccurate
        warnings.simplefilter("ignore", stats.NearConstantInputWarning)
        return _finite(test(x, y).statistic)


def pearson(pred, label) -> float:
    return _correlation(stats.pearsonr, pred, label)


def spearman(pred, label) -> float:
    return _correlation(stats.spearmanr, pred, label)


def _finite(value) -> float:
    value = float(value)
    return value if math.isfinite(value) else 0.0


def perplexity(loss: float) -> float | None:
    """exp(loss); None when that is no finite number (a loss beyond ~709, or a non-finite loss): JSON has no
    Infinity, and a capped value would read as a measurement."""
    try:
        value = math.exp(loss)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


def exact_match(predictions: list[str], references: list[str], answer_pattern: str | None = None) -> float:
    r"""Share of generated answers equal to the reference after trimming, lower-casing and collapsing spaces.

    With ``answer_pattern`` (a regex whose first group is the answer, e.g. GSM8K's ``####\s*(-?[\d,.]+)``) the
    answers are extracted from both first; a prediction without one is wrong. Commas in numbers are dropped."""
    if not references:
        return 0.0
    if answer_pattern is None:
        return sum(_normalise(p) == _normalise(r) for p, r in zip(predictions, references)) / len(references)
    pattern = re.compile(answer_pattern)

    def answer(text: str):
        found = pattern.search(text)
        return None if found is None else _normalise(found.group(1)).replace(",", "").rstrip(".")

    return sum(answer(p) is not None and answer(p) == answer(r) for p, r in zip(predictions, references)) / len(references)


# Metrics computed from (predictions, labels) of a classification eval; perplexity/exact_match are causal-LM.
# The names, and which task each fits, are the recipe schema's METRIC_TASKS.
METRICS = {"accuracy": accuracy, "f1": f1, "mcc": mcc, "pearson": pearson, "spearman": spearman}


def classification_metrics(names: list[str], regression: bool):
    """The Trainer's ``compute_metrics`` for a classification eval: the built-in metrics of ``names`` and its
    evaluate metrics (:mod:`tam_hf.finetune.evaluate_metrics`), from the argmax class ids (the single output for
    a regression score) and the labels. F1 is binary when the classifier has two outputs."""
    from tam_hf.finetune.config.metric_rules import load_metric
    from tam_hf.finetune.evaluate_metrics import evaluate_specs, scores

    modules = [(spec, load_metric(spec)) for spec in evaluate_specs(names)]

    def compute(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        logits = np.asarray(logits[0] if isinstance(logits, tuple) else logits)
        if regression:
            pred = logits.reshape(len(logits), -1)[:, 0]
        else:
            pred = logits.argmax(-1)
        out = {}
        for name in names:
            if name == "f1" and not regression:
                out[name] = f1(pred, labels, num_classes=logits.shape[-1])
            elif name in METRICS:
                out[name] = METRICS[name](pred, labels)
        for spec, module in modules:
            out.update(scores(spec, module.compute(predictions=pred.tolist(), references=np.asarray(labels).tolist())))
        return out

    return compute
