"""From ``TrainingArguments`` to a TAM optimizer class and its keyword arguments, read from the optimizer registry
(:mod:`tam_hf.optim.registry`): ``--optim`` may name any of its TAM entries (``registry.torque_names()``).

Where each constructor argument comes from:

* the keys the registry feeds from ``TrainingArguments`` (:meth:`OptimizerSpec.training_args_keys`): ``lr`` <-
  ``--learning_rate``, ``weight_decay`` <- ``--weight_decay`` (the Trainer still puts biases and norms in a group
  with weight decay 0); AdaTAM(W): ``betas`` <- ``--adam_beta1/--adam_beta2``, ``eps`` <- ``--adam_epsilon``,
  exactly as for AdamW; TAM: ``momentum`` <- ``--adam_beta1`` (the same coefficient as AdaTAM's beta1; the
  default 0.9 is the paper's). Naming one of them in ``--optim_args`` is an error that points to its field, so
  one setting never has two sources.
* every other key the registry accepts (:meth:`OptimizerSpec.accepted_keys`: ``decay_rate``, ``damping_eps``,
  ``cosine_scope``, ``maximize``, ...) comes from ``--optim_args "key=value,..."``, converted to the type the
  constructor declares (or, unannotated, the type of its default). The values are then checked by the
  constructor itself (:meth:`OptimizerSpec.check`), so a bad value fails with its own message.

A switch to another optimizer mid-run (TAM as a warm-up, :mod:`tam_hf.optim.switch`) travels in ``--optim_args``
too, as ``switch_to=NAME,switch_at_step=K[,switch_lr=LR]``: these keys never reach a constructor; with them the
class returned is :class:`~tam_hf.optim.switch.SwitchOptimizer`, which builds both optimizers.

Every problem is reported at once, in one :class:`OptimArgsError` naming the keys and listing the valid ones.
After ``register()`` that happens when ``TrainingArguments`` is built; ``python -m tam_hf.run`` turns it into
one line on stderr and exit status 2, like any argparse error.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Callable, Optional, Union

from tam_hf.optim import registry
from tam_hf.optim.registry import OptimizerSpec

__all__ = ["OptimArgsError", "torque_spec", "settable_keys", "parse_optim_args", "optimizer_cls_and_kwargs",
           "check_optim_args", "SWITCH_KEYS", "split_switch"]

# --optim_args keys of a switch (tam_hf.optim.switch) -> the SwitchOptimizer argument and its type.
SWITCH_KEYS = {"switch_to": ("to", str), "switch_at_step": ("at_step", int), "switch_lr": ("lr", float)}


class OptimArgsError(ValueError):
    """Bad ``--optim`` / ``--optim_args`` settings for a TAM optimizer (a ``ValueError``)."""


def optim_name(optim) -> str:
    """``TrainingArguments.optim`` (an ``OptimizerNames`` member or a string) as a plain string."""
    return str(getattr(optim, "value", optim))


def torque_spec(optim) -> Optional[OptimizerSpec]:
    """The registry entry when ``optim`` names a TAM optimizer, else None."""
    spec = registry.OPTIMIZERS.get(optim_name(optim))
    return spec if spec is not None and spec.torque else None


def settable_keys(spec: OptimizerSpec) -> dict[str, Any]:
    """Key -> declared type for what ``--optim_args`` may set: the accepted keys minus the ones
    ``TrainingArguments`` feeds. Unannotated keys take the type of their default."""
    fed = spec.training_args_keys()
    defaults = spec.defaults()
    out = {}
    for key, annotation in spec.accepted_keys().items():
        if key in fed:
            continue
        if annotation is Any and defaults.get(key) is not None:
            annotation = type(defaults[key])
        out[key] = annotation
    return out


def _to_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false)")


_CONVERTERS: dict[type, Callable[[str], Any]] = {bool: _to_bool, int: int, float: float, str: str}


def _convert(text: str, annotation) -> Any:
    """One --optim_args value as the type the constructor declares (Optional[X] also takes 'none')."""
    if annotation is Any:
        return text
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if text in choices:
            return text
        raise ValueError(f"{text!r} is not one of {', '.join(map(repr, choices))}")
    options = typing.get_args(annotation) if origin in (Union, types.UnionType) else (annotation,)
    if type(None) in options and text.lower() == "none":
        return None
    for option in options:
        if option in _CONVERTERS:
            try:
                return _CONVERTERS[option](text)
            except ValueError:
                hint = " (true/false)" if option is bool else ""
                raise ValueError(f"{text!r} is not a valid {option.__name__}{hint}") from None
    raise ValueError(f"type {annotation} cannot be set from --optim_args")


def _fields(spec: OptimizerSpec, key: str) -> str:
    return " / ".join(f"--{f}" for f in spec.training_args_keys()[key])


def _problems(spec: OptimizerSpec, optim_args: Optional[str]) -> tuple[dict[str, Any], list[str]]:
    settable = settable_keys(spec)
    fed = spec.training_args_keys()
    kwargs: dict[str, Any] = {}
    errors: list[str] = []
    for item in (optim_args or "").replace(" ", "").split(","):
        if not item:
            continue
        key, sep, text = item.partition("=")
        if not sep or not key:
            errors.append(f"{item!r} is not key=value")
        elif key in fed:
            errors.append(f"{key!r} is set by {_fields(spec, key)}, not --optim_args")
        elif key not in settable:
            close = difflib.get_close_matches(key, list(settable), n=1)
            errors.append(f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        else:
            try:
                kwargs[key] = _convert(text, settable[key])
            except ValueError as e:
                errors.append(f"{key}: {e}")
    return kwargs, errors


def _raise(what: str, spec: OptimizerSpec, errors: list[str]) -> None:
    valid = ", ".join(sorted(settable_keys(spec)))
    raise OptimArgsError(f"{what} for --optim {spec.name}: " + "; ".join(errors) + f". Valid --optim_args keys: {valid}")


def parse_optim_args(name: str, optim_args: Optional[str]) -> dict[str, Any]:
    """Typed kwargs from ``"key=value,key=value"`` for the TAM optimizer ``name``, values not yet checked by the
    constructor. Raises :class:`OptimArgsError` listing every problem and the valid keys."""
    spec = registry.get(name)
    kwargs, errors = _problems(spec, optim_args)
    if errors:
        _raise(f"invalid --optim_args {optim_args!r}", spec, errors)
    return kwargs


def split_switch(optim_args: Optional[str]) -> tuple[str, dict[str, Any], list[str]]:
    """(``optim_args`` without the ``switch_*`` keys, the SwitchOptimizer arguments they give, their problems)."""
    rest, switch, errors = [], {}, []
    for item in (optim_args or "").replace(" ", "").split(","):
        key, sep, text = item.partition("=")
        if key not in SWITCH_KEYS:
            rest.append(item)
            continue
        name, kind = SWITCH_KEYS[key]
        try:
            switch[name] = _convert(text, kind)
        except ValueError as e:
            errors.append(f"{key}: {e}")
    if switch and "to" not in switch:
        errors.append("switch_to is missing: a switch names the optimizer to continue with")
    if switch:
        switch.setdefault("at_step", None)  # missing: switch_problems says what it must be
    return ",".join(rest), switch, errors


def optimizer_cls_and_kwargs(args) -> tuple[type, dict[str, Any]]:
    """The class and kwargs ``args.optim`` / ``args.optim_args`` ask for, in the shape of the Trainer's
    ``get_optimizer_cls_and_kwargs``. Raises :class:`OptimArgsError` on any bad setting, the constructor's
    range checks included. With ``switch_*`` keys: :class:`~tam_hf.optim.switch.SwitchOptimizer` and its
    arguments (the first optimizer's kwargs as ``first_kwargs``)."""
    spec = torque_spec(args.optim)
    if spec is None:
        raise OptimArgsError(f"--optim {optim_name(args.optim)} is not a TAM optimizer "
                             f"({', '.join(registry.torque_names())})")
    kwargs = spec.kwargs_from_training_args(args)
    rest, switch, errors = split_switch(args.optim_args)
    parsed, more = _problems(spec, rest)
    errors += more
    kwargs.update(parsed)
    if errors:
        _raise(f"invalid --optim_args {args.optim_args!r}", spec, errors)
    try:
        spec.check(kwargs)
    except (TypeError, ValueError) as e:  # a range check on an --optim_args value or a TrainingArguments field
        _raise("invalid optimizer settings", spec, [str(e)])
    if not switch:
        return spec.cls, kwargs
    from tam_hf.optim.switch_rules import switch_problems

    problems = switch_problems(spec.name, switch["to"], switch["at_step"], switch.get("lr"), kwargs["lr"])
    if problems:
        names = {v[0]: k for k, v in SWITCH_KEYS.items()} | {"first_lr": "--learning_rate"}
        _raise("invalid switch", spec, [f"{names[field]}: {text}" for field, text in problems])
    from tam_hf.optim.switch import SwitchOptimizer

    return SwitchOptimizer, {"first": spec.name, "first_kwargs": kwargs, **switch}


def check_optim_args(args) -> None:
    """Raise :class:`OptimArgsError` when ``args.optim`` names a TAM optimizer and its settings are bad; nothing
    for other optimizers. What ``register()`` runs at the end of ``TrainingArguments.__post_init__``."""
    if torque_spec(args.optim) is not None:
        optimizer_cls_and_kwargs(args)
