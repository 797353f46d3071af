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

Layout, as in ``torch/optim/adamw.py``: the classes (validation, defaults, lazy state) -> the functional
:func:`tam` / :func:`adatam` -> one step flow, :func:`_torque_step`, shared by both: statistics -> the optional
``stats_reducer`` (sharded tensors) -> damping -> update. The code path is chosen once per param group (or
functional call) by :func:`_default_impl` and names an entry of ``_PATHS``:

* ``"single"``: ``_single_tensor_statistics`` / ``_single_tensor_update``, a loop over tensors;
* ``"foreach"``: ``_multi_tensor_statistics`` / ``_multi_tensor_update``, ``torch._foreach_*`` launches;
* ``"fused"``: ``_fused_statistics`` / ``_fused_update`` and ``_fused_step`` (statistics, damping and update back
  to back per tensor, used where nothing sits between them), the checked CPU kernels of ``fused.py``;
* ``"triton"``: ``statistics`` / ``update`` / ``step`` of ``triton_kernels.py``, ``fused=True`` on CUDA/ROCm.

The default is the Triton kernels on CUDA/ROCm where they run (else foreach, with one warning), fused on CPU
when the C kernels compiled, and the single-tensor loop otherwise. A kernel path says which tensors it takes;
the others of its group go to the single-tensor path. A subclass that stores state differently (8-bit moments) keeps the math by
calling, on float32 temporaries, :func:`_torque_statistics`, :func:`_advance_damping` and :func:`_apply_update`
(the three phases of the flow), and :meth:`TorqueOptimizer._check_state_entry` for its own state layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from tam_hf.optim import fused as _fused
from tam_hf.optim.triton_devices import wanted as triton_wanted
from tam_hf.optim.hyperparams import ADATAM_ARGS, ADATAMW_ARGS, TAM_ARGS, check_path_options

__all__ = ["TAM", "AdaTAM", "AdaTAMW", "TorqueOptimizer", "tam", "adatam", "StatsReducer", "FRAGMENT_SCALAR_KEYS"]

PAPER = "https://arxiv.org/abs/2412.18790"
# Maps the [n_tensors, 3] float64 partial sums (m.g, |m|^2, |g|^2) held by this process to the sums over each
# whole logical tensor; see TorqueOptimizer. None on a single process; the distributed wiring installs one.
StatsReducer = Callable[[Tensor], Tensor]

# A flat ZeRO partition (tam_hf.optim.sharded) holds pieces of many logical tensors: its state keeps the
# parameter-sized buffers whole and each scalar as a vector with one entry per fragment, under these keys.
FRAGMENT_SCALAR_KEYS = {"s": "tam_s", "step": "tam_step"}


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
        """The rule of a tensor at its step ``t``. Under bias_correction, m / (1 - beta1^t) and sqrt(v / (1 - beta2^t))
        are folded into lr and eps: lr m_hat / (sqrt(v_hat) + eps) = lr sqrt(bc2) / bc1 * m / (sqrt(v) + eps sqrt(bc2)).
        The result needs no step count any more (``bias_correction`` off, the factors set)."""
        if not self.bias_correction:
            return self
        bc1, bc2 = 1.0 - self.beta1 ** t, 1.0 - self.beta2 ** t
        return replace(self, bias_correction=False, lr_factor=math.sqrt(bc2) / bc1, eps_factor=math.sqrt(bc2))

    def folded(self) -> "_Rule":
        """The rule to apply to a gradient that already carries maximize and coupled weight decay."""
        return replace(self, maximize=False, weight_decay=self.weight_decay * self.decoupled)


def _describe(p: Tensor) -> str:
    return f"(shape {tuple(p.shape)}, {p.dtype})"


def _input_problem(p: Tensor, g: Tensor, state: Optional[dict], fused: bool,
                   device: Optional[torch.device] = None) -> Optional[tuple[str, str]]:
    """Why a tensor cannot take this step, as (what the optimizer does not support, detail), or None. Every tensor
    of a step is asked before any is touched, so a refused step changes nothing."""
    if g.layout is not torch.strided:
        return "does not support sparse gradients", f"its gradient is {g.layout}"
    if p.is_complex() or g.is_complex():
        return "does not support complex tensors", "the cosine and the update would drop the imaginary part"
    device = p.device if device is None else device  # the param group's (its first parameter's)
    if fused and triton_wanted(device):
        return _triton().input_problem(p, g, state, device)
    if fused:
        cpu = "with fused=True runs CPU float32/float64 tensors only"
        if not p.is_cpu or p.dtype not in _fused.SUPPORTED_DTYPES:
            return cpu, f"the parameter is {p.dtype} on {p.device}"
        if not g.is_cpu:
            return cpu, f"its gradient is on {g.device}"
        for name, t in (state or {}).items():
            if isinstance(t, Tensor) and not t.is_cpu:
                return cpu, f"its {name} is on {t.device}"
    return None


# Key sets of other optimizers' per-parameter state, to say what a misfit state dict was saved by.
_KNOWN_STATES = (
    (frozenset({"exp_avg", "exp_avg_sq", "s", "step"}), "an AdaTAM/AdaTAMW state"),
    (frozenset({"momentum_buffer", "s"}), "a TAM state"),
    (frozenset({"exp_avg", "exp_avg_sq", "step"}), "an AdamW (or Adam) state"),
    (frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"}), "an AdamW (or Adam) state with amsgrad"),
    (frozenset({"momentum_buffer"}), "an SGD state"),
    (frozenset({"step", "sum"}), "an Adagrad state"),
)


def _describe_keys(found: set, expected: set) -> str:
    names = lambda keys: ", ".join(sorted(map(str, keys)))  # noqa: E731
    quoted = lambda keys: ", ".join(repr(k) for k in sorted(keys, key=str))  # noqa: E731
    missing, extra = expected - found, found - expected
    text = f"state has {names(found)}"
    if missing:
        text += f" but no {quoted(missing)}"
    if extra:
        text += f"{' and' if missing else ' with'} unexpected {quoted(extra)}"
    kind = next((k for keys, k in _KNOWN_STATES if keys == found), None)
    if kind is not None:
        text += f": it looks like {kind}"
    elif "exp_avg_q" in found and "exp_avg_q" not in expected:
        text += (": it looks like an 8-bit AdaTAM(W) state; convert it with "
                 "tam_hf.optim.tam8bit.dequantize_state_dict(state_dict) first")
    return f"{text} (expected {names(expected)})"


# ---------------------------------------------------------------------------------------------- optimizer


class TorqueOptimizer(Optimizer):
    """The base of TAM, AdaTAM and AdaTAMW: validation of parameters and loaded state, lazy state, one step flow,
    damping readout. Public interface for the layers above (the distributed wiring, telemetry, checkpoints):

    * ``state_buffers``: names of the parameter-shaped state tensors, first moment first (``("exp_avg",
      "exp_avg_sq")``; TAM ``("momentum_buffer",)``). ``state_scalars``: names of the 0-dim ones (``("s",
      "step")``; TAM ``("s",)``). A flat ZeRO partition keeps each scalar as a vector with one entry per fragment
      under :data:`FRAGMENT_SCALAR_KEYS`; :meth:`load_state_dict` accepts both layouts.
    * ``stats_reducer``: None, or a callable the distributed wiring installs (:class:`StatsReducer`). ``step()``
      calls it ONCE per call, whatever the number of param groups, with a ``[n, 3]`` float64 tensor: one row
      ``(m.g, |m|^2, |g|^2)`` per tensor that has a gradient, param group by param group in parameter order
      (zeros for ``fixed_damping`` groups), summed over the part of the tensor this process holds. It must return
      a tensor of the same shape holding each row's sums over the whole logical tensor; the optimizer then sums a
      ``cosine_scope="global"`` group's rows itself. Under a reducer each step is a statistics pass and an
      update pass (the one-pass fused kernel needs the statistics first).
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
            _triton().check_group(group["params"], index)  # dtypes, one device, and whether Triton runs there
        elif group["fused"]:
            _fused.load()  # raise now, with the compiler's message, rather than at the first step

    def _rule(self, group) -> _Rule:
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
                problem = _input_problem(p, p.grad, self.state.get(p) if fused else None, fused,
                                         group["params"][0].device)
                if problem is not None:
                    what, detail = problem
                    raise RuntimeError(f"{type(self).__name__} {what}: param group {gi}, parameter {i} "
                                       f"{_describe(p)}: {detail}")
                params.append(p)
            out.append(params)
        return out

    def _group_step(self, group: dict, params: list[Tensor]) -> "_GroupStep":
        """Creates missing state (lazily: FSDP2 and DeepSpeed swap parameters after construction), counts the
        step, and gathers what the step flow needs."""
        state = self.state
        group_s = None
        if group["cosine_scope"] == "global":
            group_s = next((state[p]["s"] for p in group["params"] if "s" in state.get(p, ())), None)
        impl = _default_impl(params, group["foreach"], group["fused"])
        for p in params:
            if not state[p]:
                self._init_state(p, state[p])
                if _float32_moments(group.get("moment_dtype", "auto"), impl, p):
                    for name in self.state_buffers:  # 16-bit moments lose the update (hyperparams.MOMENT_DTYPES)
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
        return _GroupStep(
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
        _torque_step([work for _, work in works], self.stats_reducer)
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
        optimizer is left as it was. (Before the check, a state saved for smaller tensors made the fused kernels
        read past their buffers, one for larger tensors trained silently, and another optimizer's failed later.)"""
        self._check_state_dict(state_dict)
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
            for key in self.state_buffers:  # float32 moments of 16-bit parameters stay float32 (hyperparams.MOMENT_DTYPES)
                if key in saved and saved[key].dtype == torch.float32 and p.dtype in (torch.bfloat16, torch.float16):
                    self.state[p][key] = saved[key].detach().to(device=p.device).clone()

    def _check_state_dict(self, state_dict: dict) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, self.param_groups)):
            return  # torch's own load_state_dict says so, before changing anything
        saved_state = state_dict["state"]
        for gi, (saved_group, group) in enumerate(zip(saved_groups, self.param_groups)):
            for i, (pid, p) in enumerate(zip(saved_group["params"], group["params"])):
                entry = saved_state.get(pid)
                if entry:  # absent or empty: the tensor never stepped
                    self._check_state_entry(gi, i, p, entry)

    def _check_state_entry(self, group_index: int, index: int, p: Tensor, entry: dict) -> None:
        """Raises ``ValueError`` unless ``entry`` is this optimizer's state for ``p``: either whole-tensor
        (``state_buffers`` shaped like p and floating point, 0-dim ``state_scalars``, s floating point) or a flat
        ZeRO partition's (the same buffers, each scalar a vector with one entry per fragment). A subclass that
        stores state in another layout (quantized moments) overrides this."""
        def fail(what: str):
            raise ValueError(f"{type(self).__name__}.load_state_dict: the saved state does not fit param group "
                             f"{group_index}, parameter {index} {_describe(p)}: {what}")

        found = set(entry)
        whole = {*self.state_buffers, *self.state_scalars}
        fragments = {*self.state_buffers, *(FRAGMENT_SCALAR_KEYS[k] for k in self.state_scalars)}
        if found not in (whole, fragments):
            fail(_describe_keys(found, fragments if FRAGMENT_SCALAR_KEYS["s"] in found else whole))
        for name in sorted(found, key=str):
            t = entry[name]
            if not isinstance(t, Tensor):
                fail(f"{name} is a {type(t).__name__}, expected a tensor")
            if t.is_complex() or t.is_sparse:
                fail(f"{name} is a {t.dtype} {t.layout} tensor, expected a dense real one")
        for name in self.state_buffers:
            t = entry[name]
            if not t.is_floating_point():
                fail(f"{name} is {t.dtype}, expected floating point (the parameter is {p.dtype})")
            if t.shape != p.shape:
                fail(f"{name} has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}")
        if found == whole:
            s = entry["s"]
            if s.dim() != 0 or not s.is_floating_point():
                fail(f"s must be a 0-dim floating-point tensor, found "
                     f"{'shape ' + str(tuple(s.shape)) if s.dim() else s.dtype}")
            if "step" in found and entry["step"].dim() != 0:
                fail(f"step must be a 0-dim tensor, found shape {tuple(entry['step'].shape)}")
            return
        s_key, step_key = FRAGMENT_SCALAR_KEYS["s"], FRAGMENT_SCALAR_KEYS["step"]
        s = entry[s_key]
        if s.dim() != 1 or not s.is_floating_point():
            fail(f"{s_key} must be a 1-dim floating-point tensor (one entry per fragment), found {s.dtype} of shape "
                 f"{tuple(s.shape)}")
        if step_key in found and tuple(entry[step_key].shape) != tuple(s.shape):
            fail(f"{step_key} holds {entry[step_key].numel()} entries, {s_key} {s.numel()}")


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
            but in bfloat16 small updates of the second moment round away; see :data:`tam_hf.optim.hyperparams.MOMENT_DTYPES`).

    State per tensor: ``momentum_buffer`` (parameter-sized) and ``s`` (0-dim, float32 or wider).
    """

    state_buffers = ("momentum_buffer",)
    state_scalars = ("s",)

    @TAM_ARGS.init
    def __init__(self, params, **defaults):
        super().__init__(params, defaults)

    def _rule(self, group) -> _Rule:
        return _Rule(
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
    rule = _Rule(adaptive=False, lr=lr, beta1=momentum, beta2=0.0, eps=0.0, weight_decay=weight_decay,
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
    rule = _Rule(adaptive=True, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
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
        problem = _input_problem(p, g, state, bool(fused), params[0].device)
        if problem is not None:
            what, detail = problem
            name = "AdaTAM" if rule.adaptive else "TAM"
            raise RuntimeError(f"{name} {what}: tensor {i} {_describe(p)}: {detail}")
    if not params:
        return
    work = _GroupStep(rule=rule, params=list(params), grads=list(grads), exp_avgs=list(exp_avgs),
                      exp_avg_sqs=None if exp_avg_sqs is None else list(exp_avg_sqs), s=list(s), scope=scope,
                      impl=_default_impl(params, foreach, fused), steps=None if steps is None else list(steps))
    _torque_step([work], stats_reducer)


# ------------------------------------------------------------------------------------------- the step flow


def _float32_moments(moment_dtype: str, impl: str, p: Tensor) -> bool:
    """Whether a 16-bit parameter's moments are created in float32 (see :data:`tam_hf.optim.hyperparams.MOMENT_DTYPES`)."""
    if p.dtype not in (torch.bfloat16, torch.float16):
        return False
    return moment_dtype == "float32" or (moment_dtype == "auto" and impl == "triton")


def _default_impl(params: list[Tensor], foreach: Optional[bool], fused: Optional[bool]) -> str:
    """The code path (a key of ``_PATHS``) for these tensors: what the caller forced, else the fastest exact one.
    The one place a path is chosen, for the classes (per param group) and the functional API alike. ``fused``
    means the Triton kernels for CUDA/ROCm tensors (CPU ones under ``TAM_HF_TRITON_ON_CPU=1``, tests only)."""
    device = params[0].device
    if fused:
        return "triton" if triton_wanted(device) else "fused"
    if foreach:
        return "foreach"
    if foreach is None and fused is None:
        if (triton_wanted(device) and all(p.device == device for p in params)
                and _triton().available(device, warn=True)):
            return "triton"
        if all(p.is_cpu for p in params) and _fused.available(warn=True):
            return "fused"
        if all(not (p.is_cpu or p.is_meta) for p in params):
            return "foreach"
    return "single"


@dataclass(eq=False)
class _GroupStep:
    """One param group's tensors that take this step (all have gradients), in parameter order, with the rule and
    the code path. TAM has no ``exp_avg_sqs`` (None) and calls its momentum ``exp_avgs``; ``s`` may be None where
    only statistics or an update are asked for."""

    rule: _Rule
    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: Optional[list[Tensor]]
    s: Optional[list[Tensor]]
    scope: str = "tensor"
    impl: str = "single"
    steps: Optional[list] = None  # step counts, this step included (bias_correction): numbers or 0-dim tensors

    @property
    def vs(self) -> list:
        return self.exp_avg_sqs if self.exp_avg_sqs is not None else [None] * len(self.params)

    def take(self, idx: list[int]) -> "_GroupStep":
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return replace(self, params=pick(self.params), grads=pick(self.grads), exp_avgs=pick(self.exp_avgs),
                       exp_avg_sqs=pick(self.exp_avg_sqs), s=pick(self.s), steps=pick(self.steps))

    def folded(self) -> "_GroupStep":
        """The same step with maximize and coupled weight decay folded into materialised gradients, once, for the
        eager paths (the kernels fold them on the fly from the raw gradient)."""
        r = self.rule
        if not r.maximize and not r.coupled_wd:
            return self
        grads = [_effective_grad(r, p, g) for p, g in zip(self.params, self.grads)]
        return replace(self, grads=grads, rule=r.folded())


class _Part(NamedTuple):
    """The tensors of a group one path processes: ``idx`` their positions in the group (None: all of them)."""

    path: "_Path"
    idx: Optional[list[int]]
    work: _GroupStep


def _plan(work: _GroupStep) -> list[_Part]:
    """The group's parts: one in the common case; a kernel path hands the tensors it cannot take (bf16, strided,
    DTensor) to the single-tensor path."""
    path = _PATHS[work.impl]
    if path.takes is None:
        return [_Part(path, None, work.folded())]
    vs = work.vs
    keep = [i for i, (p, g, m, v) in enumerate(zip(work.params, work.grads, work.exp_avgs, vs))
            if path.takes(p, g, m, v)]
    if len(keep) == len(work.params):
        return [_Part(path, None, work)]
    rest = sorted(set(range(len(work.params))) - set(keep))
    parts = [_Part(path, keep, work.take(keep))] if keep else []
    return parts + [_Part(_PATHS["single"], rest, replace(work.take(rest), impl="single").folded())]


def _torque_step(works: list[_GroupStep], stats_reducer: Optional[StatsReducer] = None) -> None:
    """One step of every group: statistics -> optional reducer (ONE call for all groups) -> damping -> update.

    On one process, tensor scope, tensors are independent: a path with a one-pass kernel runs statistics, damping
    and update back to back per tensor, so the update finds m and g still in cache."""
    phased: list[tuple[_GroupStep, list[_Part]]] = []
    for work in works:
        parts = _plan(work)
        if stats_reducer is not None or work.scope != "tensor":
            phased.append((work, parts))
            continue
        for part in parts:
            if part.path.step is not None and work.rule.fixed_damping is None:
                part.path.step(part.work)
            else:
                phased.append((part.work, [part._replace(idx=None)]))
    if not phased:
        return
    rows = [_group_statistics(work, parts) for work, parts in phased]
    if stats_reducer is not None:
        rows = list(stats_reducer(torch.cat(rows)).split([len(r) for r in rows]))
    for (work, parts), stats in zip(phased, rows):
        _update_parts(parts, _advance_damping(work.rule, stats, work.s, work.scope))


def _group_statistics(work: _GroupStep, parts: list[_Part]) -> Tensor:
    """[n, 3] float64 rows (m.g, |m|^2, |g|^2) of the group's tensors as held here (zeros under fixed_damping,
    which needs none but still takes part in the step's one reduction)."""
    if work.rule.fixed_damping is None and len(parts) == 1 and parts[0].idx is None:
        return parts[0].path.statistics(parts[0].work)
    rows = torch.zeros(len(work.params), 3, dtype=torch.float64, device=work.params[0].device)
    if work.rule.fixed_damping is None:
        for part in parts:
            rows[part.idx] = part.path.statistics(part.work).to(rows.device)
    return rows


def _update_parts(parts: list[_Part], coeffs: list[Tensor]) -> None:
    for part in parts:
        part.path.update(part.work, coeffs if part.idx is None else [coeffs[i] for i in part.idx])


# The three phases of the flow, on plain lists, for subclasses that keep state in another form (8-bit moments:
# dequantize to float32 temporaries, call these, requantize) and must still take the same math.


def _torque_statistics(rule: _Rule, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *,
                       impl: str) -> Tensor:
    """Statistics of (m, g) pairs: [n, 3] float64 rows (m.g, |m|^2, |g|^2), g after maximize and coupled weight
    decay, on path ``impl`` (see :func:`_default_impl`). Zeros under ``fixed_damping``."""
    work = _GroupStep(rule, list(params), list(grads), list(exp_avgs), None, None, impl=impl)
    return _group_statistics(work, _plan(work))


def _advance_damping(rule: _Rule, stats: Tensor, s: list[Tensor], scope: str) -> list[Tensor]:
    """Advances every ``s`` in place from the (reduced) statistics; returns each tensor's gradient coefficient
    ``d + damping_eps`` (0-dim, in the dtype of its ``s``). Under ``fixed_damping``: s = 2 d - 1 (so
    :meth:`TorqueOptimizer.damping` reports it) and the fixed coefficient, no statistics read."""
    if rule.fixed_damping is not None:
        for x in s:
            x.fill_(2.0 * rule.fixed_damping - 1.0)
        return [torch.tensor(rule.fixed_damping + rule.damping_eps, dtype=x.dtype, device=x.device) for x in s]
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


def _apply_update(rule: _Rule, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                  exp_avg_sqs: Optional[list[Tensor]], coeffs: list[Tensor], *, impl: str,
                  steps: Optional[list[float]] = None) -> None:
    """m = beta1 m + coeff g (and v, p) for each tensor, on path ``impl``; ``steps`` under bias_correction."""
    work = _GroupStep(rule, list(params), list(grads), list(exp_avgs),
                      None if exp_avg_sqs is None else list(exp_avg_sqs), None, impl=impl, steps=steps)
    _update_parts(_plan(work), list(coeffs))


def _batches(work: _GroupStep, coeffs: Optional[list] = None, *, by_dtype: bool = False):
    """(sub-step, its coefficients) per distinct rule (under bias_correction tensors that missed steps have their
    own count) and, for kernels compiled per dtype, per dtype. The step itself in the common case."""
    rules = None
    if work.rule.bias_correction:
        if work.steps is None:
            raise ValueError("bias_correction needs each tensor's step count")
        counts = [float(t) for t in work.steps]  # a host sync per tensor for counts on an accelerator
        by_step = {t: work.rule.at_step(t) for t in set(counts)}
        rules = [by_step[t] for t in counts]
    dtypes = [p.dtype for p in work.params] if by_dtype else None
    if rules is None and (dtypes is None or all(d is dtypes[0] for d in dtypes)):
        return [(work, coeffs)]
    keys: dict = {}
    for i in range(len(work.params)):
        keys.setdefault((rules[i] if rules else work.rule, dtypes[i] if dtypes else None), []).append(i)
    return [(replace(work.take(idx), rule=rule), None if coeffs is None else [coeffs[i] for i in idx])
            for (rule, _), idx in keys.items()]


# ------------------------------------------------------------------------------------------------ kernels


def _effective_grad(rule: _Rule, p: Tensor, g: Tensor) -> Tensor:
    if rule.maximize:
        g = -g
    if rule.coupled_wd:
        g = g.add(p, alpha=rule.coupled_wd)
    return g


def _stat_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _single_tensor_statistics(work: _GroupStep) -> Tensor:
    """[n, 3] float64 rows, each tensor reduced in at least float32."""
    rows = []
    for m, g in zip(work.exp_avgs, work.grads):
        mf, gf = m.reshape(-1).to(_stat_dtype(m)), g.reshape(-1).to(_stat_dtype(g))
        rows.append(torch.stack([torch.dot(mf, gf), torch.dot(mf, mf), torch.dot(gf, gf)]).double())
    return torch.stack(rows)


def _multi_tensor_statistics(work: _GroupStep) -> Tensor:
    ms, gs = work.exp_avgs, work.grads
    dtype = _stat_dtype(ms[0])
    if not all(m.dtype == ms[0].dtype for m in ms + gs):  # _foreach_norm wants one dtype
        return _single_tensor_statistics(work)
    norm_m = torch.stack(torch._foreach_norm(ms, 2, dtype=dtype))
    norm_g = torch.stack(torch._foreach_norm(gs, 2, dtype=dtype))
    dots = torch.stack([torch.dot(m.reshape(-1).to(dtype), g.reshape(-1).to(dtype)) for m, g in zip(ms, gs)])
    return torch.stack([dots, norm_m.square(), norm_g.square()], dim=1).double()


def _single_tensor_update(work: _GroupStep, coeffs: list[Tensor]) -> None:
    for sub, sub_coeffs in _batches(work, coeffs):
        rule = sub.rule
        for p, g, m, v, a in zip(sub.params, sub.grads, sub.exp_avgs, sub.vs, sub_coeffs):
            m.mul_(rule.beta1).addcmul_(g, a)
            if not rule.adaptive:
                p.add_(m, alpha=-rule.lr)
                continue
            v.mul_(rule.beta2).addcmul_(g, g, value=1.0 - rule.beta2)
            if rule.decoupled and rule.weight_decay:
                p.mul_(rule.decay)
            p.addcdiv_(m, v.sqrt().add_(rule.update_eps), value=-rule.update_lr)


def _multi_tensor_update(work: _GroupStep, coeffs: list[Tensor]) -> None:
    for sub, sub_coeffs in _batches(work, coeffs):
        rule = sub.rule
        groups: dict = {}
        for i, p in enumerate(sub.params):
            groups.setdefault((p.device, p.dtype), []).append(i)
        for idx in groups.values():
            p, g, m, a = ([xs[i] for i in idx] for xs in (sub.params, sub.grads, sub.exp_avgs, sub_coeffs))
            if any(x.dtype != y.dtype for x, y in zip(g, m)):  # float32 moments of 16-bit parameters: g * a in float32
                g = [x.to(y.dtype) for x, y in zip(g, m)]
            torch._foreach_mul_(m, rule.beta1)
            torch._foreach_add_(m, torch._foreach_mul(g, a))
            if not rule.adaptive:
                torch._foreach_add_(p, m, alpha=-rule.lr)
                continue
            v = [sub.exp_avg_sqs[i] for i in idx]
            torch._foreach_mul_(v, rule.beta2)
            torch._foreach_addcmul_(v, g, g, value=1.0 - rule.beta2)
            if rule.decoupled and rule.weight_decay:
                torch._foreach_mul_(p, rule.decay)
            denom = torch._foreach_sqrt(v)
            torch._foreach_add_(denom, rule.update_eps)
            torch._foreach_addcdiv_(p, m, denom, value=-rule.update_lr)


def _fused_takes(p: Tensor, g: Tensor, m: Tensor, v: Optional[Tensor]) -> bool:
    return _fused.supports(p, g, m) if v is None else _fused.supports(p, g, m, v)


def _fused_statistics(work: _GroupStep) -> Tensor:
    """The statistics kernel over raw gradients (maximize and coupled weight decay applied on the fly), one call
    per dtype."""
    r = work.rule

    def rows_of(w: _GroupStep) -> Tensor:
        return _fused.statistics(w.params, w.grads, w.exp_avgs, sign=r.sign, weight_decay=r.coupled_wd)

    dtypes = [p.dtype for p in work.params]
    if all(d is dtypes[0] for d in dtypes):
        return rows_of(work)
    rows = torch.zeros(len(dtypes), 3, dtype=torch.float64)
    for dtype in dict.fromkeys(dtypes):
        idx = [i for i, d in enumerate(dtypes) if d is dtype]
        rows[idx] = rows_of(work.take(idx))
    return rows


def _fused_update(work: _GroupStep, coeffs: list[Tensor]) -> None:
    for sub, a in _batches(work, coeffs, by_dtype=True):
        r = sub.rule
        if r.adaptive:
            _fused.adatam_update(sub.params, sub.grads, sub.exp_avgs, sub.exp_avg_sqs, a, sign=r.sign,
                                 weight_decay=r.coupled_wd, beta1=r.beta1, beta2=r.beta2, lr=r.update_lr,
                                 eps=r.update_eps, decay=r.decay)
        else:
            _fused.tam_update(sub.params, sub.grads, sub.exp_avgs, a, sign=r.sign, weight_decay=r.coupled_wd,
                              momentum=r.beta1, lr=r.lr)


def _fused_step(work: _GroupStep) -> None:
    """Tensor scope on one process: statistics, damping and update back to back per tensor, all tensors of a dtype
    (and a step count, under bias_correction) in one kernel call."""
    for sub, _ in _batches(work, by_dtype=True):
        r = sub.rule
        if r.adaptive:
            _fused.adatam_step(sub.params, sub.grads, sub.exp_avgs, sub.exp_avg_sqs, sub.s, sign=r.sign,
                               weight_decay=r.coupled_wd, beta1=r.beta1, beta2=r.beta2, lr=r.update_lr,
                               eps=r.update_eps, decay=r.decay, decay_rate=r.decay_rate, damping_eps=r.damping_eps)
        else:
            _fused.tam_step(sub.params, sub.grads, sub.exp_avgs, sub.s, sign=r.sign, weight_decay=r.coupled_wd,
                            momentum=r.beta1, lr=r.lr, decay_rate=r.decay_rate, damping_eps=r.damping_eps)


def _triton():
    # Imported here, not with this module: it costs triton and torch._dynamo (seconds), which CPU runs and
    # recipe validation never need.
    from tam_hf.optim import triton_kernels

    return triton_kernels


def _triton_statistics(work: _GroupStep) -> Tensor:
    return _triton().statistics(work)


def _triton_update(work: _GroupStep, coeffs: list[Tensor]) -> None:
    _triton().update(work, coeffs)


def _triton_step(work: _GroupStep) -> None:
    _triton().step(work)


def _triton_takes(p: Tensor, g: Tensor, m: Tensor, v: Optional[Tensor]) -> bool:
    return _triton().takes(p, g, m, v)


class _Path(NamedTuple):
    """One code path. ``statistics(work)`` -> [n, 3] float64 rows; ``update(work, coeffs)`` applies m (v) and p;
    ``step(work)``, where given, does statistics, damping and update in one pass (tensor scope, no reducer).
    ``takes(p, g, m, v)``: None for an eager path, which takes any tensor and gets gradients with maximize and
    coupled weight decay folded in; for a kernel path, which tensors it can process (they fold those on the fly)."""

    statistics: Callable[[_GroupStep], Tensor]
    update: Callable[[_GroupStep, list[Tensor]], None]
    step: Optional[Callable[[_GroupStep], None]] = None
    takes: Optional[Callable[..., bool]] = None


_PATHS: dict[str, _Path] = {
    "single": _Path(_single_tensor_statistics, _single_tensor_update),
    "foreach": _Path(_multi_tensor_statistics, _multi_tensor_update),
    "fused": _Path(_fused_statistics, _fused_update, step=_fused_step, takes=_fused_takes),
    "triton": _Path(_triton_statistics, _triton_update, step=_triton_step, takes=_triton_takes),
}
