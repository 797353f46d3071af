"""Which optimizer switches tam_hf supports and the settings of the second optimizer, without torch.

Read by the recipe's checks (``optimizer.switch``), ``--optim_args switch_*`` parsing and
:class:`tam_hf.optim.switch.SwitchOptimizer`, so that a switch is refused with the same words everywhere before
anything is built. The conversion of the state itself is in :mod:`tam_hf.optim.switch`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from tam_hf.optim import registry

__all__ = ["SWITCHES", "supported_text", "pair_problem", "switch_problems", "default_lr", "second_kwargs"]

# first optimizer -> the optimizers it may hand its state to. Each pair has a derived conversion of the first
# moment (tam_hf.optim.switch); another pair would need its own, so it is refused rather than guessed.
SWITCHES: dict[str, tuple[str, ...]] = {"adatamw": ("adamw",), "adatam": ("adamw",), "tam": ("sgd",)}

# Constructor keys the second optimizer inherits from the first when it takes them: the family's shared settings
# (TrainingArguments feeds both from the same fields) and the direction of optimisation.
_INHERITED = ("betas", "eps", "weight_decay", "momentum", "maximize")


def supported_text() -> str:
    return ", ".join(f"{a} -> {b}" for a, tos in SWITCHES.items() for b in tos)


def pair_problem(first: str, to: str) -> Optional[str]:
    """Why ``first`` cannot switch to ``to`` (either may be an alias), or None."""
    try:
        first_name = registry.get(first).name
    except ValueError:
        first_name = first
    try:
        to_name = registry.get(to).name
    except ValueError as exc:
        return f"{exc}"
    if to_name not in SWITCHES.get(first_name, ()):
        return f"{first_name} -> {to_name} is not a supported switch; supported: {supported_text()}"
    return None


def switch_problems(first: str, to: Any, at_step: Any, lr: Any, first_lr: Any) -> list[tuple[str, str]]:
    """(field, problem) for a switch of ``first`` (lr ``first_lr``) to ``to`` at step ``at_step`` with ``lr``
    (None: the transfer rule). Fields: ``to``, ``at_step``, ``lr``, ``first_lr``. Every problem at once."""
    out = []
    if not isinstance(to, str):
        out.append(("to", f"expected an optimizer name, got {to!r}"))
    else:
        problem = pair_problem(first, to)
        if problem:
            out.append(("to", problem))
    if isinstance(at_step, bool) or not isinstance(at_step, int) or at_step < 1:
        out.append(("at_step", f"{at_step!r} must be an int >= 1 (the optimizer steps taken before the switch)"))
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)
                           or lr <= 0):
        out.append(("lr", f"{lr!r} must be a finite number > 0 (or unset: the transfer rule)"))
    if isinstance(first_lr, bool) or not isinstance(first_lr, (int, float)) or not first_lr > 0:
        out.append(("first_lr", f"a switch needs the first optimizer's lr > 0 (got {first_lr!r}): the second "
                                "optimizer's lr follows the schedule as lr_now * switch_lr / lr"))
    return out


def default_lr(first: str, first_kwargs: dict, to: str) -> float:
    """The transfer rule: ``lr_to = lr_from / lr_factor(from) * lr_factor(to)`` (AdaTAM(W) -> AdamW: x 0.5 / (1 -
    beta1), 5x at beta1 = 0.9; TAM -> SGD-momentum: x 0.5)."""
    a, b = registry.get(first), registry.get(to)
    return first_kwargs["lr"] / a.lr_factor(first_kwargs) * b.lr_factor()


def second_kwargs(first: str, first_kwargs: dict, to: str, lr: Optional[float]) -> dict:
    """The second optimizer's constructor kwargs: ``lr`` (the transfer rule when None) and the settings of the
    first that it also takes (betas, eps, weight_decay, momentum, maximize). Weight decay carries by value:
    AdaTAM's coupled L2 becomes AdamW's decoupled decay at the same coefficient."""
    accepted = registry.get(to).accepted_keys()
    values = {**registry.get(first).defaults(), **first_kwargs}  # TAM's momentum 0.9 is SGD's 0 when unset
    out = {k: values[k] for k in _INHERITED if k in values and k in accepted}
    out["lr"] = default_lr(first, first_kwargs, to) if lr is None else lr
    return out

