"""Offline metrics: hand-checked values, and agreement with scikit-learn / scipy where those are installed."""

import math

import numpy as np
import pytest
from transformers import EvalPrediction

from tam_hf.finetune.metrics import (accuracy, classification_metrics, exact_match, f1, mcc, pearson, perplexity,
                            spearman)


def test_hand_checked_values():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert f1([1, 0, 1, 1], [1, 1, 1, 0]) == pytest.approx(2 / 3)  # tp 2, fp 1, fn 1
    assert mcc([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0) and mcc([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert mcc([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0  # constant prediction: defined as 0
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)  # monotone, not linear
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert exact_match([" 12", "Paris ", "no"], ["12", "paris", "yes"]) == pytest.approx(2 / 3)


def test_exact_match_with_an_answer_pattern_compares_extracted_answers():
    gsm8k = r"####\s*(-?[\d,.]+)"
    references = ["She pays 3 * 4 = 12.\n#### 1,200", "Half of 10 is 5.\n#### 5", "#### -3"]
    predictions = ["3 * 4 = 12, times 100\n#### 1200\nQuestion: next", "so the answer is 5", "#### -3."]
    # 1,200 == 1200 (commas dropped, trailing full stop too); no '####' in the second prediction: wrong
    assert exact_match(predictions, references, gsm8k) == pytest.approx(2 / 3)
    assert exact_match(predictions, references) == 0.0  # without the pattern whole texts are compared


def test_agrees_with_sklearn_and_scipy():
    sk = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n_classes in (2, 4):
        label, pred = rng.integers(0, n_classes, 200), rng.integers(0, n_classes, 200)
        pred[:80] = label[:80]
        average = "binary" if n_classes == 2 else "macro"
        assert f1(pred, label) == pytest.approx(sk.f1_score(label, pred, average=average))
        assert mcc(pred, label) == pytest.approx(sk.matthews_corrcoef(label, pred))
    x = rng.normal(size=100)
    y = x + rng.normal(size=100)
    y[::7] = y[0]  # ties
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])


def test_compute_metrics_from_logits():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    out = classification_metrics(["accuracy", "f1", "mcc"], regression=False)(EvalPrediction(logits, np.array([0, 1, 1, 1])))
    assert out == pytest.approx({"accuracy": 0.75, "f1": 0.8, "mcc": mcc([0, 1, 0, 1], [0, 1, 1, 1])})
    scores = classification_metrics(["pearson"], regression=True)(EvalPrediction(np.array([[1.0], [2.0], [3.0]]), np.array([1.0, 2.0, 3.5])))
    assert scores["pearson"] == pytest.approx(pearson([1, 2, 3], [1, 2, 3.5]))
