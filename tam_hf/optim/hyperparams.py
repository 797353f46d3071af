"""The TAM optimizers' constructor arguments and the checks of their values, without torch.

Each optimizer's arguments are declared once here, as :class:`Arguments`: the classes of ``tam.py`` and
``tam8bit.py`` take their ``__init__`` signature from them (so ``inspect.signature``, ``help()`` and
``typing.get_type_hints`` see the real arguments), and the registry reads their names, types and defaults and runs
their checks to validate a recipe or ``--optim_args`` without importing torch.

:func:`variant_init` builds the ``__init__`` of a variant optimizer (a subclass that fixes, re-defaults or adds
arguments) from its base's signature, for classes declared outside this module.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
import sys
import typing
from typing import Any, Callable, Iterable, Optional

__all__ = ["Arguments", "variant_init", "TAM_ARGS", "ADATAM_ARGS", "ADATAMW_ARGS", "ADATAM8BIT_ARGS", "ADATAMW8BIT_ARGS", "COSINE_SCOPES",
           "MOMENT_DTYPES", "BLOCK_SIZES", "BITSANDBYTES_INSTALL", "check_block_size",
           "check_path_options"]

COSINE_SCOPES = ("tensor", "global")
# exp_avg / exp_avg_sq / momentum_buffer dtype: "auto" = float32 for 16-bit parameters on the fused GPU path
# (where 16-bit moments lose the update) and the parameter's dtype elsewhere, as torch.optim; "float32" = at
# least float32 everywhere; "param" = the parameter's dtype everywhere (half the state memory for 16-bit
# parameters, at a precision cost: in bfloat16, v = beta2 v + (1 - beta2) g^2 moves by less than half an ulp
# unless g^2 > ~3 v, so v stops decaying).
MOMENT_DTYPES = ("auto", "float32", "param")
BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # the block sizes bitsandbytes documents
BITSANDBYTES_INSTALL = "pip install bitsandbytes"

Check = Callable[[dict], None]


class Arguments:
    """A constructor's arguments (``self`` left out) and the checks of their values.

    :meth:`init` turns a body ``__init__(self, **arguments)`` into the constructor: it binds the caller's
    arguments to :attr:`signature` (a ``TypeError`` naming the class, as Python's own), applies the defaults, runs
    the checks (``ValueError``) and calls the body with every argument by keyword."""

    def __init__(self, signature: inspect.Signature, checks: tuple[Check, ...] = ()):
        self.signature = signature
        self.checks = checks

    @classmethod
    def of(cls, fn: Callable, *checks: Check) -> "Arguments":
        """The arguments of ``fn`` (its first one, ``self``, left out if named so), annotations resolved."""
        hints = typing.get_type_hints(fn)
        params = [q.replace(annotation=hints.get(q.name, q.annotation))
                  for q in inspect.signature(fn).parameters.values() if q.name != "self"]
        return cls(inspect.Signature(params), checks)

    def variant(self, *, fixed: Optional[dict] = None, defaults: Optional[dict] = None,
                extra: Optional[dict] = None, check: Optional[Check] = None) -> "Arguments":
        """These arguments less ``fixed`` (name -> the value the variant passes itself), with other ``defaults``,
        plus ``extra`` keyword-only ones (name -> ``(type, default)``). ``check`` runs first, then these
        arguments' checks on the values with the fixed ones filled in."""
        fixed, defaults, extra = fixed or {}, defaults or {}, extra or {}
        params = [q.replace(default=defaults.get(q.name, q.default))
                  for q in self.signature.parameters.values() if q.name not in fixed]
        params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
                   for name, (kind, default) in extra.items()]
        base = self

        def check_base(values: dict) -> None:
            base.check({**values, **fixed})

        checks = ((check,) if check else ()) + ((check_base,) if self.checks else ())
        return Arguments(inspect.Signature(params), checks)

    @property
    def hints(self) -> dict[str, Any]:
        return {n: q.annotation for n, q in self.signature.parameters.items()
                if q.annotation is not inspect.Parameter.empty}

    def bind(self, owner: str, args: tuple = (), kwargs: Optional[dict] = None) -> dict[str, Any]:
        """Every argument by name, defaults applied; a ``TypeError`` as Python's, naming ``owner``."""
        try:
            bound = self.signature.bind(*args, **(kwargs or {}))
        except TypeError as e:
            raise TypeError(f"{owner}() {e}") from None
        bound.apply_defaults()
        return dict(bound.arguments)

    def check(self, values: dict) -> None:
        for check in self.checks:
            check(values)

    def init(self, body: Callable) -> Callable:
        """Decorator: ``body(self, **every_argument)`` becomes the constructor; see the class docstring."""
        signature = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                                       *self.signature.parameters.values()])

        @functools.wraps(body, assigned=("__module__", "__name__", "__qualname__", "__doc__"), updated=())
        def __init__(self_, *args: Any, **kwargs: Any) -> None:
            values = self.bind(__init__.__qualname__, args, kwargs)
            self.check(values)
            body(self_, **values)

        __init__.__signature__ = signature
        __init__.__annotations__ = self.hints
        return __init__


def variant_init(base_init: Callable, *, fixed: Optional[dict] = None, defaults: Optional[dict] = None,
                 extra: Optional[dict] = None) -> Callable:
    """Decorator for the ``__init__`` of a variant optimizer (AdaTAMW is AdaTAM with decoupled weight decay
    fixed and ``weight_decay`` 0.01; the 8-bit classes add two arguments), so every argument list is written once.

    The decorated ``__init__`` is called with every argument by keyword (the variant's defaults applied);
    ``fixed`` arguments are gone from its signature and the body passes them on itself; ``extra`` maps new
    keyword-only arguments to ``(type, default)``. The signature and annotations are the real ones, so
    ``inspect.signature`` / ``typing.get_type_hints`` (the optimizer registry, ``--optim_args``) and
    ``help()`` see the variant's arguments, and a wrong name is a ``TypeError`` as for any constructor. The
    values are checked by the base's constructor, which the body calls."""
    return Arguments.of(base_init).variant(fixed=fixed, defaults=defaults, extra=extra).init


# ------------------------------------------------------------------------------------------------ checks


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _finite_non_negative(x) -> bool:
    # inf passes 0 <= x and turns the weights to NaN a few steps later; NaN fails the comparison
    return 0.0 <= x and math.isfinite(x)


def check_path_options(cosine_scope, foreach, fused) -> None:
    """Also run by the functional API, which takes these three but no learning rate to check."""
    _check(cosine_scope in COSINE_SCOPES,
           f"Invalid cosine_scope value: {cosine_scope!r} (expected one of {COSINE_SCOPES})")
    _check(not (foreach and fused), "foreach and fused cannot both be True")


def _check_common(v: dict) -> None:
    lr = v["lr"]
    torch = sys.modules.get("torch")  # a Tensor can only come from a process that imported torch
    if torch is not None and isinstance(lr, torch.Tensor):
        raise ValueError("lr as a Tensor is not supported; pass a float")
    _check(_finite_non_negative(lr), f"Invalid learning rate: {lr}")
    _check(0.0 <= v["decay_rate"] < 1.0, f"Invalid decay_rate value: {v['decay_rate']}")
    _check(_finite_non_negative(v["damping_eps"]), f"Invalid damping_eps value: {v['damping_eps']}")
    _check(_finite_non_negative(v["weight_decay"]), f"Invalid weight_decay value: {v['weight_decay']}")
    check_path_options(v["cosine_scope"], v["foreach"], v["fused"])
    fixed_damping = v["fixed_damping"]
    _check(fixed_damping is None or 0.0 <= fixed_damping <= 1.0, f"Invalid fixed_damping value: {fixed_damping}")
    _check(v["moment_dtype"] in MOMENT_DTYPES,
           f"Invalid moment_dtype value: {v['moment_dtype']!r} (expected one of {MOMENT_DTYPES})")


def _check_tam(v: dict) -> None:
    _check_common(v)
    _check(0.0 <= v["momentum"] < 1.0, f"Invalid momentum value: {v['momentum']}")


def _check_adatam(v: dict) -> None:
    _check_common(v)
    betas = v["betas"]
    _check(len(betas) == 2, f"Invalid betas: {betas}")
    _check(0.0 <= betas[0] < 1.0, f"Invalid beta parameter at index 0: {betas[0]}")
    _check(0.0 <= betas[1] < 1.0, f"Invalid beta parameter at index 1: {betas[1]}")
    _check(_finite_non_negative(v["eps"]), f"Invalid epsilon value: {v['eps']}")


def _check_8bit(v: dict) -> None:
    # Before the values, as the constructor's first act: the install command, not a step-time failure.
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"the 8-bit AdaTAM optimizers need bitsandbytes: {BITSANDBYTES_INSTALL} "
                          "(No module named 'bitsandbytes')")
    size = v["min_8bit_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"Invalid min_8bit_size value: {size!r} (a non-negative int)")
    check_block_size(v["block_size"])


def check_block_size(block_size) -> None:
    """Also run for each param group of an 8-bit optimizer, which may set its own."""
    _check(block_size in BLOCK_SIZES, f"Invalid block_size value: {block_size!r} (expected one of {BLOCK_SIZES})")


# ---------------------------------------------------------------------------------------- declarations
#
# The signatures below are the constructors' (``self`` left out): positions, names, types and defaults.


def _tam(
    self,
    params: Iterable,
    lr: float,
    momentum: float = 0.9,
    decay_rate: float = 0.9,
    damping_eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
    foreach: Optional[bool] = None, cosine_scope: str = "tensor", fused: Optional[bool] = None,
    fixed_damping: Optional[float] = None,
    moment_dtype: str = "auto",
): ...


def _adatam(
    self,
    params: Iterable,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    decay_rate: float = 0.9,
    damping_eps: float = 1e-8,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
    foreach: Optional[bool] = None,
    cosine_scope: str = "tensor",
    fused: Optional[bool] = None,
    fixed_damping: Optional[float] = None,
    decoupled_weight_decay: bool = False,
    bias_correction: bool = False,
    moment_dtype: str = "auto",
): ...


TAM_ARGS = Arguments.of(_tam, _check_tam)
ADATAM_ARGS = Arguments.of(_adatam, _check_adatam)
# AdaTAMW: decoupled weight decay fixed, weight_decay 0.01 as in torch.optim.AdamW.
ADATAMW_ARGS = ADATAM_ARGS.variant(fixed={"decoupled_weight_decay": True}, defaults={"weight_decay": 1e-2})
# The 8-bit moments are uint8 codes or float32, so moment_dtype has no say there.
ADATAM8BIT_ARGS = ADATAM_ARGS.variant(fixed={"moment_dtype": "auto"}, extra={"min_8bit_size": (int, 4096),
                                                                    "block_size": (int, 256)}, check=_check_8bit)
ADATAMW8BIT_ARGS = ADATAM8BIT_ARGS.variant(fixed={"decoupled_weight_decay": True}, defaults={"weight_decay": 1e-2})
