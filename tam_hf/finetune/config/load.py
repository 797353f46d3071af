"""The recipe: one YAML file describes a whole fine-tuning run.

Loading is strict and eager, in four steps, before any model or dataset is touched (a typo costs seconds
rather than an hour of training):

1. **parse**: each section is checked against its pydantic model (:mod:`tam_hf.finetune.config.schema`):
   unknown keys (with a did-you-mean that also names the section a misplaced key belongs to), types, ranges,
   nan/inf anywhere. ``optimizer`` is checked against the optimizer registry (its keys are the chosen
   constructor's arguments; their values are checked by the registry's ``check``), ``training`` against
   ``TrainingArguments``' fields (:mod:`tam_hf.finetune.config.training`, without importing transformers).
2. **defaults** that depend on another setting (:func:`tam_hf.finetune.config.resolve.fill_defaults`).
3. **cross-check** (:mod:`tam_hf.finetune.config.checks`): settings that exclude or need each other, files and
   directories that must exist (or be creatable: nothing is created here).
4. **resolve** the paths (:func:`tam_hf.finetune.config.resolve.resolve_paths`): the returned recipe holds the
   paths to open, so nothing downstream resolves again.

Every problem of every step is collected and raised once as a :class:`~tam_hf.finetune.errors.RecipeError`; a
check that reads a section that failed step 1 is skipped rather than reported twice. YAML is read by a
``yaml.SafeLoader`` subclass (:mod:`tam_hf.finetune.config.yaml_io`): plain data only, no duplicate keys, bounded
nesting and alias expansion. Messages quote at most a short prefix of a bad value.
"""

from __future__ import annotations

import functools
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BeforeValidator, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from tam_hf.finetune.config.checks import cross_check, switch_section_problems
from tam_hf.finetune.config.messages import did_you_mean, explain, key_text, model_of, non_finite, suggest
from tam_hf.finetune.config.resolve import fill_defaults, is_task_path, portable, probe, resolve_path, resolve_paths
from tam_hf.finetune.config.schema import STRICT, TRAINING_OWNED, Float, LMEvalConfig, OptimizerConfig, Recipe
from tam_hf.finetune.config.training import parse_training, training_fields
from tam_hf.finetune.config.yaml_io import MAX_DEPTH, clip, describe, dump_yaml, read_yaml, short
from tam_hf.finetune.errors import RecipeError

__all__ = ["load_recipe", "read_recipe_file", "validate_recipe", "apply_overrides", "to_dict", "to_yaml",
           "rerun_yaml", "RUN_ONLY", "key_places", "lm_eval_section"]


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override, validate, resolve. Raises RecipeError listing every problem."""
    path = Path(path)
    raw = read_recipe_file(path)
    problems = apply_overrides(raw, overrides)
    return validate_recipe(raw, name=path.stem, source=str(path), problems=problems)


def read_recipe_file(path: str | Path) -> dict:
    """The plain mapping a recipe file holds, read through :func:`read_yaml` (the safe loader); nothing is
    validated yet. Raises RecipeError when the file is missing, unreadable, not YAML or not a mapping."""
    path = Path(path)
    if not probe(path, Path.is_file):
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
        fill_defaults(sections, name)
        cross_check(sections, problems)
    if problems:
        raise RecipeError(problems, source)
    resolve_paths(sections)
    return Recipe.model_validate(sections)


def to_dict(recipe: Recipe) -> dict:
    return recipe.model_dump()


def to_yaml(recipe: Recipe) -> str:
    """The recipe as YAML that reloads to the same values (paths into the package written as embedded:)."""
    return dump_yaml(portable(to_dict(recipe)))


def lm_eval_section(settings: dict, source: str) -> LMEvalConfig:
    """An ``eval.lm_eval`` section on its own (the eval command: a run's settings and the command line's),
    checked and with its task files resolved. Raises RecipeError."""
    try:
        cfg = LMEvalConfig.model_validate(settings)
    except ValidationError as exc:
        raise RecipeError(explain(exc, ("eval", "lm_eval"), LMEvalConfig), source) from None
    cfg.tasks = [str(resolve_path(t)) if is_task_path(t) else t for t in cfg.tasks]
    return cfg


# Keys about what one run does with its output directory: a recipe written for others to rerun leaves them out.
RUN_ONLY = ("resume", "overwrite")


def rerun_yaml(recipe: Recipe) -> str:
    """The recipe as a file to rerun from (the copy a run writes into its output directory, the Hub's copy):
    every default filled in, without :data:`RUN_ONLY`, so that running it neither continues nor wipes a run."""
    return dump_yaml(portable({k: v for k, v in to_dict(recipe).items() if k not in RUN_ONLY}))


@functools.cache
def key_places() -> dict[str, tuple[str, ...]]:
    """Every key a recipe knows -> the dotted paths it stands at (``output_dir`` -> ``training.output_dir``), for
    the did-you-mean of a key in the wrong place. Training fields owned by another section point there."""
    from tam_hf.optim.registry import OPTIMIZERS, get

    places: dict[str, list[str]] = {}

    def add(key: str, path: str) -> None:
        if path not in places.setdefault(key, []):
            places[key].append(path)

    def walk(model, prefix: str) -> None:
        for key, info in model.model_fields.items():
            add(key, prefix + key)
            inner = model_of(info.annotation)
            if inner is not None and key not in ("optimizer",):
                walk(inner, f"{prefix}{key}.")

    walk(Recipe, "")
    for key in training_fields():
        if key not in TRAINING_OWNED:
            add(key, f"training.{key}")
    for key, owner in TRAINING_OWNED.items():
        if "*" not in owner and " " not in owner:
            add(key, owner)
    for name in OPTIMIZERS:
        for key in get(name).accepted_keys():
            add(key, f"optimizer.{key}")
    return {k: tuple(v) for k, v in places.items()}


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
            problems.append(f"{key_text(key)}: unknown key{suggest(key, fields, key_places())}")
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
        problems += explain(exc, (name,), Recipe.model_fields[name].annotation, places=key_places)
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
    return TypeAdapter(tp) if model_of(tp) is tp else TypeAdapter(tp, config=STRICT)


def _parse_training(name: str, raw, problems: list[str]):
    if not isinstance(raw, dict):
        return _parse_plain(name, raw, problems)
    parsed = parse_training(raw, problems, key_places)
    return _INVALID if parsed is None else parsed


def _any_optimizer_takes(key: str) -> bool:
    # Asked only for a key this optimizer does not take: reading torch's optimizers' signatures imports torch.
    from tam_hf.optim.registry import OPTIMIZERS

    return any(key in _optimizer_spec(name).accepted_keys() for name in OPTIMIZERS)


def _parse_optimizer(name: str, raw, problems: list[str]):
    """``name`` must be in the registry; every other key must be an argument of that optimizer's constructor,
    of the type it declares; the values are then checked once, by the registry's ``check`` (its own messages)."""
    from tam_hf.optim.registry import OPTIMIZERS

    if not isinstance(raw, dict):
        return _parse_plain(name, raw, problems)
    before = len(problems)
    try:
        OptimizerConfig.model_validate({k: raw[k] for k in ("name", "lr") if k in raw})
    except ValidationError as exc:
        problems += explain(exc, ("optimizer",), OptimizerConfig)
    spec = _optimizer_spec(raw.get("name"))
    if spec is None and isinstance(raw.get("name"), str):
        choices = [*OPTIMIZERS, *(a for s in OPTIMIZERS.values() for a in s.aliases)]
        problems.append(f"optimizer.name: {short(raw['name'])} is not one of {', '.join(map(repr, OPTIMIZERS))}"
                        f"{did_you_mean(raw['name'], choices)}")
    if spec is None:
        return _INVALID
    accepted = spec.accepted_keys()
    settings = {}
    problems += switch_section_problems(spec.name, raw.get("lr"), raw.get("switch"))
    for key, value in raw.items():
        if key in ("name", "lr", "switch") or (value is None and (key in accepted or _any_optimizer_takes(key))):
            continue  # null = unset; resolved recipes of earlier releases list every optimizer's keys as null
        takes = f"{spec.name} takes {', '.join(accepted)}"
        if key not in accepted:
            problems.append(f"optimizer.{key_text(key)} does not apply to {spec.name} (it takes {', '.join(accepted)})"
                            if _any_optimizer_takes(key) else
                            f"optimizer.{key_text(key)}: unknown key{suggest(key, accepted, key_places(), 'optimizer')}"
                            f"; {takes}")
            continue
        setting_type, free = _setting_adapter(accepted[key])
        try:
            settings[key] = _plain(setting_type.validate_python(value))
        except ValidationError as exc:
            problems += explain(exc, ("optimizer", key), None)
        else:
            if free:
                problems += non_finite(value, f"optimizer.{key}")
    if len(problems) > before:
        return _INVALID
    config = OptimizerConfig.model_validate({"name": raw["name"], "lr": raw["lr"], "switch": raw.get("switch"),
                                             **settings})
    try:
        spec.check(config.kwargs())
    except (ValueError, TypeError, RuntimeError) as exc:
        problems.append(f"optimizer: {clip(exc, 160)} ({spec.class_name})")
        return _INVALID
    return config


def _optimizer_spec(name):
    from tam_hf.optim.registry import get

    if not isinstance(name, str):
        return None
    try:
        return get(name)
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


def _parse_stages(name: str, raw, problems: list[str]):
    from tam_hf.finetune.config.stage_rules import parse_stages

    if raw is None:
        return None
    parsed = parse_stages(raw, problems, key_places)
    return _INVALID if parsed is None else parsed


_PARSERS = {"optimizer": _parse_optimizer, "training": _parse_training, "stages": _parse_stages}
