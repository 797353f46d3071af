r"""Torque-Aware Momentum: TAM, AdaTAM and AdaTAMW (Malviya et al., arXiv:2412.18790).

Per parameter tensor with gradient :math:`g_t` (after ``maximize`` and coupled weight decay):

.. math::
    c_t = \frac{\langle m_{t-1}, g_t\rangle}{\lVert m_{t-1}\rVert\,\lVert g_t\rVert}\ (0 \text{ if a norm is } 0),\quad
    s_t = \gamma s_{t-1} + (1-\gamma) c_t,\quad
    d_t = \tfrac{1}{2}(1 + s_t),\quad
    m_t = \beta_1 m_{t-1} + (d_t + \epsilon_d)\, g_t

TAM then steps :math:`p \leftarrow p - \eta m_t`; AdaTAM keeps
:math:`v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2` and steps :math:`p \leftarrow p - \eta\, m_t / (\sqrt{v_t} + \epsilon)`;
AdaTAMW first decays :math:`p \leftarrow p (1 - \eta\lambda)` (decoupled weight decay) instead of adding
:math:`\lambda p` to the gradient. As in the paper there is no bias correction and the first moment is not an
EMA, so AdaTAM wants roughly ``lr_AdamW * (1 - beta1) / E[d]`` (about 0.2x AdamW's learning rate).

The cosine is taken over each whole tensor (``cosine_scope="tensor"``) or over the whole param group
(``"global"``). Statistics are reduced in float64 on the fused path and in at least float32 elsewhere; a
cosine that is not finite (overflowing statistics) counts as 0 and never enters ``s``.

Three code paths sit behind one dispatcher, as in ``torch.optim``: a single-tensor loop, a multi-tensor
``torch._foreach_*`` path, and fused CPU kernels (``fused.py``). The default is fused on CPU when the kernels
compiled, foreach on accelerators, and the single-tensor loop otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from tam_hf.optim import fused as _fused

__all__ = ["TAM", "AdaTAM", "AdaTAMW", "tam", "adatam", "StatsReducer"]

PAPER = "https://arxiv.org/abs/2412.18790"
COSINE_SCOPES = ("tensor", "global")

# Maps the [n_tensors, 3] float64 partial sums (m.g, |m|^2, |g|^2) held by this process to the sums over each
# whole logical tensor. None on a single process; the distributed wiring installs one.
StatsReducer = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class _Rule:
    """The hyperparameters of one update, shared by every code path."""

    adaptive: bool  # AdaTAM(W) when True, TAM when False
    lr: float
    beta1: float  # TAM's momentum
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    maximize: bool
    decay_rate: float
    damping_eps: float
    fixed_damping: Optional[float] = None  # the control arm: d held constant, no cosine
    bias_correction: bool = False  # AdaTAM only: Adam-style correction of both moments (an option, not the paper)
    lr_factor: float = 1.0  # set by at_step() under bias_correction
    eps_factor: float = 1.0

    @property
    def sign(self) -> float:
        return -1.0 if self.maximize else 1.0

    @property
    def coupled_wd(self) -> float:
        return 0.0 if self.decoupled else self.weight_decay

    @property
    def decay(self) -> float:
        return 1.0 - self.lr * self.weight_decay if self.decoupled else 1.0

    @property
    def update_lr(self) -> float:
        """The lr of AdaTAM's p update (decoupled decay keeps the plain lr, as in AdamW)."""
        return self.lr * self.lr_factor

    @property
    def update_eps(self) -> float:
        return self.eps * self.eps_factor

    def at_step(self, t: float) -> "_Rule":
        """Under bias_correction, fold m / (1 - beta1^t) and sqrt(v / (1 - beta2^t)) into lr and eps:
        lr m_hat / (sqrt(v_hat) + eps) = lr sqrt(bc2) / bc1 * m / (sqrt(v) + eps sqrt(bc2))."""
        if not self.bias_correction:
            return self
        bc1, bc2 = 1.0 - self.beta1 ** t, 1.0 - self.beta2 ** t
        return _Rule(**{**self.__dict__, "lr_factor": math.sqrt(bc2) / bc1, "eps_factor": math.sqrt(bc2)})

    def folded(self) -> "_Rule":
        """The rule to apply to a gradient that already carries maximize and coupled weight decay."""
        return _Rule(**{**self.__dict__, "maximize": False, "weight_decay": self.weight_decay * self.decoupled})


# --------------------------------------------------------------------------------------------- validation


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _validate_common(lr, decay_rate, damping_eps, weight_decay, cosine_scope, foreach, fused, fixed_damping) -> None:
    if isinstance(lr, Tensor):
        raise ValueError("lr as a Tensor is not supported; pass a float")
    _check(0.0 <= lr, f"Invalid learning rate: {lr}")
    _check(0.0 <= decay_rate < 1.0, f"Invalid decay_rate value: {decay_rate}")
    _check(0.0 <= damping_eps, f"Invalid damping_eps value: {damping_eps}")
    _check(0.0 <= weight_decay, f"Invalid weight_decay value: {weight_decay}")
    _check(cosine_scope in COSINE_SCOPES, f"Invalid cosine_scope value: {cosine_scope!r} (expected one of {COSINE_SCOPES})")
    _check(not (foreach and fused), "foreach and fused cannot both be True")
    _check(fixed_damping is None or 0.0 <= fixed_damping <= 1.0, f"Invalid fixed_damping value: {fixed_damping}")


# ---------------------------------------------------------------------------------------------- optimizer


class _TorqueOptimizer(Optimizer):
    """Shared machinery: lazy state, path dispatch, damping readout, state_dict dtype care."""

    _buffer_names: tuple[str, ...] = ()

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)
        # Installed by the distributed wiring (DeepSpeed ZeRO / FSDP2); None means tensors are whole here.
        self.stats_reducer: Optional[StatsReducer] = None
        if defaults["fused"]:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.device.type != "cpu" or p.dtype not in _fused.SUPPORTED_DTYPES:
                        raise ValueError(
                            f"fused=True supports CPU float32/float64 parameters only, got {p.dtype} on {p.device}"
                        )
            _fused.load()  # raise now, with the compiler's message, rather than at the first step

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("maximize", False)
            group.setdefault("cosine_scope", "tensor")
            group.setdefault("fixed_damping", None)
        self.__dict__.setdefault("stats_reducer", None)

    def _rule(self, group) -> _Rule:
        raise NotImplementedError

    def _init_state(self, p: Tensor, state: dict) -> None:
        for name in self._buffer_names:
            state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _init_group(self, group):
        params, grads, buffers, s = [], [], [[] for _ in self._buffer_names], []
        group_s = None
        if group["cosine_scope"] == "global":
            group_s = next((self.state[p]["s"] for p in group["params"] if "s" in self.state[p]), None)
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            if not state:
                self._init_state(p, state)
                s_dtype = torch.promote_types(p.dtype, torch.float32)
                state["s"] = torch.zeros((), dtype=s_dtype, device=p.device)
                if group_s is not None:  # global scope: a newcomer joins the group's running average
                    state["s"].copy_(group_s)
            params.append(p)
            grads.append(p.grad)
            for lst, name in zip(buffers, self._buffer_names):
                lst.append(state[name])
            s.append(state["s"])
        return params, grads, buffers, s

    def _impl(self, group, params: list[Tensor]) -> str:
        if group["fused"]:
            return "fused"
        if group["foreach"]:
            return "foreach"
        if group["foreach"] is None and group["fused"] is None:
            if all(p.device.type == "cpu" for p in params) and _fused.available(warn=True):
                return "fused"
            if all(p.device.type not in ("cpu", "meta") for p in params):
                return "foreach"
        return "single"

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            params, grads, buffers, s = self._init_group(group)
            if not params:
                continue
            steps = [self.state[p]["step"] for p in params if "step" in self.state[p]]
            if steps:
                torch._foreach_add_(steps, 1)
            rule = self._rule(group)
            counts = [t.item() for t in steps] if rule.bias_correction else None  # host sync only when asked
            ms, vs = buffers[0], buffers[1] if len(buffers) > 1 else None
            work.append((group, rule, params, grads, ms, vs, s, self._impl(group, params), counts))
        reduced = [None] * len(work)
        if self.stats_reducer is not None and work:
            # every group's statistics in ONE reduction (one all-reduce per step, not one per group)
            parts = [_group_statistics(rule, params, grads, ms, vs, s, impl)
                     for _, rule, params, grads, ms, vs, s, impl, _ in work]
            reduced = list(self.stats_reducer(torch.cat(parts)).split([len(x) for x in parts]))
        for (group, rule, params, grads, ms, vs, s, impl, counts), stats in zip(work, reduced):
            _torque_step(rule, params, grads, ms, vs, s, scope=group["cosine_scope"], impl=impl,
                         stats_reducer=None, reduced_stats=stats, steps=counts)
            if group["cosine_scope"] == "global":  # s belongs to the group: tensors without a grad follow it
                for p in group["params"]:
                    if "s" in self.state[p] and self.state[p]["s"] is not s[0]:
                        self.state[p]["s"].copy_(s[0])
        return loss

    @torch.no_grad()
    def damping(self) -> dict[str, Tensor]:
        """Current per-tensor damping ``d = (1 + s) / 2`` and cosine averages ``s`` (float64, CPU), in
        parameter order over tensors that have taken a step. One small copy; meant for logging steps."""
        s = [self.state[p]["s"] for g in self.param_groups for p in g["params"] if "s" in self.state[p]]
        s = torch.stack([x.double() for x in s]).cpu() if s else torch.zeros(0, dtype=torch.float64)
        return {"d": (1.0 + s) / 2.0, "s": s}

    def damping_summary(self) -> dict[str, float]:
        """Mean / min / max damping and the share of tensors damped below 0.5 (gradient opposing momentum).

        Under sharded statistics (DeepSpeed ZeRO, FSDP2) it is taken over every logical tensor and gathered
        across ranks: a collective, so call it on every rank (the Trainer's ``on_log`` does)."""
        if hasattr(self.stats_reducer, "damping_summary"):
            return self.stats_reducer.damping_summary(gather=True)
        d = self.damping()["d"]
        if d.numel() == 0:
            return {}
        return {
            "mean": d.mean().item(),
            "min": d.min().item(),
            "max": d.max().item(),
            "frac_below_half": (d < 0.5).float().mean().item(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts every floating state tensor to its parameter's dtype; s must stay at least float32
        # (a bf16 running cosine would lose the average), so put back the saved values in their own dtype.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if saved is not None and "s" in saved:
                s_dtype = torch.promote_types(p.dtype, torch.float32)
                self.state[p]["s"] = saved["s"].detach().to(dtype=s_dtype, device=p.device).clone()


class TAM(_TorqueOptimizer):
    r"""Torque-Aware Momentum, the SGD form (arXiv:2412.18790).

    .. math::
        \begin{aligned}
        &g_t \leftarrow \pm\nabla f(p_{t-1}) + \lambda p_{t-1}, \qquad
          c_t = \cos(m_{t-1}, g_t),\quad s_t = \gamma s_{t-1} + (1-\gamma) c_t,\quad d_t = (1+s_t)/2 \\
        &m_t = \mu m_{t-1} + (d_t + \epsilon_d) g_t, \qquad p_t = p_{t-1} - \eta m_t
        \end{aligned}

    Args:
        params: parameters or param groups.
        lr: learning rate :math:`\eta`. Steady-state steps are ``lr * E[d] / (1 - momentum)``; with noisy
            gradients E[d] is about 0.5, so start from ``lr_SGDM / 0.5``.
        momentum: :math:`\mu` (default 0.9).
        decay_rate: :math:`\gamma`, the smoothing of the cosine (default 0.9, the paper's).
        damping_eps: :math:`\epsilon_d` (default 1e-8).
        weight_decay: L2 penalty added to the gradient before the cosine, as in ``torch.optim.SGD``.
        maximize: maximize the objective.
        foreach / fused: force a code path (None chooses the fastest exact one).
        cosine_scope: ``"tensor"`` (one cosine per tensor) or ``"global"`` (one per param group).
        fixed_damping: hold ``d`` at this value instead of measuring the angle (a control: 0.5 separates
            the angle's effect from simply halving the step). No statistics are computed; ``s`` reads
            ``2 d - 1`` so :meth:`damping` reports it.

    State per tensor: ``momentum_buffer`` (parameter-sized) and ``s`` (0-dim, float32 or wider).
    """

    _buffer_names = ("momentum_buffer",)

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        decay_rate: float = 0.9,
        damping_eps: float = 1e-8,
        weight_decay: float = 0.0,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        cosine_scope: str = "tensor",
        fused: Optional[bool] = None,
        fixed_damping: Optional[float] = None,
    ):
        _validate_common(lr, decay_rate, damping_eps, weight_decay, cosine_scope, foreach, fused, fixed_damping)
        _check(0.0 <= momentum < 1.0, f"Invalid momentum value: {momentum}")
        defaults = dict(
            lr=lr, momentum=momentum, decay_rate=decay_rate, damping_eps=damping_eps, weight_decay=weight_decay,
            maximize=maximize, foreach=foreach, cosine_scope=cosine_scope, fused=fused, fixed_damping=fixed_damping,
        )
        super().__init__(params, defaults)

    def _rule(self, group) -> _Rule:
        return _Rule(
            adaptive=False, lr=group["lr"], beta1=group["momentum"], beta2=0.0, eps=0.0,
            weight_decay=group["weight_decay"], decoupled=False, maximize=group["maximize"],
            decay_rate=group["decay_rate"], damping_eps=group["damping_eps"], fixed_damping=group["fixed_damping"],
        )


class AdaTAM(_TorqueOptimizer):
    r"""Adaptive Torque-Aware Momentum, the Adam form (arXiv:2412.18790).

    .. math::
        \begin{aligned}
        &g_t \leftarrow \pm\nabla f(p_{t-1}) \;(+\,\lambda p_{t-1} \text{ unless decoupled}), \qquad
          s_t = \gamma s_{t-1} + (1-\gamma)\cos(m_{t-1}, g_t),\quad d_t = (1+s_t)/2 \\
        &m_t = \beta_1 m_{t-1} + (d_t + \epsilon_d) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        &p_t = p_{t-1}(1 - \eta\lambda)^{[\text{decoupled}]} - \eta\, m_t / (\sqrt{v_t} + \epsilon)
        \end{aligned}

    No bias correction and no EMA on the first moment, as in the paper: use about
    ``lr_AdamW * (1 - beta1) / 0.5`` and a warm-up. Without bias correction the first ~1000 steps (beta2 =
    0.999) are up to ~5x larger than AdamW's at that lr; ``bias_correction=True`` (not the paper's) divides
    m by :math:`1-\beta_1^t` and v by :math:`1-\beta_2^t`, as Adam does, so the transfer rule holds from step 1.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        betas: :math:`(\beta_1, \beta_2)` (default (0.9, 0.999)).
        decay_rate: :math:`\gamma` (default 0.9). damping_eps: :math:`\epsilon_d` (default 1e-8).
        eps: added to :math:`\sqrt{v_t}` (default 1e-8).
        weight_decay: :math:`\lambda`; coupled (L2, like ``torch.optim.Adam``) unless
            ``decoupled_weight_decay`` (then like AdamW; see :class:`AdaTAMW`).
        maximize, foreach, fused, cosine_scope, fixed_damping: as in :class:`TAM`.
        bias_correction: Adam-style correction of both moments (default False, the paper's form).

    State per tensor: ``exp_avg``, ``exp_avg_sq`` (parameter-sized), ``s`` and ``step`` (0-dim).
    """

    _buffer_names = ("exp_avg", "exp_avg_sq")

    def __init__(
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
    ):
        _validate_common(lr, decay_rate, damping_eps, weight_decay, cosine_scope, foreach, fused, fixed_damping)
        _check(len(betas) == 2, f"Invalid betas: {betas}")
        _check(0.0 <= betas[0] < 1.0, f"Invalid beta parameter at index 0: {betas[0]}")
        _check(0.0 <= betas[1] < 1.0, f"Invalid beta parameter at index 1: {betas[1]}")
        _check(0.0 <= eps, f"Invalid epsilon value: {eps}")
        defaults = dict(
            lr=lr, betas=tuple(betas), decay_rate=decay_rate, damping_eps=damping_eps, eps=eps,
            weight_decay=weight_decay, maximize=maximize, foreach=foreach, cosine_scope=cosine_scope,
            fused=fused, fixed_damping=fixed_damping, decoupled_weight_decay=decoupled_weight_decay,
            bias_correction=bias_correction,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("decoupled_weight_decay", isinstance(self, AdaTAMW))
            group.setdefault("bias_correction", False)

    def _init_state(self, p: Tensor, state: dict) -> None:
        super()._init_state(p, state)
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)

    def _rule(self, group) -> _Rule:
        beta1, beta2 = group["betas"]
        return _Rule(
            adaptive=True, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], decoupled=group["decoupled_weight_decay"],
            maximize=group["maximize"], decay_rate=group["decay_rate"], damping_eps=group["damping_eps"],
            fixed_damping=group["fixed_damping"], bias_correction=group["bias_correction"],
        )


class AdaTAMW(AdaTAM):
    r"""AdaTAM with decoupled weight decay (``p *= 1 - lr * weight_decay`` before the update), the form the
    paper uses for its language-model fine-tuning. Same arguments as :class:`AdaTAM`; ``weight_decay``
    defaults to 0.01 as in ``torch.optim.AdamW``."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        decay_rate: float = 0.9,
        damping_eps: float = 1e-8,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        cosine_scope: str = "tensor",
        fused: Optional[bool] = None,
        fixed_damping: Optional[float] = None,
        bias_correction: bool = False,
    ):
        super().__init__(
            params, lr=lr, betas=betas, decay_rate=decay_rate, damping_eps=damping_eps, eps=eps,
            weight_decay=weight_decay, maximize=maximize, foreach=foreach, cosine_scope=cosine_scope,
            fused=fused, fixed_damping=fixed_damping, decoupled_weight_decay=True, bias_correction=bias_correction,
        )


# --------------------------------------------------------------------------------------------- functional


def tam(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], s: list[Tensor], *,
    lr: float, momentum: float, decay_rate: float, damping_eps: float, weight_decay: float,
    maximize: bool = False, cosine_scope: str = "tensor", foreach: Optional[bool] = None,
    fused: Optional[bool] = None, fixed_damping: Optional[float] = None,
    stats_reducer: Optional[StatsReducer] = None,
) -> None:
    """Functional TAM step over tensors that all have gradients; see :class:`TAM`."""
    rule = _Rule(False, lr, momentum, 0.0, 0.0, weight_decay, False, maximize, decay_rate, damping_eps,
                 fixed_damping)
    impl = "fused" if fused else ("foreach" if foreach else "single")
    _torque_step(rule, params, grads, momentum_buffers, None, s, scope=cosine_scope, impl=impl,
                 stats_reducer=stats_reducer)


def adatam(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    s: list[Tensor], *, lr: float, beta1: float, beta2: float, decay_rate: float, damping_eps: float,
    eps: float, weight_decay: float, decoupled_weight_decay: bool = False, maximize: bool = False,
    cosine_scope: str = "tensor", foreach: Optional[bool] = None, fused: Optional[bool] = None,
    fixed_damping: Optional[float] = None, stats_reducer: Optional[StatsReducer] = None,
    bias_correction: bool = False, steps: Optional[list[float]] = None,
) -> None:
    """Functional AdaTAM(W) step over tensors that all have gradients; see :class:`AdaTAM`. ``steps``: each
    tensor's step count including this step, needed with ``bias_correction``."""
    rule = _Rule(True, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize, decay_rate,
                 damping_eps, fixed_damping, bias_correction)
    impl = "fused" if fused else ("foreach" if foreach else "single")
    _torque_step(rule, params, grads, exp_avgs, exp_avg_sqs, s, scope=cosine_scope, impl=impl,
                 stats_reducer=stats_reducer, steps=steps)


def _per_tensor_rules(rule: _Rule, steps: Optional[list[float]], n: int) -> list[_Rule]:
    """One rule per tensor: they differ only under bias_correction, by each tensor's own step count."""
    if not rule.bias_correction:
        return [rule] * n
    if steps is None:
        raise ValueError("bias_correction needs each tensor's step count")
    by_step = {t: rule.at_step(t) for t in set(steps)}
    return [by_step[t] for t in steps]


def _torque_step(rule: _Rule, params, grads, ms, vs, s, *, scope: str, impl: str, stats_reducer,
                 reduced_stats: Optional[Tensor] = None, steps: Optional[list[float]] = None) -> None:
    """One update of a param group. ``reduced_stats``: the group's statistics, already reduced by the caller
    (the optimizer reduces all groups at once); else they are computed here and passed to ``stats_reducer``.
    ``steps``: each tensor's step count (after this step's increment), needed under bias_correction."""
    vs = vs if vs is not None else [None] * len(params)
    rules = _per_tensor_rules(rule, steps, len(params))
    measured = rule.fixed_damping is None
    if impl == "fused" and scope == "tensor" and stats_reducer is None and reduced_stats is None and measured:
        _fused_tensor_scope(rules, params, grads, ms, vs, s)
        return
    fusable, g_eff = _prepare(rule, params, grads, ms, vs, s, impl)
    if measured:
        stats = reduced_stats
        if stats is None:
            stats = _statistics(rule, params, grads, ms, fusable, g_eff, impl)
            stats = stats if stats_reducer is None else stats_reducer(stats)
        coeffs = _advance(stats, s, rule, scope)
    else:
        for x in s:  # s = 2d - 1 keeps damping() truthful for the control arm
            x.fill_(2.0 * rule.fixed_damping - 1.0)
        coeffs = [torch.tensor(rule.fixed_damping + rule.damping_eps, dtype=x.dtype, device=x.device) for x in s]

    for i in [i for i, f in enumerate(fusable) if f]:
        p, a, rule = params[i], coeffs[i].item(), rules[i]
        if rule.adaptive:
            _fused.kernel("adatam_update", p.dtype)(
                p.numel(), p.data_ptr(), grads[i].data_ptr(), ms[i].data_ptr(), vs[i].data_ptr(), rule.sign,
                rule.coupled_wd, a, rule.beta1, rule.beta2, rule.update_lr, rule.update_eps, rule.decay)
        else:
            _fused.kernel("tam_update", p.dtype)(p.numel(), p.data_ptr(), grads[i].data_ptr(), ms[i].data_ptr(),
                                                 rule.sign, rule.coupled_wd, a, rule.beta1, rule.lr)
        torch.autograd.graph.increment_version(p)
    by_rule: dict = {}
    for i in [i for i, f in enumerate(fusable) if not f]:
        by_rule.setdefault(rules[i], []).append(i)
    update = _foreach_update if impl == "foreach" else _single_update
    for tensor_rule, idx in by_rule.items():
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        update(tensor_rule.folded(), pick(params), pick(g_eff), pick(ms), pick(vs), pick(coeffs))


def _prepare(rule: _Rule, params, grads, ms, vs, s, impl: str):
    """Which tensors the kernels take, and the gradients for the rest: eager paths fold maximize and coupled
    weight decay into one materialised gradient, the kernels do it on the fly from the raw one."""
    if impl == "fused":
        fusable = [_fused.supports(*(t for t in (p, g, m, v) if t is not None)) and x.dtype == p.dtype
                   for p, g, m, v, x in zip(params, grads, ms, vs, s)]
    else:
        fusable = [False] * len(params)
    g_eff = [g if f else _effective_grad(rule, p, g) for p, g, f in zip(params, grads, fusable)]
    return fusable, g_eff


def _statistics(rule: _Rule, params, grads, ms, fusable, g_eff, impl: str) -> Tensor:
    """[n, 3] float64 rows (m.g, |m|^2, |g|^2) of this process's tensors."""
    stats = torch.zeros(len(params), 3, dtype=torch.float64, device=params[0].device)
    for i in [i for i, f in enumerate(fusable) if f]:
        p = params[i]
        _fused.kernel("tam_stats", p.dtype)(p.numel(), ms[i].data_ptr(), grads[i].data_ptr(), p.data_ptr(),
                                            rule.sign, rule.coupled_wd, stats[i].data_ptr())
    eager_idx = [i for i, f in enumerate(fusable) if not f]
    if eager_idx:
        stats[eager_idx] = _eager_stats([ms[i] for i in eager_idx], [g_eff[i] for i in eager_idx], impl == "foreach")
    return stats


def _group_statistics(rule: _Rule, params, grads, ms, vs, s, impl: str) -> Tensor:
    """A group's rows for the optimizer-wide reduction (zeros for the constant-damping control, which needs none)."""
    if rule.fixed_damping is not None:
        return torch.zeros(len(params), 3, dtype=torch.float64, device=params[0].device)
    vs = vs if vs is not None else [None] * len(params)
    fusable, g_eff = _prepare(rule, params, grads, ms, vs, s, impl)
    return _statistics(rule, params, grads, ms, fusable, g_eff, impl)


# ------------------------------------------------------------------------------------------------ kernels


def _effective_grad(rule: _Rule, p: Tensor, g: Tensor) -> Tensor:
    if rule.maximize:
        g = -g
    if rule.coupled_wd:
        g = g.add(p, alpha=rule.coupled_wd)
    return g


def _stat_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _eager_stats(ms: list[Tensor], gs: list[Tensor], foreach: bool) -> Tensor:
    """[n, 3] float64 rows (m.g, |m|^2, |g|^2), reduced in at least float32."""
    rows = []
    if foreach and ms:
        dtype = _stat_dtype(ms[0])
        if all(m.dtype == ms[0].dtype for m in ms + gs):
            norm_m = torch.stack(torch._foreach_norm(ms, 2, dtype=dtype))
            norm_g = torch.stack(torch._foreach_norm(gs, 2, dtype=dtype))
            dots = torch.stack([_dot(m, g) for m, g in zip(ms, gs)])
            return torch.stack([dots, norm_m.square(), norm_g.square()], dim=1).double()
    for m, g in zip(ms, gs):
        mf, gf = m.reshape(-1).to(_stat_dtype(m)), g.reshape(-1).to(_stat_dtype(g))
        rows.append(torch.stack([torch.dot(mf, gf), torch.dot(mf, mf), torch.dot(gf, gf)]).double())
    return torch.stack(rows)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    dtype = _stat_dtype(a)
    return torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype))


def _advance(stats: Tensor, s: list[Tensor], rule: _Rule, scope: str) -> list[Tensor]:
    """Updates every ``s`` in place from the statistics; returns each tensor's gradient coefficient
    ``d + damping_eps`` (0-dim, in the dtype of its ``s``)."""
    if scope == "global":
        stats = stats.sum(0, keepdim=True)
    mg, mm, gg = stats.unbind(-1)
    den = mm.sqrt() * gg.sqrt()
    cos = mg / den
    cos = torch.where((den > 0) & torch.isfinite(cos), cos, torch.zeros_like(cos)).clamp(-1.0, 1.0)
    if scope == "global":
        s_new = (rule.decay_rate * s[0].double() + (1.0 - rule.decay_rate) * cos[0]).to(s[0].dtype)
        a = ((1.0 + s_new.double()) / 2.0 + rule.damping_eps).to(s[0].dtype)
        for x in s:
            x.copy_(s_new)
        return [a] * len(s)
    coeffs: list = [None] * len(s)
    by_dtype: dict = {}
    for i, x in enumerate(s):
        by_dtype.setdefault(x.dtype, []).append(i)
    for dtype, idx in by_dtype.items():  # a few launches per dtype, not per tensor (GPU foreach path)
        s_old = [s[i] for i in idx]
        s_new = rule.decay_rate * torch.stack(s_old).double() + (1.0 - rule.decay_rate) * cos[idx]
        s_new = s_new.to(dtype)
        torch._foreach_copy_(s_old, list(s_new.unbind()))
        a = ((1.0 + s_new.double()) / 2.0 + rule.damping_eps).to(dtype)
        for i, a_i in zip(idx, a.unbind()):
            coeffs[i] = a_i
    return coeffs


def _single_update(rule: _Rule, params, grads, ms, vs, coeffs) -> None:
    for p, g, m, v, a in zip(params, grads, ms, vs, coeffs):
        m.mul_(rule.beta1).addcmul_(g, a)
        if not rule.adaptive:
            p.add_(m, alpha=-rule.lr)
            continue
        v.mul_(rule.beta2).addcmul_(g, g, value=1.0 - rule.beta2)
        if rule.decoupled and rule.weight_decay:
            p.mul_(rule.decay)
        p.addcdiv_(m, v.sqrt().add_(rule.update_eps), value=-rule.update_lr)


def _foreach_update(rule: _Rule, params, grads, ms, vs, coeffs) -> None:
    groups: dict = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    for idx in groups.values():
        p, g, m, a = ([xs[i] for i in idx] for xs in (params, grads, ms, coeffs))
        torch._foreach_mul_(m, rule.beta1)
        torch._foreach_add_(m, torch._foreach_mul(g, a))
        if not rule.adaptive:
            torch._foreach_add_(p, m, alpha=-rule.lr)
            continue
        v = [vs[i] for i in idx]
        torch._foreach_mul_(v, rule.beta2)
        torch._foreach_addcmul_(v, g, g, value=1.0 - rule.beta2)
        if rule.decoupled and rule.weight_decay:
            torch._foreach_mul_(p, rule.decay)
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, rule.update_eps)
        torch._foreach_addcdiv_(p, m, denom, value=-rule.update_lr)


def _fused_tensor_scope(rules: list[_Rule], params, grads, ms, vs, s) -> None:
    """Tensor scope on one process: statistics, damping and update back to back per tensor, all tensors of
    a dtype (and step count, under bias_correction) in one kernel call; tensors the kernels cannot take (bf16,
    DTensor, strided) take the eager loop."""
    batches: dict = {}
    for i, (p, g, m, v, x, rule) in enumerate(zip(params, grads, ms, vs, s, rules)):
        tensors = (p, g, m) if v is None else (p, g, m, v)
        if _fused.supports(*tensors) and x.dtype == p.dtype:
            batches.setdefault((p.dtype, rule), []).append(i)
            continue
        ge = _effective_grad(rule, p, g)
        a = _advance(_eager_stats([m], [ge], False), [x], rule, "tensor")
        _single_update(rule.folded(), [p], [ge], [m], [v], a)
    for (dtype, rule), idx in batches.items():
        p, g, m, v, x = ([xs[i] for i in idx] for xs in (params, grads, ms, vs, s))
        common = (_fused.sizes(p), _fused.pointers(p), _fused.pointers(g), _fused.pointers(m))
        if rule.adaptive:
            _fused.kernel("adatam_step_batch", dtype)(
                len(idx), *common, _fused.pointers(v), _fused.pointers(x), rule.sign, rule.coupled_wd,
                rule.beta1, rule.beta2, rule.update_lr, rule.update_eps, rule.decay, rule.decay_rate, rule.damping_eps)
        else:
            _fused.kernel("tam_step_batch", dtype)(
                len(idx), *common, _fused.pointers(x), rule.sign, rule.coupled_wd, rule.beta1, rule.lr,
                rule.decay_rate, rule.damping_eps)
        for t in p:
            torch.autograd.graph.increment_version(t)
