"""From ``TrainingArguments`` to a TAM optimizer class and its keyword arguments.

One table (``OPTIMIZERS``) names the optimizers ``--optim`` may choose; ``TAMTrainer`` and the handler that
``tam_hf.trainer.register()`` installs both read it, so a stock script and TAMTrainer build the same optimizer.

Where each constructor argument comes from:

* ``lr`` <- ``--learning_rate``; ``weight_decay`` <- ``--weight_decay`` (the Trainer still puts biases and
  norms in a group with weight decay 0); AdaTAM(W): ``betas`` <- ``--adam_beta1/--adam_beta2``, ``eps`` <-
  ``--adam_epsilon``, exactly as for AdamW. These keys are refused in ``--optim_args`` so that one setting
  never has two sources.
* TAM: ``momentum`` <- ``--adam_beta1``. It is the same coefficient as AdaTAM's beta1 (``m = beta1 * m +
  (d + eps_d) * g`` in both), and the default 0.9 is the paper's. ``--optim_args momentum=...`` overrides it,
  as ``--optim sgd --optim_args momentum=...`` does for SGD.
* Everything else (``decay_rate``, ``damping_eps``, ``cosine_scope``, ``maximize``, ``foreach``, ``fused``,
  ``decoupled_weight_decay``) comes from ``--optim_args "key=value,..."``, converted to the type the
  constructor declares. The values are then checked by constructing the optimizer once on a dummy tensor,
  so a bad value fails with the constructor's own message before any training step.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch

from tam_hf.optim import TAM, AdaTAM, AdaTAMW

__all__ = ["OPTIMIZERS", "TorqueChoice", "optimizer_cls_and_kwargs", "parse_optim_args"]


def _adam_like(args) -> dict[str, Any]:
    return {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "weight_decay": args.weight_decay,
    }


def _sgd_like(args) -> dict[str, Any]:
    return {"lr": args.learning_rate, "momentum": args.adam_beta1, "weight_decay": args.weight_decay}


@dataclass(frozen=True)
class TorqueChoice:
    """One ``--optim`` value: the class it builds and the kwargs it takes from ``TrainingArguments``."""

    name: str
    cls: type
    from_training_args: Callable[[Any], dict[str, Any]]


OPTIMIZERS: dict[str, TorqueChoice] = {
    c.name: c
    for c in (
        TorqueChoice("tam", TAM, _sgd_like),
        TorqueChoice("adatam", AdaTAM, _adam_like),
        TorqueChoice("adatamw", AdaTAMW, _adam_like),
    )
}

# Keys owned by a TrainingArguments field; naming them in --optim_args is an error that points there.
_FROM_TRAINING_ARGS = {
    "lr": "--learning_rate",
    "betas": "--adam_beta1 / --adam_beta2",
    "eps": "--adam_epsilon",
    "weight_decay": "--weight_decay",
}


def _to_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false)")


_CONVERTERS: dict[type, Callable[[str], Any]] = {bool: _to_bool, int: int, float: float, str: str}


def _convert(text: str, annotation) -> Any:
    """Convert one --optim_args value to the type the constructor declares (Optional[X] also takes 'none')."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) is Union else (annotation,)
    if type(None) in options and text.lower() == "none":
        return None
    for option in options:
        if option in _CONVERTERS:
            try:
                return _CONVERTERS[option](text)
            except ValueError:
                raise ValueError(f"{text!r} is not a valid {option.__name__}") from None
    raise ValueError(f"type {annotation} cannot be set from --optim_args")


def _settable(cls: type) -> dict[str, Any]:
    """Constructor parameters --optim_args may set, with their declared types."""
    hints = typing.get_type_hints(cls.__init__)
    names = [n for n in inspect.signature(cls).parameters if n != "params" and n not in _FROM_TRAINING_ARGS]
    return {n: hints.get(n, str) for n in names}


def parse_optim_args(name: str, optim_args: str | None) -> dict[str, Any]:
    """Typed kwargs from ``"key=value,key=value"`` for optimizer ``name``; every problem is reported at once,
    with the list of valid keys, as a ``ValueError``."""
    choice = OPTIMIZERS[name]
    settable = _settable(choice.cls)
    valid = ", ".join(sorted(settable))
    kwargs: dict[str, Any] = {}
    errors: list[str] = []
    for item in (optim_args or "").replace(" ", "").split(","):
        if not item:
            continue
        key, sep, text = item.partition("=")
        if not sep or not key:
            errors.append(f"{item!r} is not key=value")
        elif key in _FROM_TRAINING_ARGS:
            errors.append(f"{key!r} is set by {_FROM_TRAINING_ARGS[key]}, not --optim_args")
        elif key not in settable:
            errors.append(f"unknown key {key!r}")
        else:
            try:
                kwargs[key] = _convert(text, settable[key])
            except ValueError as e:
                errors.append(f"{key}: {e}")
    if errors:
        raise ValueError(
            f"Invalid --optim_args {optim_args!r} for --optim {name}: " + "; ".join(errors) + f". Valid keys: {valid}"
        )
    return kwargs


def optimizer_cls_and_kwargs(args) -> tuple[type, dict[str, Any]]:
    """The class and kwargs ``--optim`` / ``--optim_args`` ask for, in the shape Trainer's
    ``get_optimizer_cls_and_kwargs`` returns. Raises ``ValueError`` before training on any bad setting."""
    name = str(getattr(args.optim, "value", args.optim))
    choice = OPTIMIZERS[name]
    kwargs = choice.from_training_args(args)
    kwargs.update(parse_optim_args(name, args.optim_args))
    try:  # the constructor's own range checks, now rather than at the first step
        choice.cls([torch.zeros(1, requires_grad=True)], **kwargs)
    except ValueError as e:
        valid = ", ".join(sorted(_settable(choice.cls)))
        raise ValueError(f"Invalid optimizer settings for --optim {name}: {e}. Valid --optim_args keys: {valid}") from e
    return choice.cls, kwargs
