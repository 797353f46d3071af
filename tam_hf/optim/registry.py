"""The one table of the optimizers tam_hf offers: TAM's and the torch references the recipes and ``compare`` use.

Everything that lists optimizers reads :data:`OPTIMIZERS`: recipe validation (``optimizer.name`` and the keys it
may set), ``--optim`` registration with transformers, ``--optim_args`` parsing, the Trainer handler, the arms
of ``tam-finetune compare`` and the distributed checks. Adding an optimizer is one :func:`add` call here.

Each entry knows:

* ``name``: the recipe's ``optimizer.name``; for TAM optimizers also the ``--optim`` value registered with
  transformers. ``hf_optim`` is the ``TrainingArguments.optim`` value a recipe run uses (``adamw_torch`` for
  torch's AdamW).
* ``family``: ``"adam"`` or ``"sgd"``. It says which ``TrainingArguments`` fields feed the constructor (see
  :data:`TRAINING_ARGS_FIELDS`) and which reference the learning rate transfers from (:meth:`OptimizerSpec.lr_factor`).
* ``torque``: a TAM optimizer (damping statistics, telemetry, sharded statistics under ZeRO/FSDP2).
* the keys a user may set and their check: for TAM optimizers the torch-free declarations of
  :mod:`tam_hf.optim.hyperparams` (``arguments``), which are the constructors' own; for any other class its
  constructor's signature, and its values checked by building it once (:meth:`OptimizerSpec.accepted_keys`,
  :meth:`OptimizerSpec.check`).
* the class: given, or named ``"module:qualname"`` and imported on first use of :attr:`OptimizerSpec.cls`.

Imports neither torch nor the optimizers: validating a recipe or ``--optim_args`` of a TAM optimizer needs
neither; a torch reference or a user class imports torch when its keys are asked for.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from tam_hf.optim.hyperparams import (
    ADATAM8BIT_ARGS, ADATAM_ARGS, ADATAMW8BIT_ARGS, ADATAMW_ARGS, TAM_ARGS, Arguments,
)

__all__ = ["OptimizerSpec", "OPTIMIZERS", "TRAINING_ARGS_FIELDS", "MEAN_DAMPING", "add", "get", "torque_names"]

# E[d] with noisy gradients: the divisor of the learning-rate transfer rule (README, "The algorithm, and the
# learning rate to use").
MEAN_DAMPING = 0.5

# Per family: constructor key -> the TrainingArguments field(s) that feed it. These keys are never taken from
# --optim_args, so one setting has one source.
TRAINING_ARGS_FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    "adam": {
        "lr": ("learning_rate",),
        "betas": ("adam_beta1", "adam_beta2"),
        "eps": ("adam_epsilon",),
        "weight_decay": ("weight_decay",),
    },
    "sgd": {
        "lr": ("learning_rate",),
        "momentum": ("adam_beta1",),  # TAM's m = beta1 m + (d + eps_d) g: the same coefficient as AdaTAM's beta1
        "weight_decay": ("weight_decay",),
    },
}

# Constructor arguments that select a code path or are internal, never a recipe setting.
_NOT_SETTINGS = ("params", "foreach", "fused", "differentiable", "capturable")


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer tam_hf offers; see the module docstring."""

    name: str
    target: Union[type, str]  # the class, or "module:qualname" imported on first use of .cls
    family: str
    torque: bool
    hf_optim: str | None = None  # TrainingArguments.optim for recipe runs; None: the same as name
    help: str = ""
    aliases: tuple[str, ...] = field(default=())
    arguments: Optional[Arguments] = None  # torch-free declaration of the constructor; None: read the class
    # Keys whose TrainingArguments field the optimizer's transformers handler does not read (transformers' SGD
    # takes momentum from --optim_args only): they travel in optim_args.
    optim_args_keys: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if self.family not in TRAINING_ARGS_FIELDS:
            raise ValueError(f"family must be one of {tuple(TRAINING_ARGS_FIELDS)}, got {self.family!r}")
        if isinstance(self.target, str) and ":" not in self.target:
            raise ValueError(f"target must be a class or 'module:qualname', got {self.target!r}")

    @property
    def cls(self) -> type:
        """The optimizer class (imported now when named by a string)."""
        return _resolve(self.target) if isinstance(self.target, str) else self.target

    @property
    def class_name(self) -> str:
        """The class's name, without importing it."""
        return self.target.rsplit(".", 1)[-1].rsplit(":", 1)[-1] if isinstance(self.target, str) else \
            self.target.__name__

    @property
    def optim(self) -> str:
        """The ``TrainingArguments.optim`` value."""
        return self.hf_optim or self.name

    def _signature(self) -> tuple[inspect.Signature, dict[str, Any]]:
        if self.arguments is not None:
            return self.arguments.signature, self.arguments.hints
        return inspect.signature(self.cls), _type_hints(self.cls)

    def accepted_keys(self) -> dict[str, Any]:
        """Constructor keyword -> declared type, for every setting a recipe or ``--optim_args`` may give
        (``lr`` included; code-path switches such as ``foreach``/``fused`` excluded)."""
        signature, hints = self._signature()
        return {n: hints.get(n, Any) for n in signature.parameters if n not in _NOT_SETTINGS}

    def defaults(self) -> dict[str, Any]:
        """The constructor's defaults for :meth:`accepted_keys` (keys without a default are absent)."""
        params = self._signature()[0].parameters
        return {n: params[n].default for n in self.accepted_keys() if params[n].default is not inspect.Parameter.empty}

    def training_args_keys(self) -> dict[str, tuple[str, ...]]:
        """Constructor key -> TrainingArguments fields, for the keys this optimizer accepts."""
        accepted = self.accepted_keys()
        return {k: v for k, v in TRAINING_ARGS_FIELDS[self.family].items()
                if k in accepted and k not in self.optim_args_keys}

    def kwargs_from_training_args(self, args) -> dict[str, Any]:
        """Constructor kwargs taken from a ``TrainingArguments`` (``--optim_args`` not included)."""
        out = {}
        for key, fields in self.training_args_keys().items():
            values = tuple(getattr(args, f) for f in fields)
            out[key] = values if len(values) > 1 else values[0]
        return out

    def check(self, kwargs: dict[str, Any]) -> None:
        """Check ``kwargs`` as the constructor does, with its own messages: a bad value is a ``ValueError``, an
        unknown key a ``TypeError``. TAM optimizers run their declared checks; any other class is built once on a
        dummy tensor."""
        if self.arguments is not None:
            self.arguments.check(self.arguments.bind(f"{self.class_name}.__init__", ([],), kwargs))
            return
        import torch

        self.cls([torch.zeros(1, requires_grad=True)], **kwargs)

    def lr_factor(self, kwargs: dict[str, Any] | None = None) -> float:
        """This optimizer's learning rate relative to its family's reference (AdamW, SGD-momentum) by the
        steady-state transfer rule: AdaTAM ``(1 - beta1) / E[d]``, TAM ``1 / E[d]``, references 1."""
        if not self.torque:
            return 1.0
        if self.family == "sgd":
            return 1.0 / MEAN_DAMPING
        betas = (kwargs or {}).get("betas") or self.defaults().get("betas", (0.9, 0.999))
        return (1.0 - betas[0]) / MEAN_DAMPING


def _resolve(target: str) -> type:
    module, qualname = target.split(":", 1)
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations (e.g. torch's own under postponed evaluation): fall back
        return {n: p.annotation for n, p in inspect.signature(cls).parameters.items()
                if p.annotation is not inspect.Parameter.empty and not isinstance(p.annotation, str)}


OPTIMIZERS: dict[str, OptimizerSpec] = {}


def add(spec: OptimizerSpec) -> OptimizerSpec:
    """Add (or replace) one entry. Names added after ``tam_hf.register()`` reach ``--optim`` on its next call."""
    OPTIMIZERS[spec.name] = spec
    return spec


def get(name: str) -> OptimizerSpec:
    """The entry for ``name`` (an alias works too); a ``ValueError`` with a did-you-mean otherwise."""
    if name in OPTIMIZERS:
        return OPTIMIZERS[name]
    for spec in OPTIMIZERS.values():
        if name in spec.aliases:
            return spec
    close = difflib.get_close_matches(str(name), list(OPTIMIZERS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown optimizer {name!r}{hint}; known: {', '.join(OPTIMIZERS)}")


def torque_names() -> tuple[str, ...]:
    """The TAM optimizers' names (what ``register()`` adds to ``--optim``)."""
    return tuple(n for n, s in OPTIMIZERS.items() if s.torque)


add(OptimizerSpec("tam", "tam_hf.optim.tam:TAM", "sgd", torque=True, arguments=TAM_ARGS,
                  help="TAM, the SGD form (about 2x an SGD-momentum lr)"))
add(OptimizerSpec("adatam", "tam_hf.optim.tam:AdaTAM", "adam", torque=True, arguments=ADATAM_ARGS,
                  help="AdaTAM, coupled weight decay (about 0.2x AdamW's lr)"))
add(OptimizerSpec("adatamw", "tam_hf.optim.tam:AdaTAMW", "adam", torque=True, arguments=ADATAMW_ARGS,
                  help="AdaTAMW, decoupled weight decay (about 0.2x AdamW's lr)"))
add(OptimizerSpec("adatam_8bit", "tam_hf.optim.tam8bit:AdaTAM8bit", "adam", torque=True, arguments=ADATAM8BIT_ARGS,
                  help="AdaTAM with 8-bit moments (bitsandbytes; about 0.2x AdamW's lr; DDP only, not ZeRO/FSDP2)"))
add(OptimizerSpec("adatamw_8bit", "tam_hf.optim.tam8bit:AdaTAMW8bit", "adam", torque=True,
                  arguments=ADATAMW8BIT_ARGS,
                  help="AdaTAMW with 8-bit moments (bitsandbytes; about 0.2x AdamW's lr; DDP only, not ZeRO/FSDP2)"))
add(OptimizerSpec("adamw", "torch.optim:AdamW", "adam", torque=False, hf_optim="adamw_torch",
                  help="torch AdamW, the reference"))
add(OptimizerSpec("sgd", "torch.optim:SGD", "sgd", torque=False, hf_optim="sgd", optim_args_keys=("momentum",),
                  help="torch SGD with momentum, the reference"))
