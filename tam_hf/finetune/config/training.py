"""The ``training:`` section: ``transformers.TrainingArguments`` fields, checked without importing transformers
(importing it costs seconds; validating a YAML file needs none of it).

The fields and their annotations are read with ``ast`` from transformers' own ``training_args.py``, found with
``importlib.util.find_spec`` (which imports nothing); should that file stop declaring the dataclass in one plain
class, the fields are read from the imported class instead. Checked here: the key is a field and not owned by
another section, int/float/bool/str fields (optionally None) have that type and the range of
:data:`~tam_hf.finetune.config.schema.TRAINING_RANGES`, free-form values hold no nan/inf. TrainingArguments'
own cross-field checks (``__post_init__``) run when a run starts, before anything loads.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping, Optional, Sequence

from pydantic import AfterValidator, BaseModel, Field, ValidationError, create_model
from pydantic_core import PydanticCustomError

from tam_hf.finetune.config.messages import explain, non_finite
from tam_hf.finetune.config.schema import STRICT, TRAINING_OWNED, TRAINING_RANGES, Float

__all__ = ["training_fields", "parse_training"]

_SIMPLE = {"int": int, "float": Float, "bool": bool, "str": str}


def _source_file() -> Path | None:
    spec = importlib.util.find_spec("transformers")
    locations = list(spec.submodule_search_locations or ()) if spec is not None else []
    path = Path(locations[0]) / "training_args.py" if locations else None
    return path if path is not None and path.is_file() else None


def _members(node: ast.expr) -> list[str] | None:
    """The members of an annotation written ``A | B`` or ``Optional[A]`` / ``Union[A, B]``, as source text."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        left, right = _members(node.left), _members(node.right)
        return None if left is None or right is None else left + right
    if isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("Optional", "typing.Optional"):
        return [ast.unparse(node.slice), "None"]
    if isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("Union", "typing.Union"):
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        return [ast.unparse(i) for i in items]
    return [ast.unparse(node)]


def _simple(annotation: ast.expr) -> Any:
    """int/float/bool/str (optionally None) annotations are checked here; richer ones (enums, unions, dicts)
    are left to TrainingArguments itself."""
    members = [m for m in _members(annotation) or [] if m not in ("None", "NoneType")]
    return _SIMPLE.get(members[0], Any) if len(members) == 1 else Any


def _init_false(value: ast.expr | None) -> bool:
    return isinstance(value, ast.Call) and any(
        k.arg == "init" and isinstance(k.value, ast.Constant) and k.value.value is False for k in value.keywords)


def _from_source(path: Path) -> dict[str, Any] | None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainingArguments"]
    if len(found) != 1 or found[0].bases:  # inherited fields would be missed: ask the class itself
        return None
    fields = {}
    for node in found[0].body:
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and "ClassVar" not in ast.unparse(node.annotation) and not _init_false(node.value)):
            fields[node.target.id] = _simple(node.annotation)
    return fields or None


def _from_class() -> dict[str, Any]:
    import dataclasses
    import types
    import typing

    from transformers import TrainingArguments

    out = {}
    for f in dataclasses.fields(TrainingArguments):
        if f.init:
            tp = f.type
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
                tp = args[0]
            out[f.name] = {int: int, float: Float, bool: bool, str: str}.get(tp, Any) if isinstance(tp, type) else Any
    return out


@functools.cache
def training_fields() -> dict[str, Any]:
    """Every ``TrainingArguments`` field a constructor takes -> its recipe type (int, Float, bool, str, or Any
    for the free-form ones), owned fields included."""
    path = _source_file()
    return (_from_source(path) if path is not None else None) or _from_class()


def _steps(value: int) -> int:
    if value != -1 and value < 1:
        raise PydanticCustomError("recipe_range", "{value} must be -1 (no limit) or > 0", {"value": value})
    return value


@functools.cache
def _training_model() -> tuple[type[BaseModel], frozenset[str]]:
    """(a pydantic model of the TrainingArguments fields a recipe may set, the names of its free-form fields)."""
    fields, free = {}, set()
    for name, tp in training_fields().items():
        if name in TRAINING_OWNED:
            continue
        if name == "max_steps":
            tp = Annotated[int, AfterValidator(_steps)]
        if tp is Any:
            free.add(name)
        fields[name] = (Optional[tp], Field(None, **TRAINING_RANGES.get(name, {})))
    return create_model("TrainingArgumentsSection", __config__=STRICT, **fields), frozenset(free)


def parse_training(raw: dict, problems: list[str], places: Callable[[], Mapping[str, Sequence[str]]]) -> dict | None:
    """The section with numbers YAML 1.1 read as text (``1e-4``) made numbers; None (problems appended) when a
    key is unknown, owned by another section, of the wrong type, out of range or not finite."""
    model, free = _training_model()
    before = len(problems)
    for key in raw:
        if key in TRAINING_OWNED:
            problems.append(f"training.{key}: set {TRAINING_OWNED[key]} instead")
    checked = {k: v for k, v in raw.items() if k not in TRAINING_OWNED}
    try:
        validated = model.model_validate(checked)
    except ValidationError as exc:
        problems += explain(exc, ("training",), model, unknown="not a TrainingArguments field", places=places)
        validated = None
    for key in free.intersection(checked):
        problems += non_finite(checked[key], f"training.{key}")
    if len(problems) > before:
        return None
    out = dict(raw)
    for key, value in raw.items():  # `1e-4` read by YAML 1.1 as text becomes the number; ints stay ints
        if isinstance(value, str) and isinstance(getattr(validated, key), (int, float)):
            out[key] = getattr(validated, key)
    return out
