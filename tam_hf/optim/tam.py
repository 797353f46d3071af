r"""Torque-Aware Momentum: TAM, AdaTAM and AdaTAMW (Malviya et al., arXiv:2412.18790).

Per parameter tensor with gradient :math:`g_t` (after ``maximize`` and coupled weight decay):

.. math::
    c_t = \frac{\langle m_{t-1}, g_t\rangle}{\lVert m_{t-1}\rVert\,\lVert g_t\rVert}\ (0 \text{ if a norm is } 0),\quad
    s_t = \gamma s_{t-1} + (1-\gamma) c_t,\quad
    d_t = \tfrac{1}{2}(1 + s_t),\quad
    m_t = \beta_1 m_{t-1} + (d_t + \epsilon_d)\, g_t

TAM then steps :math:`p \leftarrow p - \eta m_t`; AdaTAM keeps
:math:`v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2` and steps
:math:`p \leftarrow p - \eta\, m_t / (\sqrt{v_t} + \epsilon)`;
AdaTAMW first decays :math:`p \leftarrow p (1 - \eta\lambda)` (decoupled weight decay) instead of adding
:math:`\lambda p` to the gradient. As in the paper there is no bias correction and the first moment is not an
EMA, so AdaTAM wants roughly ``lr_AdamW * (1 - beta1) / E[d]`` (about 0.2x AdamW's learning rate).

The cosine is taken over each whole tensor (``cosine_scope="tensor"``) or over the whole param group
(``"global"``). Statistics are reduced in float64 on the fused path and in at least float32 elsewhere; a
cosine that is not finite (overflowing statistics) counts as 0 and never enters ``s``.

Layout, as in ``torch/optim/adamw.py``: the classes (defaults, lazy state, parameter checks) -> the functional
:func:`tam` / :func:`adatam` -> one step flow shared by both, :func:`tam_hf.optim.step.torque_step` (statistics
-> the optional ``stats_reducer`` of sharded tensors -> damping -> update), which also holds the code paths (a
loop, foreach, the C kernels of ``fused.py``, the Triton kernels) and chooses one per param group. Elsewhere: the
constructors' arguments and their checks (:mod:`tam_hf.optim.hyperparams`, torch-free, read by the registry), and
what a loaded state dict must hold (:mod:`tam_hf.optim.state_dicts`). A subclass that stores state differently
(8-bit moments, :mod:`tam_hf.optim.tam8bit`) runs the functional :func:`adatam` on float32 temporaries and
overrides :meth:`TorqueOptimizer._check_state_entry` for its own state layout.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from tam_hf.optim import fused as _fused
from tam_hf.optim.hyperparams import ADATAM_ARGS, ADATAMW_ARGS, TAM_ARGS, check_path_options
from tam_hf.optim.state_dicts import FRAGMENT_SCALAR_KEYS, check_state_dict, check_state_entry
from tam_hf.optim.step import (
    GroupStep, Rule, StatsReducer, default_impl, describe, float32_moments, input_problem, torque_step,
)
from tam_hf.optim.triton_devices import wanted as triton_wanted

__all__ = ["TAM", "AdaTAM", "AdaTAMW", "TorqueOptimizer", "tam", "adatam"]

PAPER = "https://arxiv.org/abs/2412.18790"


class TorqueOptimizer(Optimizer):
    """The base of TAM, AdaTAM and AdaTAMW: validation of parameters and loaded state, lazy state, one step flow,
    damping readout. Public interface for the layers above (the distributed wiring, telemetry, checkpoints):

    * ``state_buffers``: names of the parameter-shaped state tensors, first moment first (``("exp_avg",
      "exp_avg_sq")``; TAM ``("momentum_buffer",)``). ``state_scalars``: names of the 0-dim ones (``("s",
      "step")``; TAM ``("s",)``). A flat ZeRO partition keeps each scalar as a vector with one entry per fragment
      under :data:`~tam_hf.optim.state_dicts.FRAGMENT_SCALAR_KEYS`; :meth:`load_state_dict` accepts both layouts.
    * ``stats_reducer``: None, or a callable the distributed wiring installs
      (:data:`~tam_hf.optim.step.StatsReducer`). ``step()`` calls it ONCE per call, whatever the number of param
      groups, with a ``[n, 3]`` float64 tensor: one row ``(m.g, |m|^2, |g|^2)`` per tensor that has a gradient,
      param group by param group in parameter order (zeros for ``fixed_damping`` groups), summed over the part of
      the tensor this process holds. It must return a tensor of the same shape holding each row's sums over the
      whole logical tensor; the optimizer then sums a ``cosine_scope="global"`` group's rows itself. Under a
      reducer each step is a statistics pass and an update pass (the one-pass fused kernel needs the statistics
      first).
    * :meth:`damping`, :meth:`damping_summary`: the per-tensor damping, for logging.
    """

    state_buffers: tuple[str, ...] = ()
    state_scalars: tuple[str, ...] = ("s",)
    # Whether state can be cut into per-tensor fragments for ZeRO/FSDP2 (tam_hf.optim.sharded); the trainer
    # layer refuses sharded runs of optimizers that say no (8-bit state blocks would straddle the shards).
    supports_sharded_statistics: bool = True

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)
        # Installed by the distributed wiring (DeepSpeed ZeRO / FSDP2); None means tensors are whole here.
        self.stats_reducer: Optional[StatsReducer] = None

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("maximize", False)
            group.setdefault("cosine_scope", "tensor")
            group.setdefault("fixed_damping", None)
            group.setdefault("moment_dtype", "auto")
        self.__dict__.setdefault("stats_reducer", None)

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer``'s, and refuses, naming the parameter, what no step could handle right:
        complex tensors, and under ``fused=True`` anything but CPU float32/float64 (a refused group is not added)."""
        super().add_param_group(param_group)
        try:
            self._check_group(len(self.param_groups) - 1, self.param_groups[-1])
        except Exception:
            self.param_groups.pop()
            raise

    def _check_group(self, index: int, group: dict) -> None:
        name = type(self).__name__
        triton = bool(group["fused"] and group["params"] and triton_wanted(group["params"][0].device))
        for i, p in enumerate(group["params"]):
            where = f"parameter {i} of param group {index}"
            if p.is_complex():
                raise ValueError(f"{name} does not support complex parameters: {where} has dtype {p.dtype} (the "
                                 "cosine and the update would drop the imaginary part); optimize its real and "
                                 "imaginary parts as real parameters instead")
            if group["fused"] and not triton and (p.device.type != "cpu" or p.dtype not in _fused.SUPPORTED_DTYPES):
                raise ValueError(f"fused=True supports CPU float32/float64 parameters only: {where} is {p.dtype} "
                                 f"on {p.device}")
        if triton:
            from tam_hf.optim import triton_kernels  # only now: it brings triton and torch._dynamo

            triton_kernels.check_group(group["params"], index)  # dtypes, one device, and whether Triton runs there
        elif group["fused"]:
            _fused.load()  # raise now, with the compiler's message, rather than at the first step

    def _rule(self, group) -> Rule:
        raise NotImplementedError

    def _init_state(self, p: Tensor, state: dict) -> None:
        for name in self.state_buffers:
            state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["s"] = torch.zeros((), dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)
        if "step" in self.state_scalars:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)

    def _params_with_grad(self) -> list[list[Tensor]]:
        """Each group's parameters that have a gradient. Raises, naming the tensor, before any state changes."""
        out = []
        for gi, group in enumerate(self.param_groups):
            fused, params = bool(group["fused"]), []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                problem = input_problem(p, p.grad, self.state.get(p) if fused else None, fused,
                                        group["params"][0].device)
                if problem is not None:
                    what, detail = problem
                    raise RuntimeError(f"{type(self).__name__} {what}: param group {gi}, parameter {i} "
                                       f"{describe(p)}: {detail}")
                params.append(p)
            out.append(params)
        return out

    def _group_step(self, group: dict, params: list[Tensor]) -> "GroupStep":
        """Creates missing state (lazily: FSDP2 and DeepSpeed swap parameters after construction), counts the
        step, and gathers what the step flow needs."""
        state = self.state
        group_s = None
        if group["cosine_scope"] == "global":
            group_s = next((state[p]["s"] for p in group["params"] if "s" in state.get(p, ())), None)
        impl = default_impl(params, group["foreach"], group["fused"])
        for p in params:
            if not state[p]:
                self._init_state(p, state[p])
                if float32_moments(group.get("moment_dtype", "auto"), impl, p):
                    for name in self.state_buffers:  # 16-bit moments lose the update (MOMENT_DTYPES)
                        state[p][name] = state[p][name].float()
                if group_s is not None:  # global scope: a newcomer joins the group's running average
                    state[p]["s"].copy_(group_s)
        buffers = [[state[p][name] for p in params] for name in self.state_buffers]
        steps = None
        if "step" in self.state_scalars:
            counts = [state[p]["step"] for p in params]
            torch._foreach_add_(counts, 1)
            if group.get("bias_correction"):
                steps = counts  # the 0-dim counts: a path reads them where it needs them (a GPU one on the device)
        return GroupStep(
            rule=self._rule(group), params=params, grads=[p.grad for p in params], exp_avgs=buffers[0],
            exp_avg_sqs=buffers[1] if len(buffers) > 1 else None, s=[state[p]["s"] for p in params],
            scope=group["cosine_scope"], impl=impl, steps=steps,
        )

    @staticmethod
    def _evaluate_closure(closure) -> Optional[Tensor]:
        """The loss of ``step(closure)``: the closure re-evaluates the model, so it runs with grad enabled."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._evaluate_closure(closure)
        active = self._params_with_grad()
        works = [(group, self._group_step(group, params)) for group, params in zip(self.param_groups, active)
                 if params]
        torque_step([work for _, work in works], self.stats_reducer)
        for group, work in works:
            if group["cosine_scope"] == "global":  # s belongs to the group: tensors without a grad follow it
                for p in group["params"]:
                    st = self.state.get(p)
                    if st and "s" in st and st["s"] is not work.s[0]:
                        st["s"].copy_(work.s[0])
        return loss

    @torch.no_grad()
    def damping(self) -> dict[str, Tensor]:
        """Current per-tensor damping ``d = (1 + s) / 2`` and cosine averages ``s`` (float64, CPU), in
        parameter order over tensors that have taken a step. One small copy; meant for logging steps."""
        s = [st["s"] for g in self.param_groups for p in g["params"] if "s" in (st := self.state.get(p, {}))]
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

    # ------------------------------------------------------------------------------------------ state dicts

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer``'s, after checking that every saved entry fits its parameter (keys, shapes,
        dtypes; see :meth:`_check_state_entry`): a misfit raises ``ValueError`` naming the first one, and the
        optimizer is left as it was."""
        # Checked first: torch's own load accepts a state saved for other shapes, which the fused kernels would
        # read past, or another optimizer's, which would fail (or train wrongly) steps later.
        check_state_dict(state_dict, self.param_groups, self._check_state_entry)
        super().load_state_dict(state_dict)
        # torch casts every floating state tensor to its parameter's dtype; s must stay at least float32
        # (a bf16 running cosine would lose the average), so put back the saved values in their own dtype.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid) or {}
            for key in ("s", FRAGMENT_SCALAR_KEYS["s"]):
                if key in saved:
                    s_dtype = torch.promote_types(p.dtype, torch.float32)
                    self.state[p][key] = saved[key].detach().to(dtype=s_dtype, device=p.device).clone()
            for key in self.state_buffers:  # float32 moments of 16-bit parameters stay float32 (MOMENT_DTYPES)
                if key in saved and saved[key].dtype == torch.float32 and p.dtype in (torch.bfloat16, torch.float16):
                    self.state[p][key] = saved[key].detach().to(device=p.device).clone()

    def _check_state_entry(self, group_index: int, index: int, p: Tensor, entry: dict) -> None:
        """Raises ``ValueError`` unless ``entry`` is this optimizer's state for ``p``, whole-tensor or a flat ZeRO
        partition's (see :func:`~tam_hf.optim.state_dicts.check_state_entry`). A subclass that stores state in
        another layout (quantized moments) overrides this."""
        check_state_entry(entry, p, self.state_buffers, self.state_scalars,
                          f"{type(self).__name__}.load_state_dict: the saved state does not fit param group "
                          f"{group_index}, parameter {index} {describe(p)}")


class TAM(TorqueOptimizer):
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
        moment_dtype: dtype of the momentum buffer (and AdaTAM's second moment) for 16-bit parameters:
            ``"auto"`` (float32 on the fused GPU path, the parameter's dtype elsewhere, as ``torch.optim``),
            ``"float32"`` (everywhere), or ``"param"`` (the parameter's dtype everywhere: half the state memory,
            but in bfloat16 small updates of the second moment round away; see
            :data:`tam_hf.optim.hyperparams.MOMENT_DTYPES`).

    State per tensor: ``momentum_buffer`` (parameter-sized) and ``s`` (0-dim, float32 or wider).
    """

    state_buffers = ("momentum_buffer",)
    state_scalars = ("s",)

    @TAM_ARGS.init
    def __init__(self, params, **defaults):
        super().__init__(params, defaults)

    def _rule(self, group) -> Rule:
        return Rule(
            adaptive=False, lr=group["lr"], beta1=group["momentum"], beta2=0.0, eps=0.0,
            weight_decay=group["weight_decay"], decoupled=False, maximize=group["maximize"],
            decay_rate=group["decay_rate"], damping_eps=group["damping_eps"], fixed_damping=group["fixed_damping"],
        )


class AdaTAM(TorqueOptimizer):
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
        maximize, foreach, fused, cosine_scope, fixed_damping, moment_dtype: as in :class:`TAM`.
        bias_correction: Adam-style correction of both moments (default False, the paper's form).

    State per tensor: ``exp_avg``, ``exp_avg_sq`` (parameter-sized), ``s`` and ``step`` (0-dim).
    """

    state_buffers = ("exp_avg", "exp_avg_sq")
    state_scalars = ("s", "step")

    @ADATAM_ARGS.init
    def __init__(self, params, **defaults):
        defaults["betas"] = tuple(defaults["betas"])
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("decoupled_weight_decay", isinstance(self, AdaTAMW))
            group.setdefault("bias_correction", False)

    def _rule(self, group) -> Rule:
        beta1, beta2 = group["betas"]
        return Rule(
            adaptive=True, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], decoupled=group["decoupled_weight_decay"],
            maximize=group["maximize"], decay_rate=group["decay_rate"], damping_eps=group["damping_eps"],
            fixed_damping=group["fixed_damping"], bias_correction=group["bias_correction"],
        )


class AdaTAMW(AdaTAM):
    r"""AdaTAM with decoupled weight decay (``p *= 1 - lr * weight_decay`` before the update), the form the
    paper uses for its language-model fine-tuning. Same arguments as :class:`AdaTAM` less
    ``decoupled_weight_decay``; ``weight_decay`` defaults to 0.01 as in ``torch.optim.AdamW``."""

    @ADATAMW_ARGS.init
    def __init__(self, **kwargs):
        super().__init__(decoupled_weight_decay=True, **kwargs)


# --------------------------------------------------------------------------------------------- functional


def tam(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], s: list[Tensor], *,
    lr: float, momentum: float, decay_rate: float, damping_eps: float, weight_decay: float,
    maximize: bool = False, cosine_scope: str = "tensor", foreach: Optional[bool] = None,
    fused: Optional[bool] = None, fixed_damping: Optional[float] = None,
    stats_reducer: Optional[StatsReducer] = None,
) -> None:
    """Functional TAM step over tensors that all have gradients; see :class:`TAM`. The code path is chosen as
    the class chooses it, so both give the same bits."""
    rule = Rule(adaptive=False, lr=lr, beta1=momentum, beta2=0.0, eps=0.0, weight_decay=weight_decay,
                decoupled=False, maximize=maximize, decay_rate=decay_rate, damping_eps=damping_eps,
                fixed_damping=fixed_damping)
    _functional_step(rule, params, grads, momentum_buffers, None, s, cosine_scope, foreach, fused, stats_reducer)


def adatam(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    s: list[Tensor], *, lr: float, beta1: float, beta2: float, decay_rate: float, damping_eps: float,
    eps: float, weight_decay: float, decoupled_weight_decay: bool = False, maximize: bool = False,
    cosine_scope: str = "tensor", foreach: Optional[bool] = None, fused: Optional[bool] = None,
    fixed_damping: Optional[float] = None, stats_reducer: Optional[StatsReducer] = None,
    bias_correction: bool = False, steps: Optional[list[float]] = None,
) -> None:
    """Functional AdaTAM(W) step over tensors that all have gradients; see :class:`AdaTAM`. ``steps``: each
    tensor's step count including this step (numbers or 0-dim tensors), needed with ``bias_correction``."""
    rule = Rule(adaptive=True, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                decoupled=decoupled_weight_decay, maximize=maximize, decay_rate=decay_rate,
                damping_eps=damping_eps, fixed_damping=fixed_damping, bias_correction=bias_correction)
    _functional_step(rule, params, grads, exp_avgs, exp_avg_sqs, s, cosine_scope, foreach, fused, stats_reducer,
                     steps)


def _functional_step(rule, params, grads, exp_avgs, exp_avg_sqs, s, scope, foreach, fused, stats_reducer,
                     steps=None) -> None:
    lists = {"grads": grads, "exp_avgs": exp_avgs, "s": s}
    if exp_avg_sqs is not None:
        lists["exp_avg_sqs"] = exp_avg_sqs
    if steps is not None:
        lists["steps"] = steps
    for name, xs in lists.items():
        if len(xs) != len(params):
            raise ValueError(f"{len(xs)} {name} for {len(params)} params")
    check_path_options(scope, foreach, fused)
    if rule.bias_correction and steps is None:
        raise ValueError("bias_correction needs each tensor's step count (steps)")
    names = ("exp_avg", "exp_avg_sq", "s")
    for i, (p, g) in enumerate(zip(params, grads)):
        state = None
        if fused:
            state = dict(zip(names, (exp_avgs[i], exp_avg_sqs[i] if exp_avg_sqs is not None else None, s[i])))
        problem = input_problem(p, g, state, bool(fused), params[0].device)
        if problem is not None:
            what, detail = problem
            name = "AdaTAM" if rule.adaptive else "TAM"
            raise RuntimeError(f"{name} {what}: tensor {i} {describe(p)}: {detail}")
    if not params:
        return
    work = GroupStep(rule=rule, params=list(params), grads=list(grads), exp_avgs=list(exp_avgs),
                      exp_avg_sqs=None if exp_avg_sqs is None else list(exp_avg_sqs), s=list(s), scope=scope,
                      impl=default_impl(params, foreach, fused), steps=None if steps is None else list(steps))
    torque_step([work], stats_reducer)
