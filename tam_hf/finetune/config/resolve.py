"""What a recipe means once it is read, resolved once at load time so that no builder asks again:

* paths: ``embedded:NAME`` is the file shipped in the package's ``tam_hf/assets``; ``~`` is expanded; a relative
  path stays relative to the current directory (as ``trl`` and ``llamafactory-cli`` read it). After
  :func:`resolve_paths` every path field of the recipe holds the path to open (data files, the dataset directory,
  the chat template, the DeepSpeed and accelerate configs, the resume checkpoint, ``training.output_dir``,
  lm-eval task files); :func:`portable` writes paths into the package back as ``embedded:`` so that a written
  recipe reruns on another machine and reloads to the same values.
* defaults that depend on another setting (:func:`fill_defaults`).

Imports nothing of the recipe schema (the schema imports this module for the model's source).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

__all__ = ["EMBEDDED_PREFIX", "DATA_DIR", "DEFAULT_METRICS", "YAML_SUFFIXES", "resolve_path", "probe", "exists",
           "local_source", "is_task_path", "fill_defaults", "resolve_paths", "portable"]

EMBEDDED_PREFIX = "embedded:"
DATA_DIR = Path(__file__).resolve().parent.parent.parent / "assets"
# data.target (None: causal LM) -> the metrics evaluated when eval.metrics is unset
DEFAULT_METRICS = {"label": ["accuracy", "f1"], "score": ["pearson", "spearman"], None: ["perplexity"]}
YAML_SUFFIXES = (".yaml", ".yml")  # lm-eval task files


def resolve_path(value: str) -> Path:
    """`embedded:x` -> the file shipped in tam_hf/assets; anything else a path relative to the current directory."""
    if value.startswith(EMBEDDED_PREFIX):
        return DATA_DIR / value[len(EMBEDDED_PREFIX):]
    return Path(value).expanduser()


def probe(path: Path, test) -> bool:
    """``test(path)``, False where the path cannot be reached (a parent that cannot be searched raises
    PermissionError before Python 3.14): a problem in the list, never a traceback."""
    try:
        return test(path)
    except OSError:
        return False


def exists(path: Path) -> bool:
    return probe(path, Path.exists)


def local_source(name: str) -> str | None:
    """The directory a model or tokenizer ``name`` is read from when it is local (embedded or an existing
    path), else None: a Hub id."""
    path = resolve_path(name)
    return str(path) if name.startswith(EMBEDDED_PREFIX) or exists(path) else None


def is_task_path(task: str) -> bool:
    """An lm-eval task given as a file (a YAML, or anything with a slash) rather than a task name."""
    return task.endswith(YAML_SUFFIXES) or "/" in task


def fill_defaults(s: dict[str, Any], name: str) -> None:
    """Fill in every default that depends on another setting; sections that failed to parse are skipped."""
    finetune, model, hub, training = s.get("finetune"), s.get("model"), s.get("hub"), s.get("training")
    if finetune is not None:
        if finetune.method == "qlora" and model is not None and model.quantization == "none":
            model.quantization = "4bit"  # qlora means a 4-bit base: fill it in rather than ask twice
        if finetune.method != "full" and hub is not None and hub.artifact is None:
            hub.artifact = "adapter"
    if training is not None:
        training.setdefault("output_dir", f"outputs/{name}")
        training.setdefault("report_to", "none")  # no surprise wandb/tensorboard logins from a recipe
    if all(k in s for k in ("eval", "data", "task")) and s["eval"].metrics is None:
        target = s["data"].target if s["task"] == "sequence_classification" else None
        s["eval"].metrics = list(DEFAULT_METRICS[target])
    if "optimizer" in s:
        from tam_hf.optim.registry import get

        s["optimizer"].name = get(s["optimizer"].name).name  # an alias becomes the registry name


def _path(value: str) -> str:
    return str(resolve_path(value))


_DATA_PATHS = ("train_file", "eval_file", "validation_file", "dataset", "chat_template_path")


def _resolve_data(data) -> None:
    for key in ("train_file", "eval_file", "validation_file"):
        value = getattr(data, key)
        if value is not None:
            setattr(data, key, _path(value) if isinstance(value, str) else [_path(v) for v in value])
    if data.dataset is not None and exists(resolve_path(data.dataset)):
        data.dataset = _path(data.dataset)
    if data.chat_template_path is not None:
        data.chat_template_path = _path(data.chat_template_path)


def resolve_paths(s: dict[str, Any]) -> None:
    """Every path field of a recipe that passed its checks, in place, as the path to open."""
    _resolve_data(s["data"])
    for stage in s.get("stages") or ():
        # The stage keeps only the keys it sets, resolved the same way as the recipe's data section.
        keys = SimpleNamespace(**{**dict.fromkeys(_DATA_PATHS), **stage.data})
        _resolve_data(keys)
        stage.data = {k: getattr(keys, k) for k in stage.data}
    if s["distributed"] is not None:
        for key in ("accelerate_config", "deepspeed"):
            if getattr(s["distributed"], key) is not None:
                setattr(s["distributed"], key, _path(getattr(s["distributed"], key)))
    if isinstance(s["resume"], str):
        s["resume"] = _path(s["resume"])
    if isinstance(s["training"].get("output_dir"), str):
        s["training"]["output_dir"] = str(Path(s["training"]["output_dir"]).expanduser())
    lm_eval = s["eval"].lm_eval
    if lm_eval is not None:
        lm_eval.tasks = [_path(t) if is_task_path(t) else t for t in lm_eval.tasks]


def portable(value):
    """``value`` (a recipe as plain data) with every path into the package written as ``embedded:``."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, str) and value.startswith(str(DATA_DIR) + os.sep):
        return EMBEDDED_PREFIX + Path(value).relative_to(DATA_DIR).as_posix()
    return value
