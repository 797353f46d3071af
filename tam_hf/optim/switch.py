r"""Switching optimizer mid-run: train with a TAM optimizer for ``at_step`` steps, then continue with its reference
(AdaTAMW/AdaTAM -> AdamW, TAM -> SGD-momentum), the state handed over in the new optimizer's convention.

:class:`SwitchOptimizer` is ONE ``torch.optim.Optimizer`` for the Trainer, accelerate, the LR scheduler and
checkpoints: it steps the first optimizer until ``at_step`` steps are done, converts the state at the start of
the next step and steps the second from then on. Its ``param_groups`` are its own: the scheduler scales their
``lr`` as for any optimizer, and each step hands the active optimizer the group's lr (before the switch) or
``lr / lr_from * lr_to`` (after), so the second optimizer follows the same schedule at its own scale. Its
``state_dict`` holds which optimizer is active, the step count and the active optimizer's own state dict, so a
resume after the switch continues with the second optimizer. ``.optimizer`` is the active one (how tam_hf
unwraps optimizers): TAM's damping telemetry is there before the switch and absent after.

The handover, derived from the steady state of each recursion. AdaTAM's first moment is an un-normalised sum,
:math:`m_t = \beta_1 m_{t-1} + (d_t + \epsilon_d) g_t`, so with the damping d roughly constant
:math:`m_t \approx (d + \epsilon_d) \sum_i \beta_1^{t-i} g_i`; AdamW's is an average,
:math:`e_t = \beta_1 e_{t-1} + (1 - \beta_1) g_t = (1 - \beta_1) \sum_i \beta_1^{t-i} g_i`, bias-corrected by
:math:`1 - \beta_1^t`. Hence

.. math::
    e_K = (1 - \beta_1)\, m_K / \max(d_K + \epsilon_d,\ d_{\min}), \qquad d_K = (1 + s_K) / 2

with the tensor's current damping. Dividing by d (rather than taking :math:`(1 - \beta_1) m`) gives the
gradient average AdamW would hold had it seen the same gradients; without it the first AdamW steps would be
d times (about half) too short, and the EMA would take ~1/(1 - beta1) steps to forget it. d varies over time, so
the current value is an estimate of the weights inside m; the cosine's average s and the momentum have similar
horizons (1/(1 - gamma), 1/(1 - beta1): 10 steps at the defaults), and whatever error remains fades with the
EMA within ~1/(1 - beta1) steps. ``d_min`` (:data:`DAMPING_FLOOR`) keeps a tensor whose momentum has been
opposing its gradients (d near 0, m decayed) from being blown up. ``exp_avg_sq`` follows the same recursion in
both (:math:`v = \beta_2 v + (1 - \beta_2) g^2`) and carries as is; AdamW's ``step`` continues at the tensor's
AdaTAM step count, so its bias corrections are the ones its own recursions from zero need (v at K = 100 still
holds only :math:`1 - 0.999^{100} \approx 0.1` of its weight: AdamW divides it out, as it would have).

TAM -> SGD-momentum (dampening 0): SGD's buffer is :math:`b = \mu b + g \approx \sum_i \mu^{t-i} g_i`, TAM's
:math:`m \approx (d + \epsilon_d) \sum_i \mu^{t-i} g_i`, so :math:`b_K = m_K / \max(d_K + \epsilon_d, d_{\min})`.
TAM's statistic ``s`` stays out of the new state (the first optimizer's state is dropped at the switch).

The default lr of the second optimizer is the registry's transfer rule
(:func:`tam_hf.optim.switch_rules.default_lr`): at d = 0.5, the value the rule assumes, and a late switch the step
right after the switch equals the step before it. Early on it does not: AdaTAM has no bias correction, so its steps
are :math:`(1 - \beta_1^K) / \sqrt{1 - \beta_2^K}` times AdamW's (4.5x at K = 50, 2.0x at K = 300), and the step
drops by that factor at the switch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from tam_hf.optim import registry
from tam_hf.optim.switch_rules import second_kwargs, switch_problems

__all__ = ["SwitchOptimizer", "DAMPING_FLOOR", "convert_state", "find_switch", "switch_summary"]

DAMPING_FLOOR = 0.05


def _divisor(entry: dict, group: dict) -> float:
    d = (1.0 + float(entry["s"])) / 2.0 + group["damping_eps"]
    return max(d, DAMPING_FLOOR)


def convert_state(kind: str, p: Tensor, entry: dict, group: dict) -> dict:
    """The second optimizer's state for ``p`` from the first's ``entry`` (group: the first's param group).
    ``kind``: ``"adam"`` (AdaTAM(W) -> AdamW) or ``"sgd"`` (TAM -> SGD); see the module docstring."""
    if kind == "adam":
        coeff = (1.0 - group["betas"][0]) / _divisor(entry, group)
        return {"step": torch.tensor(float(entry["step"]), dtype=torch.float32),
                "exp_avg": torch.mul(entry["exp_avg"], coeff).to(p.dtype),
                "exp_avg_sq": entry["exp_avg_sq"].to(p.dtype, copy=True)}
    return {"momentum_buffer": torch.mul(entry["momentum_buffer"], 1.0 / _divisor(entry, group)).to(p.dtype)}


class SwitchOptimizer(Optimizer):
    """``first`` (a registry name, built with ``first_kwargs``) for ``at_step`` steps, then ``to`` (its lr
    ``lr``, default the transfer rule; the other shared settings inherited, see
    :func:`~tam_hf.optim.switch_rules.second_kwargs`). See the module docstring."""

    supports_sharded_statistics = False  # the ZeRO/FSDP wrappers rewrite param groups the inner ones do not see

    def __init__(self, params, *, first: str, to: str, at_step: int, lr: Optional[float] = None,
                 first_kwargs: Optional[dict] = None):
        first_kwargs = dict(first_kwargs or {})
        a, b = registry.get(first), registry.get(to)
        first_lr = first_kwargs.setdefault("lr", a.defaults().get("lr"))
        problems = switch_problems(a.name, b.name, at_step, lr, first_lr)
        if problems:
            raise ValueError(f"SwitchOptimizer {a.name} -> {b.name}: "
                             + "; ".join(f"{field}: {text}" for field, text in problems))
        kwargs = second_kwargs(a.name, first_kwargs, b.name, lr)
        super().__init__(params, {"lr": first_lr})
        self.names = (a.name, b.name)
        self.at_step = at_step
        self.kind = "sgd" if a.family == "sgd" else "adam"
        self.first = a.cls(self._inner_groups(), **first_kwargs)
        self.second = b.cls(self._inner_groups(), **kwargs)
        self.lrs = (first_lr, kwargs["lr"])
        self.steps = 0
        self.switched = False

    def _inner_groups(self) -> list[dict]:
        # Per-group settings (the Trainer's weight_decay 0 for biases and norms) reach both optimizers; lr is
        # handed over at every step.
        return [{k: v for k, v in g.items() if k not in ("lr", "initial_lr")} for g in self.param_groups]

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "second"):
            for inner in (self.first, self.second):
                inner.add_param_group({k: v for k, v in self.param_groups[-1].items() if k != "initial_lr"})

    @property
    def optimizer(self) -> Optimizer:
        """The optimizer that takes the next step (the one before the switch until it happens)."""
        return self.second if self.switched else self.first

    @property
    def switched_at_step(self) -> Optional[int]:
        return self.at_step if self.switched else None

    def _switch(self) -> None:
        for group, new_group in zip(self.first.param_groups, self.second.param_groups):
            for p in group["params"]:
                entry = self.first.state.get(p)
                if entry:
                    self.second.state[p] = convert_state(self.kind, p, entry, group)
        self.first.state.clear()  # TAM's s and moments: nothing reads them after the switch
        self.switched = True

    def step(self, closure=None):
        if not self.switched and self.steps >= self.at_step:
            self._switch()
        active = self.optimizer
        for outer, inner in zip(self.param_groups, active.param_groups):
            # lr / lr_from * lr_to: exactly lr_to while the schedule is at its peak (ratio 1.0)
            inner["lr"] = outer["lr"] / self.lrs[0] * self.lrs[1] if self.switched else outer["lr"]
        loss = active.step(closure)
        self.steps += 1
        return loss

    # ------------------------------------------------------------------------------------------ state dicts

    def state_dict(self) -> dict:
        out = super().state_dict()  # the outer param groups: lr and initial_lr as the scheduler left them
        out["switch"] = {"first": self.names[0], "to": self.names[1], "at_step": self.at_step, "steps": self.steps,
                         "active": "to" if self.switched else "first", "optimizer": self.optimizer.state_dict()}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("switch") if isinstance(state_dict, dict) else None
        mine = f"{self.names[0]}>{self.names[1]}@{self.at_step}"
        if not isinstance(saved, dict):
            raise ValueError(f"SwitchOptimizer ({mine}).load_state_dict: the state was not saved by a "
                             "SwitchOptimizer (no 'switch' entry)")
        theirs = f"{saved.get('first')}>{saved.get('to')}@{saved.get('at_step')}"
        if theirs != mine:
            raise ValueError(f"SwitchOptimizer ({mine}).load_state_dict: the state was saved by {theirs}")
        switched = saved["active"] == "to"
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        (self.second if switched else self.first).load_state_dict(saved["optimizer"])
        (self.first if switched else self.second).state.clear()
        self.switched, self.steps = switched, int(saved["steps"])


def find_switch(optimizer) -> Optional[SwitchOptimizer]:
    """The SwitchOptimizer inside accelerate's (and other) wrappers, or None."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, SwitchOptimizer):
            return optimizer
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return None


def switch_summary(optimizer) -> Optional[dict]:
    """What a run's summary records of its switch: ``{"from", "to", "at_step", "lr", "switched_at_step"}``
    (``switched_at_step`` None when the run ended before it), or None without a switch."""
    switch = find_switch(optimizer)
    if switch is None:
        return None
    return {"from": switch.names[0], "to": switch.names[1], "at_step": switch.at_step,
            "lr": switch.lrs[1], "switched_at_step": switch.switched_at_step}

