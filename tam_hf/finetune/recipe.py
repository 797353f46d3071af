"""The recipe: one YAML file describes a whole fine-tuning run.

Loading is strict and eager, in three steps, before any model or dataset is touched (a typo costs seconds
rather than an hour of training):

1. **parse**: each section is checked against its pydantic model (:mod:`tam_hf.finetune.schema`): unknown keys
   (with a did-you-mean), types, ranges, nan/inf anywhere. ``optimizer`` is checked against the optimizer
   registry (its keys are the chosen constructor's arguments; their values are checked by building the
   optimizer once), ``training`` against ``transformers.TrainingArguments``.
2. **resolve**: every default that depends on another setting is filled in, in :func:`_resolve` only.
3. **cross-check**: settings that exclude or need each other, files and directories that must exist (or be
   creatable: nothing is created here).

Every problem of every step is collected and raised once as a :class:`RecipeError`; a check that reads a
section that failed step 1 is skipped rather than reported twice. YAML is read by a ``yaml.SafeLoader``
subclass (:mod:`tam_hf.finetune.recipe_yaml`): plain data only, no duplicate keys, bounded nesting and alias
expansion. Messages quote at most a short prefix of a bad value.

Relative file paths are read relative to the current directory (as ``trl`` and ``llamafactory-cli`` do);
``embedded:NAME`` points into the package's own ``tam_hf/assets`` directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import types
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, TypeAdapter, ValidationError, create_model
from pydantic_core import PydanticCustomError

from tam_hf.finetune.recipe_yaml import MAX_DEPTH, clip, describe, dump_yaml, read_yaml, short
from tam_hf.finetune.schema import (COMPLETION_FORMATS, DATA_DIR, DEFAULT_METRICS, EMBEDDED_MODELS, EMBEDDED_PREFIX,
                                    FILE_SUFFIXES, FORMAT_COLUMNS, HUB_ID, METRIC_TASKS, STRICT, TRAINING_OWNED,
                                    TRAINING_RANGES, DataConfig, DistributedConfig, EvalConfig, FinetuneConfig,
                                    Float, HubConfig, LMEvalConfig, LoraConfig, ModelConfig, OptimizerConfig, Recipe)

__all__ = ["Recipe", "RecipeError", "load_recipe", "read_recipe_file", "validate_recipe", "apply_overrides", "to_dict",
           "to_yaml", "rerun_yaml", "RUN_ONLY", "resolve_path", "read_yaml", "ModelConfig", "DataConfig", "LoraConfig", "FinetuneConfig",
           "OptimizerConfig", "EvalConfig", "LMEvalConfig", "HubConfig", "DistributedConfig", "EMBEDDED_PREFIX", "DATA_DIR",
           "EMBEDDED_MODELS", "FORMAT_COLUMNS", "COMPLETION_FORMATS", "FILE_SUFFIXES", "METRIC_TASKS",
           "TRAINING_OWNED", "HUB_ID"]


class RecipeError(ValueError):
    """All the problems found in one recipe, reported together."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} is not valid, found {len(self.problems)} problem(s):\n{lines}")


# ------------------------------------------------------------------------------------------------ loading


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override, validate. Raises RecipeError listing every problem."""
    path = Path(path)
    raw = read_recipe_file(path)
    problems = apply_overrides(raw, overrides)
    return validate_recipe(raw, name=path.stem, source=str(path), problems=problems)


def read_recipe_file(path: str | Path) -> dict:
    """The plain mapping a recipe file holds, read through :func:`read_yaml` (the safe loader); nothing is
    validated yet. Raises RecipeError when the file is missing, unreadable, not YAML or not a mapping."""
    path = Path(path)
    if not _is_file(path):
        raise RecipeError([f"recipe file not found: {path}"], str(path))
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([f"recipe could not be read: {clip(exc, 200)}"], str(path)) from None
    except yaml.YAMLError as exc:  # syntax, duplicate keys, nesting, aliases, and tags such as !!python/object
        raise RecipeError([f"YAML could not be read: {describe(exc)}"], str(path)) from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError([f"the top level must be a mapping of sections, got {type(raw).__name__}"], str(path))
    return raw


_YAML11_BOOL_WORDS = {"yes", "no", "on", "off", "y", "n"}


def apply_overrides(raw: dict, overrides: list[str]) -> list[str]:
    """Apply `a.b.c=value` overrides in place (value read as YAML); returns problems instead of raising.

    Any key of a recipe this tool wrote can be set, also under a section written as null (`lora: null`)."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.split(".")
        if not sep or not key:
            problems.append(f"override {short(item)}: expected key.path=value")
        elif "" in parts:
            problems.append(f"override {short(key)}: empty key in the path")
        elif len(parts) > MAX_DEPTH:
            problems.append(f"override {short(key)}: nested deeper than {MAX_DEPTH} levels")
        else:
            node = raw
            for i, part in enumerate(parts[:-1]):
                node = node.get(part) if isinstance(node, dict) else None
                if node is not None and not isinstance(node, dict):
                    problems.append(f"override {short(key)}: {'.'.join(parts[:i + 1])} is not a section")
                    break
            else:
                _set(raw, parts, _override_value(text))
    return problems


def _override_value(text: str):
    # YAML 1.1 reads yes/no/on/off as booleans; on a command line `training.save_strategy=no` means "no"
    if text.strip().lower() in _YAML11_BOOL_WORDS:
        return text
    try:
        return read_yaml(text)
    except yaml.YAMLError:
        return text


def _set(raw: dict, parts: list[str], value) -> None:
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def validate_recipe(raw: dict, name: str = "recipe", source: str = "recipe", problems: list[str] = ()) -> Recipe:
    """The validated, resolved recipe; a RecipeError lists every problem. ``raw`` is not modified."""
    problems = list(problems)
    sections = _parse(raw, problems)
    if sections is not None:
        _resolve(sections, name)
        _cross_check(sections, problems)
    if problems:
        raise RecipeError(problems, source)
    return Recipe.model_validate(sections)


def to_dict(recipe: Recipe) -> dict:
    return recipe.model_dump()


def to_yaml(recipe: Recipe) -> str:
    return dump_yaml(to_dict(recipe))


# Keys about what one run does with its output directory: a recipe written for others to rerun leaves them out.
RUN_ONLY = ("resume", "overwrite")


def rerun_yaml(recipe: Recipe) -> str:
    """The recipe as a file to rerun from (the copy a run writes into its output directory, the Hub's copy):
    every default filled in, without :data:`RUN_ONLY`, so that running it neither continues nor wipes a run."""
    return dump_yaml({k: v for k, v in to_dict(recipe).items() if k not in RUN_ONLY})


def resolve_path(value: str) -> Path:
    """`embedded:x` -> the file shipped in tam_hf/assets; anything else is a path relative to the current directory."""
    if value.startswith(EMBEDDED_PREFIX):
        return DATA_DIR / value[len(EMBEDDED_PREFIX):]
    return Path(value).expanduser()


# ---------------------------------------------------------------------------------- step 1: parse sections


_INVALID = object()  # a section that failed its own checks


def _parse(raw, problems: list[str]) -> dict[str, Any] | None:
    """Section name -> validated value, for the sections that passed; problems appended for the others."""
    if not isinstance(raw, dict):
        problems.append(f"recipe: expected a mapping of sections, got {type(raw).__name__} {short(raw)}")
        return None
    fields = Recipe.model_fields
    for key in raw:
        if key not in fields:
            problems.append(f"{_key(key)}: unknown key{_did_you_mean(key, fields)}")
    sections = {}
    for name, info in fields.items():
        if name not in raw:
            if info.is_required():
                problems.append(f"{name}: required key is missing ({info.description})")
            else:
                sections[name] = info.get_default(call_default_factory=True)
            continue
        value = _PARSERS.get(name, _parse_plain)(name, raw[name], problems)
        if value is not _INVALID:
            sections[name] = value
    return sections


def _parse_plain(name: str, value, problems: list[str]):
    adapter = _section_adapter(name)
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        problems += _explain(exc, (name,), Recipe.model_fields[name].annotation)
        errors = exc.errors(include_url=False)
    if all(e["type"] == "extra_forbidden" for e in errors):
        # Unknown keys only: the section's settings are fine, so the checks that read it still run and every
        # problem of the recipe is reported at once (the unknown keys already fail it).
        pruned = _without(value, [e["loc"] for e in errors])
        try:
            return adapter.validate_python(pruned)
        except ValidationError:
            pass
    return _INVALID


def _without(value, locs: list[tuple]):
    """A copy of ``value`` without the keys at ``locs`` (paths of dict keys and list indices)."""
    if not locs:
        return value
    if isinstance(value, dict):
        return {k: _without(v, [loc[1:] for loc in locs if loc[0] == k and len(loc) > 1])
                for k, v in value.items() if (k,) not in locs}
    if isinstance(value, list):
        return [_without(v, [loc[1:] for loc in locs if loc[0] == i]) for i, v in enumerate(value)]
    return value


@functools.cache
def _section_adapter(name: str) -> TypeAdapter:
    info = Recipe.model_fields[name]
    tp = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    return TypeAdapter(tp) if _model_of(tp) is tp else TypeAdapter(tp, config=STRICT)


def _parse_optimizer(name: str, raw, problems: list[str]):
    """``name`` must be in the registry; every other key must be an argument of that optimizer's constructor,
    of the type it declares; the values are then checked once, by building the optimizer (its own messages)."""
    from tam_hf.optim.registry import OPTIMIZERS

    if not isinstance(raw, dict):
        return _parse_plain(name, raw, problems)
    before = len(problems)
    try:
        OptimizerConfig.model_validate({k: raw[k] for k in ("name", "lr") if k in raw})
    except ValidationError as exc:
        problems += _explain(exc, ("optimizer",), OptimizerConfig)
    spec = _optimizer_spec(raw.get("name"))
    if spec is None and isinstance(raw.get("name"), str):
        choices = [*OPTIMIZERS, *(a for s in OPTIMIZERS.values() for a in s.aliases)]
        problems.append(f"optimizer.name: {short(raw['name'])} is not one of {', '.join(map(repr, OPTIMIZERS))}"
                        f"{_did_you_mean(raw['name'], choices)}")
    if spec is None:
        return _INVALID
    accepted = spec.accepted_keys()
    anywhere = {k for s in OPTIMIZERS.values() for k in s.accepted_keys()}
    settings = {}
    for key, value in raw.items():
        if key in ("name", "lr") or (value is None and key in anywhere):
            continue  # null = unset; resolved recipes of earlier releases list every optimizer's keys as null
        takes = f"{spec.name} takes {', '.join(accepted)}"
        if key not in accepted:
            problems.append(f"optimizer.{_key(key)} does not apply to {spec.name} (it takes {', '.join(accepted)})"
                            if key in anywhere else
                            f"optimizer.{_key(key)}: unknown key{_did_you_mean(key, accepted)}; {takes}")
            continue
        setting_type, free = _setting_adapter(accepted[key])
        try:
            settings[key] = _plain(setting_type.validate_python(value))
        except ValidationError as exc:
            problems += _explain(exc, ("optimizer", key), None)
        else:
            if free:
                problems += _non_finite(value, f"optimizer.{key}")
    if len(problems) > before:
        return _INVALID
    config = OptimizerConfig.model_validate({"name": raw["name"], "lr": raw["lr"], **settings})
    try:
        spec.check(config.kwargs())
    except (ValueError, TypeError, RuntimeError) as exc:
        problems.append(f"optimizer: {clip(exc, 160)} ({spec.cls.__name__})")
        return _INVALID
    return config


def _optimizer_spec(name):
    from tam_hf.optim import registry

    if not isinstance(name, str):
        return None
    try:
        return registry.get(name)
    except ValueError:
        return None


@functools.cache
def _setting_adapter(hint) -> tuple[TypeAdapter, bool]:
    """(validator for a constructor argument declared as ``hint``, whether it is free-form)."""
    tp = _setting_type(hint)
    return TypeAdapter(tp, config=STRICT), tp is Any


def _setting_type(hint):
    """A constructor annotation as a strict recipe type: float -> Float, tuple[float, float] -> two Floats
    (a YAML list is accepted), float | Tensor -> Float (a recipe gives numbers); anything else free-form."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is float:
        return Float
    if hint in (int, bool, str, type(None)) or origin is Literal:
        return hint
    if origin in (Union, types.UnionType):
        kept = [_setting_type(a) for a in args if getattr(a, "__name__", "") != "Tensor"]
        if not kept or Any in kept:
            return Any
        return kept[0] if len(kept) == 1 else Union[tuple(kept)]
    if origin is tuple and args and args[-1] is not Ellipsis:
        items = tuple(_setting_type(a) for a in args)
        return Any if Any in items else Annotated[tuple[items], BeforeValidator(_tuple_of(len(items)))]
    return Any


def _tuple_of(n: int):
    def convert(value):
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise PydanticCustomError("recipe_type", "expected a tuple of {n} values, got {got}",
                                          {"n": n, "got": f"{type(value).__name__} {short(value)}"})
            return tuple(value)
        return value

    return convert


def _plain(value):
    """Stored as YAML writes it: tuples as lists."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _parse_training(name: str, raw, problems: list[str]):
    """TrainingArguments fields: known, not owned by another section, simple ones typed and range-checked
    (:data:`TRAINING_RANGES`), free-form ones (dicts, lists) free of nan/inf."""
    if not isinstance(raw, dict):
        return _parse_plain(name, raw, problems)
    model, free = _training_model()
    before = len(problems)
    for key in raw:
        if key in TRAINING_OWNED:
            problems.append(f"training.{key}: set {TRAINING_OWNED[key]} instead")
    checked = {k: v for k, v in raw.items() if k not in TRAINING_OWNED}
    try:
        validated = model.model_validate(checked)
    except ValidationError as exc:
        problems += _explain(exc, ("training",), model, unknown="not a TrainingArguments field")
        validated = None
    for key in free.intersection(checked):
        problems += _non_finite(checked[key], f"training.{key}")
    if len(problems) > before:
        return _INVALID
    out = dict(raw)
    for key, value in raw.items():  # `1e-4` read by YAML 1.1 as text becomes the number; ints stay ints
        if isinstance(value, str) and isinstance(getattr(validated, key), (int, float)):
            out[key] = getattr(validated, key)
    return out


@functools.cache
def _training_model() -> tuple[type[BaseModel], frozenset[str]]:
    """(a pydantic model of the TrainingArguments fields a recipe may set, the names of its free-form fields)."""
    from transformers import TrainingArguments  # imported here: reading a recipe's YAML needs no transformers

    fields, free = {}, set()
    for f in dataclasses.fields(TrainingArguments):
        if not f.init or f.name in TRAINING_OWNED:
            continue
        tp = _simple_type(f.type)
        if f.name == "max_steps":
            tp = Annotated[int, AfterValidator(_steps)]
        if tp is Any:
            free.add(f.name)
        fields[f.name] = (Optional[tp], Field(None, **TRAINING_RANGES.get(f.name, {})))
    return create_model("TrainingArgumentsSection", __config__=STRICT, **fields), frozenset(free)


def _simple_type(tp):
    """int/float/bool/str (optionally Optional) annotations are checked here; richer ones (enums, unions, dicts)
    are left to TrainingArguments itself."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    return {int: int, float: Float, bool: bool, str: str}.get(tp, Any) if isinstance(tp, type) else Any


def _steps(value: int) -> int:
    if value != -1 and value < 1:
        raise PydanticCustomError("recipe_range", "{value} must be -1 (no limit) or > 0", {"value": value})
    return value


_PARSERS = {"optimizer": _parse_optimizer, "training": _parse_training}


# ------------------------------------------------------------------------------------------ error messages


_EXPECTED = {"int_type": "int", "int_parsing": "int", "int_from_float": "int", "float_type": "float",
             "float_parsing": "float", "bool_type": "bool", "bool_parsing": "bool", "string_type": "str",
             "list_type": "a list", "tuple_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
             "model_attributes_type": "a mapping"}
_BOUNDS = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
           "less_than_equal": ("<=", "le")}


def _explain(exc: ValidationError, where: tuple, root, unknown: str = "unknown key") -> list[str]:
    """One line per pydantic error: the dotted path, then what is wrong in the recipe's words."""
    out = []
    for err in exc.errors(include_url=False):
        loc, kind, value, ctx = err["loc"], err["type"], err.get("input"), err.get("ctx") or {}
        path = _path(where + tuple(loc))
        if kind == "missing":
            info = _field_at(root, loc)
            help_text = f" ({info.description})" if info and info.description else ""
            out.append(f"{path}: required key is missing{help_text}")
        elif kind == "extra_forbidden":
            out.append(f"{path}: {unknown}{_did_you_mean(str(loc[-1]), _names_at(root, loc[:-1]))}")
        elif kind == "literal_error":
            choices = _literal_at(root, loc)
            out.append(f"{path}: {short(value)} is not one of {', '.join(map(repr, choices))}"
                       f"{_did_you_mean(str(value), [str(c) for c in choices])}")
        elif kind == "invalid_key":
            out.append(f"{_path(where + tuple(loc[:-1]))}: key {short(loc[-1])} is not a string")
        elif kind == "finite_number":
            out.append(f"{path}: {short(value)} is not a finite number")
        elif kind in _BOUNDS:
            symbol, bound = _BOUNDS[kind]
            out.append(f"{path}: {short(value)} must be {symbol} {ctx[bound]}")
        elif kind in _EXPECTED:
            out.append(f"{path}: expected {_EXPECTED[kind]}, got {type(value).__name__} {short(value)}")
        else:  # our own PydanticCustomErrors carry a complete message; pydantic's are understandable as they are
            out.append(f"{path}: {err['msg']}")
    return out


def _path(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else ("." if text else "") + _key(part)
    return text


def _key(key) -> str:
    key = str(key)
    return key if len(key) <= 60 else key[:57] + "..."


def _model_of(tp):
    """The pydantic model a (possibly Optional / Annotated) annotation holds, else None."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in typing.get_args(tp):
        found = _model_of(arg) if not isinstance(arg, (str, int, float)) else None
        if found is not None:
            return found
    return None


def _field_at(root, loc: tuple):
    info = None
    for part in loc:
        model = _model_of(root)
        if model is None or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        root = info.annotation
    return info


def _names_at(root, loc: tuple) -> list[str]:
    info = _field_at(root, loc) if loc else None
    model = _model_of(info.annotation if info else root)
    return list(model.model_fields) if model else []


def _literal_at(root, loc: tuple) -> tuple:
    info = _field_at(root, loc)
    tp = info.annotation if info else None
    for candidate in (tp, *typing.get_args(tp)):
        if typing.get_origin(candidate) is Literal:
            return typing.get_args(candidate)
    return ()


def _did_you_mean(word, options) -> str:
    word = str(word)
    if len(word) > 100:
        return ""
    close = difflib.get_close_matches(word, [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _non_finite(value, where: str) -> list[str]:
    """Every nan/inf inside a free-form value (dicts and lists walked without recursion)."""
    out, stack = [], [(where, value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            out.append(f"{path}: {item!r} is not a finite number")
        elif isinstance(item, dict):
            stack += reversed([(f"{path}.{_key(k)}", v) for k, v in item.items()])
        elif isinstance(item, (list, tuple)):
            stack += reversed([(f"{path}[{i}]", v) for i, v in enumerate(item)])
    return out


# ------------------------------------------------------------------------------------ step 2: resolve


def _resolve(s: dict[str, Any], name: str) -> None:
    """Fill in every default that depends on another setting; sections that failed to parse are skipped."""
    finetune, model, hub, training = s.get("finetune"), s.get("model"), s.get("hub"), s.get("training")
    if finetune is not None:
        if finetune.method != "full" and finetune.lora is None:
            finetune.lora = LoraConfig()
        if finetune.method == "qlora" and model is not None and model.quantization == "none":
            model.quantization = "4bit"  # qlora means a 4-bit base: fill it in rather than ask twice
        if finetune.method != "full" and hub is not None and hub.artifact is None:
            hub.artifact = "adapter"
    if training is not None:
        training.setdefault("output_dir", f"outputs/{name}")
        training.setdefault("report_to", "none")  # no surprise wandb/tensorboard logins from a recipe
    if all(k in s for k in ("eval", "data", "task")) and s["eval"].metrics is None:
        s["eval"].metrics = list(DEFAULT_METRICS[_target(s["task"], s["data"])])
    if "optimizer" in s:
        s["optimizer"].name = _optimizer_spec(s["optimizer"].name).name  # an alias becomes the registry name


def _target(task: str, data: DataConfig) -> str | None:
    return data.target if task == "sequence_classification" else None


# -------------------------------------------------------------------------------- step 3: cross-checks


def _cross_check(s: dict[str, Any], problems: list[str]) -> None:
    """Each check runs only when the sections it reads parsed (else their own problems are already listed)."""
    r = SimpleNamespace(**s)
    checks = [
        (_check_model, ("model",)),
        (_check_data, ("data", "task")),
        (_check_packing, ("data", "task", "model")),
        (_check_finetune, ("finetune", "model", "hub")),
        (_check_eval, ("eval", "data", "task")),
        (_check_hub, ("hub", "finetune")),
        (_check_launch, ("distributed", "resume", "overwrite", "training")),
        (_check_output_dir, ("training",)),
    ]
    for check, needs in checks:
        if all(k in s for k in needs):
            check(r, problems)


def _check_launch(r, problems: list[str]) -> None:
    if r.distributed is not None:
        for key in ("accelerate_config", "deepspeed"):
            value = getattr(r.distributed, key)
            if value is not None and not _is_file(resolve_path(value)):
                problems.append(f"distributed.{key}: file not found: {clip(value)}")
    if r.overwrite and r.resume is not False:
        problems.append("overwrite: true and resume exclude each other: continue the run (resume) or start it over "
                        "(overwrite)")
    if isinstance(r.resume, str) and not _is_dir(resolve_path(r.resume)):
        problems.append(f"resume: checkpoint directory not found: {clip(r.resume)}")
    output_dir = r.training.get("output_dir")
    if r.resume is True and isinstance(output_dir, str) and not any(Path(output_dir).glob("checkpoint-*")):
        problems.append(f"resume: true but {output_dir} holds no checkpoint-* directory to continue from")


def _exists(path: Path) -> bool:
    return _probe(path, Path.exists)


def _is_file(path: Path) -> bool:
    return _probe(path, Path.is_file)


def _is_dir(path: Path) -> bool:
    return _probe(path, Path.is_dir)


def _probe(path: Path, test) -> bool:
    """``test(path)``, False where the path cannot be reached (a parent that cannot be searched raises
    PermissionError before Python 3.14): a problem in the list, never a traceback."""
    try:
        return test(path)
    except OSError:
        return False


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids)


def _check_output_dir(r, problems: list[str]) -> None:
    """The run will create ``output_dir``: its nearest existing ancestor must be a writable directory. Found
    now rather than after the model is loaded; nothing is created here."""
    output_dir = r.training.get("output_dir")
    if not isinstance(output_dir, str):
        return
    path = Path(output_dir).expanduser()
    existing = path
    while not _exists(existing) and existing != existing.parent:
        existing = existing.parent
    if not _is_dir(existing):
        problems.append(f"training.output_dir: {existing} is a file, not a directory")
    elif not _writable(existing):
        problems.append(f"training.output_dir: {existing} is not writable" if existing == path else
                        f"training.output_dir: cannot create {path}: {existing} is not writable")


def _is_pathlike(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~", EMBEDDED_PREFIX)) or _exists(Path(value).expanduser())


def _check_model(r, problems: list[str]) -> None:
    m = r.model
    if m.name.startswith(EMBEDDED_PREFIX):
        embedded = m.name[len(EMBEDDED_PREFIX):]
        if embedded not in EMBEDDED_MODELS:
            problems.append(f"model.name: no embedded model {short(embedded)}{_did_you_mean(embedded, EMBEDDED_MODELS)}; "
                            f"embedded: {', '.join(EMBEDDED_MODELS)}")
    elif _is_pathlike(m.name):
        if not _is_dir(resolve_path(m.name)):
            problems.append(f"model.name: local model directory not found: {clip(m.name)}")
        elif m.gguf_file and not _is_file(resolve_path(m.name) / m.gguf_file):
            problems.append(f"model.gguf_file: {short(m.gguf_file)} not found in {clip(m.name)}")
    elif not HUB_ID.match(m.name):
        problems.append(f"model.name: {short(m.name)} is neither an existing directory nor a Hub id (org/name)")
    if m.gguf_file is not None and m.quantization != "none":
        problems.append("model.gguf_file and model.quantization: a GGUF checkpoint is dequantised on load; "
                        "it cannot also be loaded through bitsandbytes")


CHAT_TEMPLATE_SUFFIXES = (".jinja", ".j2")


def _check_data(r, problems: list[str]) -> None:
    d = r.data
    if (d.dataset is None) == (d.train_file is None):
        problems.append("data: set exactly one of data.dataset (Hub id or directory) and data.train_file")
    evals = [k for k in ("eval_split", "eval_file", "eval_fraction") if getattr(d, k) is not None]
    if len(evals) > 1:
        problems.append(f"data: {' and '.join('data.' + k for k in evals)} exclude each other; pick one eval source")
    if d.eval_split is not None and d.dataset is None:
        problems.append("data.eval_split needs data.dataset; with local files use data.eval_file")
    for key in ("train_file", "eval_file"):
        value = getattr(d, key)
        for item in [value] if isinstance(value, str) else value or []:
            path = resolve_path(item)
            if path.suffix not in FILE_SUFFIXES:
                problems.append(f"data.{key}: {clip(item)}: unsupported file type {short(path.suffix)}; "
                                f"use one of {', '.join(sorted(FILE_SUFFIXES))}")
            elif not _is_file(path):
                problems.append(f"data.{key}: file not found: {clip(item)}")
    if d.dataset is not None and _is_pathlike(d.dataset) and not _exists(resolve_path(d.dataset)):
        problems.append(f"data.dataset: local dataset not found: {clip(d.dataset)}")
    allowed = FORMAT_COLUMNS[d.format]
    for key in d.columns:
        if key not in allowed:
            problems.append(f"data.columns.{_key(key)}: format {d.format} reads {', '.join(allowed)}"
                            f"{_did_you_mean(key, allowed)}")
    if d.completion_only_loss and d.format not in COMPLETION_FORMATS:
        problems.append(f"data.completion_only_loss: format {d.format} has no completion; "
                        f"it applies to {', '.join(COMPLETION_FORMATS)}")
    if d.format == "classification":
        if r.task != "sequence_classification":
            problems.append(f"data.format classification needs task: sequence_classification (got {r.task})")
        if d.target == "score" and d.num_labels not in (None, 1):
            problems.append(f"data.num_labels: {d.num_labels} with data.target score (regression has one output)")
    elif r.task == "sequence_classification":
        problems.append(f"task sequence_classification needs data.format classification (got {d.format})")
    if d.format == "instruction" and "{instruction}" not in d.instruction_template:
        problems.append("data.instruction_template must contain {instruction}")
    if d.chat_template_path is not None:
        path = resolve_path(d.chat_template_path)
        if d.format != "chat":
            problems.append(f"data.chat_template_path applies to format chat (got {d.format})")
        elif path.suffix not in CHAT_TEMPLATE_SUFFIXES:
            problems.append(f"data.chat_template_path: {clip(d.chat_template_path)} is not a chat template file "
                            f"({' or '.join(CHAT_TEMPLATE_SUFFIXES)})")
        elif not _is_file(path):
            problems.append(f"data.chat_template_path: file not found: {clip(d.chat_template_path)}")


def _check_packing(r, problems: list[str]) -> None:
    d = r.data
    if not (d.packing or d.padding_free):
        return
    if d.format == "classification":
        problems.append("data.packing / data.padding_free apply to causal-LM formats "
                        "(text, prompt_completion, instruction, chat)")
        return
    from tam_hf.finetune.sft import packing_problems  # imports TRL: only for recipes that pack

    problems += packing_problems(d.packing, d.padding_free, r.model.attn_implementation)


def _check_finetune(r, problems: list[str]) -> None:
    f, q = r.finetune, r.model.quantization
    if f.method == "full":
        if f.lora is not None:
            problems.append("finetune.lora is set but finetune.method is full; remove it or use lora/qlora")
        if q != "none":
            problems.append(f"model.quantization {q} with finetune.method full: quantized weights cannot be "
                            "trained directly; use finetune.method qlora (or lora on 8bit)")
        if r.hub.artifact is not None:
            problems.append("hub.artifact applies to lora/qlora; full fine-tuning pushes the whole model")
    elif f.method == "qlora" and q != "4bit":
        problems.append(f"finetune.method qlora needs a 4-bit base, but model.quantization is {q}")
    elif f.method == "lora" and q == "4bit":
        problems.append("lora on a 4-bit base is qlora: set finetune.method: qlora")


def _check_eval(r, problems: list[str]) -> None:
    from tam_hf.finetune.hf_metrics import metric_problems, parse_metric

    target = _target(r.task, r.data)
    named = []  # built-in, evaluate:NAME or a metric script: hf_metrics loads the last two and checks their inputs
    for metric in r.eval.metrics:
        if metric not in METRIC_TASKS:
            if parse_metric(metric).kind in ("hub", "local"):
                named.append(metric)
                continue
            problems.append(f"eval.metrics: unknown metric {short(metric)}{_did_you_mean(metric, METRIC_TASKS)}; "
                            f"known: {', '.join(METRIC_TASKS)}, or evaluate:NAME[/CONFIG], or a metric script")
            continue
        named.append(metric)
        if (r.task, target) not in METRIC_TASKS[metric]:
            problems.append(f"eval.metrics: {metric} does not apply to task {r.task}"
                            + (f" with data.target {target}" if target else ""))
    problems += metric_problems(named, r.task)
    # On causal LM, exact_match and evaluate metrics score answers generated for the evaluation prompts.
    generated = [m for m in r.eval.metrics if m == "exact_match"
                 or (r.task == "causal_lm" and m not in METRIC_TASKS and parse_metric(m).kind in ("hub", "local"))]
    if generated and r.data.format not in ("prompt_completion", "instruction"):
        problems.append(f"eval.metrics: {', '.join(map(short, generated))} score(s) answers generated for evaluation "
                        f"prompts and need prompt_completion or instruction data (got {r.data.format})")
    if r.eval.answer_pattern is not None:
        try:
            groups = re.compile(r.eval.answer_pattern).groups
        except re.error as exc:
            problems.append(f"eval.answer_pattern: {short(r.eval.answer_pattern)} is not a regular expression ({exc})")
        else:
            if groups < 1:
                problems.append(f"eval.answer_pattern: {short(r.eval.answer_pattern)} needs a group, "
                                "e.g. '####\\s*(\\S+)'")
        if "exact_match" not in r.eval.metrics:
            problems.append("eval.answer_pattern is set but eval.metrics has no exact_match")
    has_eval = any(getattr(r.data, k) is not None for k in ("eval_split", "eval_file", "eval_fraction"))
    if not has_eval and r.eval.metrics:
        problems.append("eval.metrics are set but there is no evaluation data: set data.eval_file, "
                        "data.eval_split or data.eval_fraction (or eval.metrics: [])")
    if r.eval.lm_eval is not None:
        if r.task != "causal_lm":
            problems.append(f"eval.lm_eval evaluates a language model: it needs task causal_lm (got {r.task})")
        else:
            from tam_hf.finetune.lm_eval import check_available, task_problems

            missing = check_available()
            # Task names cost one build of lm-eval's task index (5-15 s, once per process); YAML paths nothing.
            problems += [missing] if missing else task_problems(r.eval.lm_eval.tasks)


def _check_hub(r, problems: list[str]) -> None:
    h = r.hub
    if h.push and not h.repo_id:
        problems.append("hub.push is true but hub.repo_id is not set")
    if h.repo_id is not None and not re.match(r"^[\w.-]+/[\w.-]+$", h.repo_id):
        problems.append(f"hub.repo_id: {short(h.repo_id)} must look like user/name")
    if r.finetune.method == "qlora" and h.artifact == "merged":
        problems.append("hub.artifact merged with qlora: merging into a 4-bit base is lossy; push the adapter")
