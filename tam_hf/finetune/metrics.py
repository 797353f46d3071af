"""Evaluation metrics in plain numpy: they must work offline, where `evaluate.load(...)` cannot reach the Hub.

Definitions follow scikit-learn / scipy (F1 binary on label 1, macro otherwise; multiclass MCC from the
confusion matrix; Spearman = Pearson of average ranks).
"""

from __future__ import annotations

import math
import re

import numpy as np

__all__ = ["accuracy", "f1", "mcc", "pearson", "spearman", "perplexity", "exact_match", "classification_metrics",
           "METRICS"]


def accuracy(pred, label) -> float:
    pred, label = np.asarray(pred), np.asarray(label)
    return float((pred == label).mean()) if label.size else 0.0


def _confusion(pred, label, n: int) -> np.ndarray:
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (np.asarray(label, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return matrix


def f1(pred, label) -> float:
    """Binary F1 of class 1 when only labels 0/1 occur; macro-average F1 otherwise."""
    pred, label = np.asarray(pred, dtype=np.int64), np.asarray(label, dtype=np.int64)
    n = int(max(pred.max(initial=0), label.max(initial=0))) + 1
    m = _confusion(pred, label, max(n, 2))
    tp = np.diag(m).astype(float)
    precision_den, recall_den = m.sum(axis=0), m.sum(axis=1)
    den = precision_den + recall_den
    scores = np.divide(2 * tp, den, out=np.zeros_like(tp), where=den > 0)
    return float(scores[1]) if m.shape[0] == 2 else float(scores.mean())


def mcc(pred, label) -> float:
    """Matthews correlation (Gorodkin's multiclass form; the usual formula for two classes)."""
    pred, label = np.asarray(pred, dtype=np.int64), np.asarray(label, dtype=np.int64)
    n = int(max(pred.max(initial=0), label.max(initial=0))) + 1
    m = _confusion(pred, label, n).astype(float)
    t, p, c, s = m.sum(axis=1), m.sum(axis=0), np.trace(m), m.sum()
    den = math.sqrt(s * s - p @ p) * math.sqrt(s * s - t @ t)
    return float((c * s - t @ p) / den) if den else 0.0


def pearson(pred, label) -> float:
    x, y = np.asarray(pred, dtype=float).ravel(), np.asarray(label, dtype=float).ravel()
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt((x @ x) * (y @ y))
    return float(x @ y / den) if den else 0.0


def _ranks(x) -> np.ndarray:
    x = np.asarray(x, dtype=float).ravel()
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):  # ties share their average rank
        tie = x == value
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(pred, label) -> float:
    return pearson(_ranks(pred), _ranks(label))


def perplexity(loss: float) -> float:
    return float(math.exp(loss)) if loss < 700 else float("inf")


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


def exact_match(predictions: list[str], references: list[str], answer_pattern: str | None = None) -> float:
    """Share of generated answers equal to the reference after trimming, lower-casing and collapsing spaces.

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
METRICS = {"accuracy": accuracy, "f1": f1, "mcc": mcc, "pearson": pearson, "spearman": spearman}


def classification_metrics(names: list[str], regression: bool):
    """A Trainer `compute_metrics` callable computing `names` from logits."""

    def compute(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        pred = np.asarray(logits).squeeze(-1) if regression else np.asarray(logits).argmax(-1)
        return {name: METRICS[name](pred, labels) for name in names if name in METRICS}

    return compute
