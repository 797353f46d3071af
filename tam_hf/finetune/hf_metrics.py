"""Metrics named in a recipe's ``eval.metrics``: the built-in ones, any metric of the ``evaluate`` library, or a
local evaluate metric script.

* ``accuracy``, ``f1``, ``mcc``, ``pearson``, ``spearman``, ``perplexity``, ``exact_match``: built in
  (:mod:`tam_hf.finetune.metrics`, plain numpy), always offline.
* ``evaluate:NAME`` or ``evaluate:NAME/CONFIG``: ``evaluate.load(NAME, CONFIG)`` (``evaluate:glue/mrpc`` is the
  GLUE metric's MRPC configuration). When NAME is no canonical evaluate metric, ``NAME/CONFIG`` is read as a
  community metric ``owner/name`` instead.
* a path to a metric script (``metrics/my_metric.py``, or a directory ``my_metric/`` holding ``my_metric.py``):
  ``evaluate.load(path)``, offline.

evaluate keeps its metric scripts on the Hugging Face Hub. :func:`metric_problems` loads every evaluate metric of
the recipe during validation, so a name that does not exist, or a Hub metric that cannot be had (offline and not
in the cache), fails before training with the metric's name and what to do; it also refuses a metric whose inputs
do not fit the task (class ids for classification, text for causal-LM generations).

Results are keyed by the metric's label (``glue/mrpc``, ``my_metric``), then ``/`` and the key the metric returns
(``glue/mrpc/f1``); a metric returning one value under its own name is keyed by its label alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

__all__ = ["EVALUATE_PREFIX", "BUILTIN", "MetricSpec", "parse_metric", "metric_problems", "load_metric",
           "classification_metrics", "text_metrics", "is_metric_key", "INSTALL"]

EVALUATE_PREFIX = "evaluate:"
BUILTIN = ("accuracy", "f1", "mcc", "pearson", "spearman", "perplexity", "exact_match")
INSTALL = "pip install evaluate"
# what the task hands a metric: class ids / scores for classification, generated text for causal LM
TASK_INPUTS = {"sequence_classification": "number", "causal_lm": "text"}


@dataclass(frozen=True)
class MetricSpec:
    """One entry of eval.metrics. ``kind``: builtin, hub (evaluate's Hub metrics) or local (a script path)."""

    name: str
    kind: str
    path: str = ""
    config: Optional[str] = None

    @property
    def label(self) -> str:
        if self.kind == "builtin":
            return self.name
        if self.kind == "local":
            script = Path(self.path)
            return script.stem if script.suffix == ".py" else script.name
        return self.path + (f"/{self.config}" if self.config else "")


def _looks_local(name: str) -> bool:
    return name.endswith(".py") or name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def parse_metric(name: str) -> MetricSpec:
    if name in BUILTIN:
        return MetricSpec(name, "builtin")
    if name.startswith(EVALUATE_PREFIX):
        module, _, config = name[len(EVALUATE_PREFIX):].strip("/").partition("/")
        return MetricSpec(name, "hub", module, config or None)
    if _looks_local(name):
        return MetricSpec(name, "local", str(Path(name).expanduser()))
    return MetricSpec(name, "unknown")


def _offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"))


def load_metric(spec: MetricSpec):
    """The evaluate module for a hub or local spec (hub: canonical NAME with CONFIG, else community NAME/CONFIG)."""
    import evaluate

    if spec.kind == "local":
        return evaluate.load(spec.path)
    try:
        return evaluate.load(spec.path, spec.config)
    except FileNotFoundError:
        if spec.config is None or "/" in spec.path:
            raise
        return evaluate.load(f"{spec.path}/{spec.config}")


def _input_kind(module) -> str:
    """'text' when the metric's predictions are strings, 'number' when numeric, '' when it does not say."""
    features = module.features
    for feature_set in features if isinstance(features, list) else [features]:
        feature = (feature_set or {}).get("predictions")
        while feature is not None and not hasattr(feature, "dtype") and hasattr(feature, "feature"):
            feature = feature.feature  # Sequence(Value("string")) and the like
        dtype = getattr(feature, "dtype", None)
        if dtype is not None:
            return "text" if dtype in ("string", "large_string") else "number"
    return ""


def metric_problems(names: list[str], task: str) -> list[str]:
    """Every problem with the evaluate metrics of ``names`` (built-in names are the schema's business): evaluate
    missing, unknown metric, Hub metric offline and not cached, inputs that do not fit ``task``."""
    specs = [parse_metric(n) for n in names]
    wanted = [s for s in specs if s.kind in ("hub", "local")]
    problems = [f"eval.metrics: unknown metric {s.name!r}; built-in: {', '.join(BUILTIN)}; an evaluate metric is "
                f"written evaluate:NAME[/CONFIG] (evaluate:{s.name}?), a local one as the path of its script"
                for s in specs if s.kind == "unknown"]
    labels = [s.label for s in specs if s.kind != "unknown"]
    for label in sorted({l for l in labels if labels.count(l) > 1}):
        problems.append(f"eval.metrics: two metrics report under the same name {label!r}; keep one")
    if not wanted:
        return problems
    try:
        import evaluate  # noqa: F401
    except ImportError:
        return problems + [f"eval.metrics: {', '.join(s.name for s in wanted)} need the evaluate library: {INSTALL}"]
    for spec in wanted:
        if spec.kind == "local" and not Path(spec.path).exists():
            problems.append(f"eval.metrics: metric script not found: {spec.name}")
            continue
        try:
            module = load_metric(spec)
        except Exception as exc:  # evaluate raises FileNotFoundError, ConnectionError, ImportError, ...
            if spec.kind == "hub" and _offline():
                problems.append(
                    f"eval.metrics: {spec.name} needs the Hugging Face Hub (evaluate downloads its metric scripts "
                    "from there), and this session is offline (HF_HUB_OFFLINE) with no cached copy. Run once "
                    "online to cache it, give the path of a local metric script, or use a built-in metric "
                    f"({', '.join(BUILTIN)})")
            elif spec.kind == "hub":
                problems.append(f"eval.metrics: {spec.name}: evaluate could not load {spec.label!r} "
                                f"({type(exc).__name__}: {exc})".replace("\n", " "))
            else:
                problems.append(f"eval.metrics: {spec.name}: the metric script does not load "
                                f"({type(exc).__name__}: {exc})".replace("\n", " "))
            continue
        kind, needed = _input_kind(module), TASK_INPUTS.get(task)
        if needed and kind and kind != needed:
            what = {"number": "class ids or scores", "text": "text"}
            problems.append(f"eval.metrics: {spec.name} compares {what[kind]}, but task {task} gives it "
                            f"{what[needed]}" + (" (answers generated for the evaluation prompts)" if needed == "text" else ""))
    return problems


def _keyed(spec: MetricSpec, result: Optional[dict]) -> dict[str, float]:
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


def classification_metrics(names: list[str], regression: bool) -> Callable:
    """A Trainer ``compute_metrics`` for the built-in and evaluate metrics of ``names``: predictions are the argmax
    class ids (the scores for regression), references the labels."""
    from tam_hf.finetune.metrics import classification_metrics as builtin_metrics

    builtin = builtin_metrics([n for n in names if n in BUILTIN], regression)
    specs = [s for s in map(parse_metric, names) if s.kind in ("hub", "local")]
    modules = [(s, load_metric(s)) for s in specs]

    def compute(eval_pred) -> dict[str, float]:
        out = builtin(eval_pred)
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        pred = np.asarray(logits).squeeze(-1) if regression else np.asarray(logits).argmax(-1)
        for spec, module in modules:
            out.update(_keyed(spec, module.compute(predictions=pred.tolist(), references=np.asarray(eval_pred.label_ids).tolist())))
        return out

    return compute


def text_metrics(names: list[str], predictions: list[str], references: list[str]) -> dict[str, float]:
    """The evaluate metrics of ``names`` on generated answers (causal LM), keyed as described above."""
    out = {}
    for spec in map(parse_metric, names):
        if spec.kind in ("hub", "local"):
            out.update(_keyed(spec, load_metric(spec).compute(predictions=predictions, references=references)))
    return out
