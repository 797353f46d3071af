"""The rules of a staged recipe (``stages:``, continual fine-tuning), as data and functions that need no run code.

A stage sets ``data`` and ``training`` keys over the recipe's sections, and ``reset_optimizer``. What every stage
shares (the model, its head, the optimizer, the metrics) stays at the top level: a stage that sets it is refused
with the reason. Each stage's merged sections are checked like a recipe's own (:func:`parse_stages` checks its
training keys, :mod:`tam_hf.finetune.config.checks` its merged data through :func:`stage_data`), and its problems
name the stage (``stages[1].data...``).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from pydantic import ValidationError

from tam_hf.finetune.config.messages import explain, key_text
from tam_hf.finetune.config.schema import STAGE_NAME, DataConfig, StageConfig
from tam_hf.finetune.config.training import parse_training
from tam_hf.finetune.config.yaml_io import short

__all__ = ["STAGE_MARKER", "stage_folder", "RUN_KEYS", "SHARED_DATA", "SHARED_TRAINING", "EVAL_SOURCES",
           "parse_stages", "stage_data",
           "training_problems", "restage"]

# Written into a stage's folder once the stage is finished: its final model, optimizer state and evaluations.
STAGE_MARKER = "tam_hf_stage.json"


def stage_folder(index: int, name: str) -> str:
    """The folder of stage ``index`` (0-based) under the run's output directory: stage-1-NAME for the first."""
    return f"stage-{index + 1}-{name}"


_CARRIED = "the model carries over from stage to stage, so every stage trains the same one"
# Recipe sections a stage may not set -> why.
RUN_KEYS = {
    "model": _CARRIED, "task": _CARRIED, "finetune": _CARRIED + " (its LoRA adapter too)",
    "optimizer": "one optimizer trains every stage and its state carries over (reset_optimizer: true starts the "
                 "state afresh at a stage)",
    "eval": "every stage is evaluated with the same metrics on every stage's eval set",
    "hub": "it applies to the whole run", "distributed": "it applies to the whole run",
    "resume": "it applies to the whole run", "overwrite": "it applies to the whole run",
}
# data keys that shape the model's head or what a row is: one value for the whole run.
SHARED_DATA = {"format": "the model's inputs", "target": "the model's head (labels or a score)",
               "num_labels": "the model's head"}
# training keys a stage may not set -> why.
SHARED_TRAINING = {"output_dir": "each stage writes under <output_dir>/stage-<k>-<name>; set it at the top level"}
EVAL_SOURCES = ("eval_file", "eval_split", "eval_fraction")


def parse_stages(raw, problems: list[str], places: Callable[[], Mapping[str, Sequence[str]]]):
    """The stages as StageConfig objects, or None for ``stages: null`` or a value that is no list. Every problem
    is named at once: a stage that did not parse is kept with its valid keys (:func:`_salvage`) and checked for the
    rest; a stage that is no mapping stands as None."""
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        problems.append(f"stages: expected a non-empty list of stages ({{name, data, training, reset_optimizer}}), "
                        f"got {type(raw).__name__} {short(raw)}")
        return None
    parsed: list[StageConfig | None] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            problems.append(f"stages[{i}]: expected a mapping {{name, data, training, reset_optimizer}}, got "
                            f"{type(item).__name__} {short(item)}")
            parsed.append(None)
            continue
        for key in item:
            if key in RUN_KEYS:
                problems.append(f"stages[{i}].{key}: a stage cannot set {key}: {RUN_KEYS[key]}; set it at the top "
                                "level")
        own = {k: v for k, v in item.items() if k not in RUN_KEYS}
        try:
            parsed.append(StageConfig.model_validate(own))
        except ValidationError as exc:
            problems += explain(exc, ("stages", i), StageConfig, places=places)
            parsed.append(_salvage(own, exc))
        problems += training_problems(parsed[-1], i, places)
    for i, stage in enumerate(parsed):
        if stage is not None and isinstance(stage.name, str) and not STAGE_NAME.match(stage.name):
            problems.append(f"stages[{i}].name: {short(stage.name)} cannot name a folder: use up to 64 letters, "
                            "digits, '_', '.' or '-', starting with a letter or digit")
    names = [s.name if s is not None else None for s in parsed]
    for name in sorted({n for n in names if n is not None and names.count(n) > 1}):
        where = ", ".join(f"stages[{i}]" for i, n in enumerate(names) if n == name)
        problems.append(f"stages: the name {name!r} is used by {where}; each stage needs its own (it names the "
                        "stage's folder and its results)")
    return parsed


def _salvage(own: dict, exc: ValidationError) -> StageConfig:
    """A stage whose keys did not all validate, kept with the keys that did (a bad name as None, a bad training
    section empty, a bad data section None: left unchecked), so that its other problems (its training keys, its
    merged data, a name used twice) are named in the same error. The recipe is refused whatever it holds."""
    bad = {e["loc"][0] for e in exc.errors() if e.get("loc")}
    good = {k: v for k, v in own.items() if k in StageConfig.model_fields and k not in bad}
    # data None where it was no mapping: such a stage is not also told that it has no eval set
    return StageConfig.model_construct(**{"name": None, "data": None if "data" in bad else {}, "training": {},
                                          "reset_optimizer": False, **good})


def stage_data(data: DataConfig, stage: StageConfig, index: int, problems: list[str]) -> DataConfig | None:
    """The data section stage ``index`` trains and evaluates on: the recipe's with the stage's keys over it.
    None when the stage's keys do not make a valid section (problems appended, naming the stage)."""
    where = ("stages", index, "data")
    shared = [k for k in stage.data if k in SHARED_DATA and stage.data[k] != getattr(data, k)]
    for key in shared:
        problems.append(f"stages[{index}].data.{key}: a stage cannot change {key} ({SHARED_DATA[key]}): the model "
                        "carries over from stage to stage; set it in the recipe's data section")
    try:  # checked with the run's own values of the keys refused above, so that its other problems show too
        return DataConfig.model_validate({**data.model_dump(), **{k: v for k, v in stage.data.items()
                                                                   if k not in shared}})
    except ValidationError as exc:
        problems += explain(exc, where, DataConfig)
        return None


def training_problems(stage: StageConfig, index: int,
                      places: Callable[[], Mapping[str, Sequence[str]]]) -> list[str]:
    """The problems of the stage's ``training`` keys: each checked like the recipe's training section (types,
    ranges, owned keys); TrainingArguments' own cross-field checks run for every stage when the run starts."""
    found = [f"training.{key_text(k)}: a stage cannot set {k}: {SHARED_TRAINING[k]}" for k in stage.training
             if k in SHARED_TRAINING]
    parse_training({k: v for k, v in stage.training.items() if k not in SHARED_TRAINING}, found, places)
    return [restage(p, index) for p in found]


def restage(problem: str, index: int) -> str:
    """A problem found in a stage's merged section, named after the stage: ``data.x: ...`` becomes
    ``stages[1].data.x: ...``; any other problem is prefixed with ``stages[1]: ``."""
    for section in ("data", "training"):
        if problem.startswith(section) and problem[len(section):len(section) + 1] in (".", ":", " ", "["):
            return f"stages[{index}].{problem}"
    return f"stages[{index}]: {problem}"
