"""eval.metrics beyond the built-in ones: a local evaluate metric script loads and computes offline; a Hub metric
that is neither reachable nor cached fails validation naming it; metrics that cannot take the task's inputs are
refused; the built-in names never touch evaluate."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
from transformers import EvalPrediction

from tam_hf.finetune.config import metric_rules
from tam_hf.finetune.config.metric_rules import metric_problems, parse_metric
from tam_hf.finetune.evaluate_metrics import is_metric_key, text_metrics
from tam_hf.finetune.metrics import classification_metrics

METRIC = '''
import datasets
import evaluate


class {cls}(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="test metric", citation="", inputs_description="",
            features=datasets.Features({{"predictions": datasets.Value("{dtype}"),
                                         "references": datasets.Value("{dtype}")}}))

    def _compute(self, predictions, references):
        return {result}
'''


def _script(tmp_path, name: str, dtype: str, result: str) -> str:
    folder = tmp_path / name
    folder.mkdir()
    path = folder / f"{name}.py"
    path.write_text(METRIC.format(cls=name.title().replace("_", ""), dtype=dtype, result=result))
    return str(path)


def test_local_metric_script_validates_and_computes_offline(tmp_path):
    agree = _script(tmp_path, "agree", "int64",
                    '{"agree": sum(p == r for p, r in zip(predictions, references)) / len(references)}')
    tally = _script(tmp_path, "tally", "int64", '{"hits": sum(p == r for p, r in zip(predictions, references)), '
                                                '"n": len(references)}')
    names = ["accuracy", agree, tally]
    assert metric_problems(names, "sequence_classification") == []
    logits = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.1, 0.9]])  # argmax 0, 1, 0, 1
    labels = np.array([0, 1, 1, 1])
    out = classification_metrics(names, regression=False)(EvalPrediction(predictions=logits, label_ids=labels))
    assert out == {"accuracy": 0.75, "agree": 0.75, "tally/hits": 3.0, "tally/n": 4.0}
    assert all(is_metric_key(k, names) for k in out) and not is_metric_key("runtime", names)


def test_text_metric_on_generated_answers(tmp_path):
    same = _script(tmp_path, "same_text", "string",
                   '{"same_text": sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)}')
    assert metric_problems([same], "causal_lm") == []
    assert text_metrics(["perplexity", same], [" 11", "7", "x"], ["11", "7", "9"]) == {"same_text": pytest.approx(2 / 3)}


def test_inputs_that_do_not_fit_the_task_are_refused(tmp_path):
    words = _script(tmp_path, "words", "string", '{"words": 0.0}')
    ids = _script(tmp_path, "ids", "int64", '{"ids": 0.0}')
    (problem,) = metric_problems([words], "sequence_classification")
    assert words in problem and "compares text" in problem and "class ids" in problem
    (problem,) = metric_problems([ids], "causal_lm")
    assert "compares class ids or scores" in problem and "generated" in problem


def test_hub_metric_offline_and_not_cached_fails_validation_naming_it(tmp_path, monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "empty-cache")  # nothing cached
    problems = metric_problems(["accuracy", "evaluate:glue/mrpc", "evaluate:tam_hf_no_such_metric"],
                               "sequence_classification")
    assert len(problems) == 2, problems
    assert problems[0].startswith("eval.metrics: evaluate:glue/mrpc needs the Hugging Face Hub")
    assert "offline" in problems[0] and "no cached copy" in problems[0] and "local metric script" in problems[0]
    assert "evaluate:tam_hf_no_such_metric" in problems[1]


def test_builtin_names_never_import_evaluate(monkeypatch):
    real_import = builtins.__import__

    def no_evaluate(name, *args, **kwargs):
        if name == "evaluate" or name.startswith("evaluate."):
            raise ImportError("evaluate is not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_evaluate)
    assert metric_problems(["accuracy", "f1", "perplexity"], "sequence_classification") == []
    (problem,) = metric_problems(["evaluate:bleu"], "causal_lm")
    assert "need the evaluate library" in problem and metric_rules.EVALUATE_INSTALL in problem


def test_names_parse_and_unknown_names_say_how_to_write_them():
    assert parse_metric("evaluate:glue/mrpc").label == "glue/mrpc"
    assert (parse_metric("evaluate:glue/mrpc").path, parse_metric("evaluate:glue/mrpc").config) == ("glue", "mrpc")
    assert parse_metric("evaluate:rouge").label == "rouge" and parse_metric("f1").kind == "builtin"
    (problem,) = metric_problems(["bleu"], "causal_lm")
    assert "unknown metric 'bleu'" in problem and "evaluate:bleu" in problem
    problem = metric_problems(["./scores/m.py", "./other/m.py"], "causal_lm")[0]
    assert "same name 'm'" in problem
