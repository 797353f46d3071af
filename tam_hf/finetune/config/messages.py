"""Recipe problems in the recipe's words: one line per pydantic error (the dotted path, then what is wrong),
did-you-mean suggestions, non-finite numbers inside free-form values.

An unknown key is matched against every key the recipe knows, in every section (:func:`suggest`): a key set in
the wrong place (``output_dir`` at the top level, ``model.max_length``) names the place it belongs
(``training.output_dir``, ``data.max_length``); a misspelt one its close match.
"""

from __future__ import annotations

import difflib
import math
import typing
from typing import Callable, Literal, Mapping, Sequence

from pydantic import BaseModel, ValidationError

from tam_hf.finetune.config.yaml_io import short

__all__ = ["explain", "path_text", "key_text", "model_of", "did_you_mean", "suggest", "non_finite"]

_EXPECTED = {"int_type": "int", "int_parsing": "int", "int_from_float": "int", "float_type": "float",
             "float_parsing": "float", "bool_type": "bool", "bool_parsing": "bool", "string_type": "str",
             "list_type": "a list", "tuple_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
             "model_attributes_type": "a mapping"}
_BOUNDS = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
           "less_than_equal": ("<=", "le")}


def explain(exc: ValidationError, where: tuple, root, unknown: str = "unknown key",
            places: Callable[[], Mapping[str, Sequence[str]]] = dict) -> list[str]:
    """One line per pydantic error: the dotted path, then what is wrong in the recipe's words. ``places()``:
    every key the recipe knows -> its dotted paths, for the did-you-mean of an unknown key (:func:`suggest`)."""
    out = []
    for err in exc.errors(include_url=False):
        loc, kind, value, ctx = err["loc"], err["type"], err.get("input"), err.get("ctx") or {}
        path = path_text(where + tuple(loc))
        if kind == "missing":
            info = _field_at(root, loc)
            help_text = f" ({info.description})" if info and info.description else ""
            out.append(f"{path}: required key is missing{help_text}")
        elif kind == "extra_forbidden":
            here = path_text(where + tuple(loc[:-1]))
            out.append(f"{path}: {unknown}{suggest(loc[-1], _names_at(root, loc[:-1]), places(), here)}")
        elif kind == "literal_error":
            choices = _literal_at(root, loc)
            out.append(f"{path}: {short(value)} is not one of {', '.join(map(repr, choices))}"
                       f"{did_you_mean(str(value), [str(c) for c in choices])}")
        elif kind == "invalid_key":
            out.append(f"{path_text(where + tuple(loc[:-1]))}: key {short(loc[-1])} is not a string")
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


def path_text(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else ("." if text else "") + key_text(part)
    return text


def key_text(key) -> str:
    key = str(key)
    return key if len(key) <= 60 else key[:57] + "..."


def model_of(tp):
    """The pydantic model a (possibly Optional / Annotated) annotation holds, else None."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in typing.get_args(tp):
        found = model_of(arg) if not isinstance(arg, (str, int, float)) else None
        if found is not None:
            return found
    return None


def _field_at(root, loc: tuple):
    info = None
    for part in loc:
        model = model_of(root)
        if model is None or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        root = info.annotation
    return info


def _names_at(root, loc: tuple) -> list[str]:
    info = _field_at(root, loc) if loc else None
    model = model_of(info.annotation if info else root)
    return list(model.model_fields) if model else []


def _literal_at(root, loc: tuple) -> tuple:
    info = _field_at(root, loc)
    tp = info.annotation if info else None
    for candidate in (tp, *typing.get_args(tp)):
        if typing.get_origin(candidate) is Literal:
            return typing.get_args(candidate)
    return ()


def did_you_mean(word, options) -> str:
    word = str(word)
    if len(word) > 100:
        return ""
    close = difflib.get_close_matches(word, [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def suggest(word, options, places: Mapping[str, Sequence[str]], here: str = "") -> str:
    """The did-you-mean of an unknown key ``word`` in section ``here`` ('' for the top level), whose own keys are
    ``options``: the same key in another section first (it was put in the wrong place), else a close match in
    this section, else a close match anywhere, as its dotted path."""
    word = str(word)
    if len(word) > 100:
        return ""
    elsewhere = [p for p in places.get(word, ()) if p.rpartition(".")[0] != here]
    if elsewhere:
        return f" (did you mean {' or '.join(map(repr, elsewhere[:3]))}?)"
    own = did_you_mean(word, options)
    if own:
        return own
    close = difflib.get_close_matches(word, list(places), n=1, cutoff=0.75)
    paths = [p for p in places.get(close[0], ()) if p.rpartition(".")[0] != here] if close else []
    return f" (did you mean {' or '.join(map(repr, paths[:3]))}?)" if paths else ""


def non_finite(value, where: str) -> list[str]:
    """Every nan/inf inside a free-form value (dicts and lists walked without recursion)."""
    out, stack = [], [(where, value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            out.append(f"{path}: {item!r} is not a finite number")
        elif isinstance(item, dict):
            stack += reversed([(f"{path}.{key_text(k)}", v) for k, v in item.items()])
        elif isinstance(item, (list, tuple)):
            stack += reversed([(f"{path}[{i}]", v) for i, v in enumerate(item)])
    return out
