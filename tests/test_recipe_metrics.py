"""Evaluation metrics: hand-checked values, agreement with scikit-learn and scipy (GLUE's definitions),
degenerate sets with defined values and no warning, and the Trainer wiring checked by exact values."""

import json
import math
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as sk
from transformers import EvalPrediction

from tam_hf.finetune.config.schema import METRIC_TASKS
from tam_hf.finetune.metrics import (METRICS, accuracy, classification_metrics, exact_match, f1, mcc, pearson,
                                     perplexity, spearman)


@pytest.fixture(autouse=True)
def warnings_are_errors():
    """No metric may let a warning escape (a warning is how scikit-learn and scipy flag an undefined value)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_hand_checked_values():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert f1([1, 0, 1, 1], [1, 1, 1, 0]) == pytest.approx(2 / 3)  # tp 2, fp 1, fn 1
    assert mcc([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0) and mcc([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert mcc([1, 1, 0, 0], [1, 0, 1, 0]) == 0.0  # TP 1 TN 1 FP 1 FN 1
    assert mcc([1, 1, 1, 0], [1, 1, 0, 0]) == pytest.approx(1 / math.sqrt(3))  # TP 2 TN 1 FP 1 FN 0
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [1, 2, 3.5]) == pytest.approx(2.5 * math.sqrt(3 / 19))
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    # beyond float range (or not a number): None, which summary.json writes as null (JSON has no Infinity)
    assert perplexity(700.0) == pytest.approx(math.exp(700.0)) and perplexity(710.0) is None
    assert perplexity(math.inf) is None and perplexity(math.nan) is None
    assert exact_match([" 12", "Paris ", "no"], ["12", "paris", "yes"]) == pytest.approx(2 / 3)


def test_macro_f1_averages_over_the_classes_present():
    # labels 0 and 2 only: class 0 F1 2/3, class 2 F1 4/5. The old count-from-zero code averaged an absent
    # class 1 in as 0 and reported 0.489.
    assert f1([0, 2, 2, 2], [0, 2, 0, 2]) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert f1([0, 2, 2, 2], [0, 2, 0, 2]) == pytest.approx(sk.f1_score([0, 2, 0, 2], [0, 2, 2, 2], average="macro"))
    assert f1([0, 2, 2, 2], [0, 2, 0, 2], num_classes=3) == pytest.approx(0.7333333333)


def test_binary_or_macro_follows_the_number_of_classes():
    label, pred = [0, 1, 1, 0, 1], [0, 1, 0, 0, 1]
    assert f1(pred, label) == f1(pred, label, num_classes=2) == pytest.approx(0.8)  # class 1: tp 2 fn 1
    # the same rows in a three-class task: macro over classes 0 and 1 (0.8 and 0.8)
    assert f1(pred, label, num_classes=3) == pytest.approx(sk.f1_score(label, pred, average="macro"))


def test_agrees_with_sklearn_and_scipy():
    rng = np.random.default_rng(0)
    for n_classes in (2, 3, 4):
        label, pred = rng.integers(0, n_classes, 200), rng.integers(0, n_classes, 200)
        pred[:80] = label[:80]
        average = "binary" if n_classes == 2 else "macro"
        assert accuracy(pred, label) == sk.accuracy_score(label, pred)
        assert f1(pred, label) == pytest.approx(sk.f1_score(label, pred, average=average), abs=1e-12)
        assert mcc(pred, label) == pytest.approx(sk.matthews_corrcoef(label, pred), abs=1e-12)
    x = rng.normal(size=100)
    y = x + rng.normal(size=100)
    y[::7] = y[0]  # ties
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


DEGENERATE = {
    # name: (pred, label, num_classes)
    "absent class": ([0, 0, 2, 2, 2], [0, 1, 2, 2, 0], 3),
    "class never predicted": ([0, 0, 0, 0], [0, 1, 0, 1], 2),
    "single class, all right": ([1, 1, 1], [1, 1, 1], 2),
    "single negative class, all right": ([0, 0, 0], [0, 0, 0], 2),
    "constant predictions": ([1, 1, 1, 1], [1, 0, 1, 0], 2),
    "constant predictions, 3 classes": ([2, 2, 2, 2], [0, 1, 2, 2], 3),
    "one row": ([1], [0], 2),
}


@pytest.mark.parametrize("case", DEGENERATE, ids=list(DEGENERATE))
def test_degenerate_classification_matches_the_libraries_without_warnings(case):
    pred, label, n = DEGENERATE[case]
    average = "binary" if n == 2 else "macro"
    expected_f1 = sk.f1_score(label, pred, average=average, zero_division=0.0)
    with warnings.catch_warnings():  # the library itself may warn here; ours may not (the fixture)
        warnings.simplefilter("ignore")
        expected_mcc = sk.matthews_corrcoef(label, pred)
    assert f1(pred, label, num_classes=n) == expected_f1
    assert mcc(pred, label) == expected_mcc
    assert accuracy(pred, label) == sk.accuracy_score(label, pred)
    for value in (f1(pred, label, num_classes=n), mcc(pred, label), accuracy(pred, label)):
        assert math.isfinite(value)


def test_degenerate_values_are_the_documented_ones():
    assert f1([0, 0, 0], [0, 0, 0], num_classes=2) == 0.0  # no positive class at all: 0 (zero_division)
    assert f1([1, 1, 1], [1, 1, 1], num_classes=2) == 1.0
    assert mcc([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0
    assert accuracy([], []) == f1([], []) == mcc([], []) == pearson([], []) == spearman([], []) == 0.0


@pytest.mark.parametrize("pred, label, scipy_nan", [
    ([2.0, 2.0, 2.0], [1.0, 2.0, 3.0], True),  # constant predictions
    ([1.0, 2.0, 3.0], [5.0, 5.0, 5.0], True),  # constant labels
    ([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0], True),  # a diverged regressor
    ([1.0, float("inf"), 3.0], [1.0, 2.0, 3.0], False),  # scipy ranks inf (Spearman 0.5): here it counts as diverged
    ([1.0], [2.0], False),  # one row: scipy raises
])
def test_correlation_of_degenerate_sets_is_zero(pred, label, scipy_nan):
    assert pearson(pred, label) == 0.0 and spearman(pred, label) == 0.0
    if scipy_nan:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert math.isnan(stats.pearsonr(pred, label).statistic)
            assert math.isnan(stats.spearmanr(pred, label).statistic)


def test_exact_match_with_an_answer_pattern_compares_extracted_answers():
    gsm8k = r"####\s*(-?[\d,.]+)"
    references = ["She pays 3 * 4 = 12.\n#### 1,200", "Half of 10 is 5.\n#### 5", "#### -3"]
    predictions = ["3 * 4 = 12, times 100\n#### 1200\nQuestion: next", "so the answer is 5", "#### -3."]
    # 1,200 == 1200 (commas dropped, trailing full stop too); no '####' in the second prediction: wrong
    assert exact_match(predictions, references, gsm8k) == pytest.approx(2 / 3)
    assert exact_match(predictions, references) == 0.0  # without the pattern whole texts are compared
    assert exact_match([], []) == 0.0


def test_compute_metrics_from_logits():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])  # argmax 0, 1, 0, 1
    out = classification_metrics(["accuracy", "f1", "mcc"], regression=False)(EvalPrediction(logits, np.array([0, 1, 1, 1])))
    # TP 2 TN 1 FP 0 FN 1: F1 = 2*2 / (2*2 + 0 + 1) = 0.8; MCC = (2*1 - 0*1) / sqrt(2*3*1*2) = 1/sqrt(3)
    assert out == pytest.approx({"accuracy": 0.75, "f1": 0.8, "mcc": 1 / math.sqrt(3)})
    scores = classification_metrics(["pearson", "spearman"], regression=True)(
        EvalPrediction(np.array([[1.0], [2.0], [3.0]]), np.array([1.0, 2.0, 3.5])))
    assert scores == pytest.approx({"pearson": 2.5 * math.sqrt(3 / 19), "spearman": 1.0})


def test_compute_metrics_three_classes_is_macro_f1():
    logits = np.eye(3)[[0, 2, 2, 2]]  # predictions 0, 2, 2, 2 from a three-output classifier
    out = classification_metrics(["accuracy", "f1"], regression=False)(EvalPrediction(logits, np.array([0, 2, 0, 2])))
    assert out == pytest.approx({"accuracy": 0.75, "f1": (2 / 3 + 4 / 5) / 2})
    # two outputs, the same rows restricted to classes 0/1: binary F1 of class 1 (never present: 0)
    two = classification_metrics(["f1"], regression=False)(EvalPrediction(np.eye(2)[[0, 0, 0, 0]], np.array([0, 0, 0, 0])))
    assert two == {"f1": 0.0}


def test_degenerate_eval_writes_valid_json():
    compute = classification_metrics(["accuracy", "f1", "mcc"], regression=False)
    out = compute(EvalPrediction(np.zeros((4, 2)), np.array([1, 1, 1, 1])))  # constant predictions, one class
    regression = classification_metrics(["pearson", "spearman"], regression=True)(
        EvalPrediction(np.full((3, 1), 0.5), np.array([1.0, 2.0, 3.0])))
    text = json.dumps({**out, **regression}, allow_nan=False)  # NaN would raise here
    assert json.loads(text) == {"accuracy": 0.0, "f1": 0.0, "mcc": 0.0, "pearson": 0.0, "spearman": 0.0}


def test_every_built_in_metric_has_its_function():
    # The schema's METRIC_TASKS is the one list of names: classification ones computed by METRICS, the causal-LM
    # ones (perplexity from the eval loss, exact_match on generations) by their own functions.
    classification = {m for m, fits in METRIC_TASKS.items() if any(task == "sequence_classification" for task, _ in fits)}
    assert set(METRICS) == classification and set(METRIC_TASKS) - classification == {"perplexity", "exact_match"}
