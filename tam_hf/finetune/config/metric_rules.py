"""The metric rules a recipe is checked against: which built-in metric fits which task (``METRIC_TASKS`` in the
schema), and ``evaluate:`` metrics or local metric scripts (:func:`parse_metric`, :func:`metric_problems`;
evaluate is imported only for those). The feature modules (metrics.py, evaluate_metrics.py) load metrics
through :func:`load_metric`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tam_hf.finetune.config.resolve import exists
from tam_hf.finetune.config.schema import BUILTIN_METRICS

__all__ = ["EVALUATE_PREFIX", "EVALUATE_INSTALL", "MetricSpec", "parse_metric", "load_metric", "metric_problems"]

EVALUATE_PREFIX = "evaluate:"
EVALUATE_INSTALL = "pip install evaluate"
# what the task hands a metric: class ids / scores for classification, generated text for causal LM
_TASK_INPUTS = {"sequence_classification": "number", "causal_lm": "text"}


@dataclass(frozen=True)
class MetricSpec:
    """One entry of eval.metrics. ``kind``: builtin, hub (evaluate's Hub metrics), local (a script path) or
    unknown."""

    name: str
    kind: str
    path: str = ""
    config: Optional[str] = None

    @property
    def label(self) -> str:
        """What its results are keyed by: the name, the script's name, or evaluate's NAME[/CONFIG]."""
        if self.kind == "builtin":
            return self.name
        if self.kind == "local":
            script = Path(self.path)
            return script.stem if script.suffix == ".py" else script.name
        return self.path + (f"/{self.config}" if self.config else "")


def _looks_local(name: str) -> bool:
    return name.endswith(".py") or name.startswith(("/", "./", "../", "~")) or exists(Path(name).expanduser())


def parse_metric(name: str) -> MetricSpec:
    """``accuracy`` (built in), ``evaluate:NAME[/CONFIG]`` (evaluate's), a metric script's path, or unknown."""
    if name in BUILTIN_METRICS:
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
    """Every problem with the evaluate metrics of ``names`` (built-in names are checked against METRIC_TASKS):
    evaluate missing, unknown metric, Hub metric offline and not cached, inputs that do not fit ``task``."""
    specs = [parse_metric(n) for n in names]
    wanted = [s for s in specs if s.kind in ("hub", "local")]
    problems = [f"eval.metrics: unknown metric {s.name!r}; built-in: {', '.join(BUILTIN_METRICS)}; an evaluate "
                f"metric is written evaluate:NAME[/CONFIG] (evaluate:{s.name}?), a local one as the path of its script"
                for s in specs if s.kind == "unknown"]
    labels = [s.label for s in specs if s.kind != "unknown"]
    for label in sorted({l for l in labels if labels.count(l) > 1}):
        problems.append(f"eval.metrics: two metrics report under the same name {label!r}; keep one")
    if not wanted:
        return problems
    try:
        import evaluate  # noqa: F401  (only for a recipe that names evaluate metrics)
    except ImportError:
        return problems + [f"eval.metrics: {', '.join(s.name for s in wanted)} need the evaluate library: "
                           f"{EVALUATE_INSTALL}"]
    for spec in wanted:
        if spec.kind == "local" and not exists(Path(spec.path)):
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
                    f"({', '.join(BUILTIN_METRICS)})")
            elif spec.kind == "hub":
                problems.append(f"eval.metrics: {spec.name}: evaluate could not load {spec.label!r} "
                                f"({type(exc).__name__}: {exc})".replace("\n", " "))
            else:
                problems.append(f"eval.metrics: {spec.name}: the metric script does not load "
                                f"({type(exc).__name__}: {exc})".replace("\n", " "))
            continue
        kind, needed = _input_kind(module), _TASK_INPUTS.get(task)
        if needed and kind and kind != needed:
            what = {"number": "class ids or scores", "text": "text"}
            problems.append(f"eval.metrics: {spec.name} compares {what[kind]}, but task {task} gives it "
                            f"{what[needed]}" + (" (answers generated for the evaluation prompts)" if needed == "text" else ""))
    return problems
