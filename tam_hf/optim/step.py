r"""One TAM step over param groups: the step flow shared by the classes and the functional API of
:mod:`tam_hf.optim.tam`, and its code paths.

:func:`torque_step` runs, for every group: statistics -> the optional ``stats_reducer`` (sharded tensors; ONE
call for all groups) -> damping -> update. A :class:`GroupStep` carries one group's tensors, its :class:`Rule`
(the hyperparameters of the update) and its code path, chosen once per group (or functional call) by
:func:`default_impl`; the path names an entry of ``_PATHS``:

* ``"single"``: ``_single_tensor_statistics`` / ``_single_tensor_update``, a loop over tensors;
* ``"foreach"``: ``_multi_tensor_statistics`` / ``_multi_tensor_update``, ``torch._foreach_*`` launches;
* ``"fused"``: ``_fused_statistics`` / ``_fused_update`` and ``_fused_step`` (statistics, damping and update back
  to back per tensor, used where nothing sits between them), the checked CPU kernels of ``fused.py``;
* ``"triton"``: ``statistics`` / ``update`` / ``step`` of ``triton_kernels.py``, ``fused=True`` on CUDA/ROCm.

The default is the Triton kernels on CUDA/ROCm where they run (else foreach, with one warning), fused on CPU
when the C kernels compiled, and the single-tensor loop otherwise. A kernel path says which tensors it takes;
the others of its group go to the single-tensor path. ``triton_kernels`` (which brings triton and
``torch._dynamo``) is imported on the first step, or ``fused=True`` check, of a CUDA/ROCm tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from tam_hf.optim import fused as _fused
from tam_hf.optim.triton_devices import wanted as triton_wanted

__all__ = ["StatsReducer", "Rule", "GroupStep", "default_impl", "float32_moments", "input_problem", "describe",
           "torque_step"]

# Maps the [n_tensors, 3] float64 partial sums (m.g, |m|^2, |g|^2) held by this process to the sums over each
# whole logical tensor; see TorqueOptimizer. None on a single process; the distributed wiring installs one.
StatsReducer = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Rule:
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

    def at_step(self, t: float) -> "Rule":
        """The rule of a tensor at its step ``t``. Under bias_correction, m / (1 - beta1^t) and sqrt(v / (1 - beta2^t))
        are folded into lr and eps: lr m_hat / (sqrt(v_hat) + eps) = lr sqrt(bc2) / bc1 * m / (sqrt(v) + eps sqrt(bc2)).
        The result needs no step count any more (``bias_correction`` off, the factors set)."""
        if not self.bias_correction:
            return self
        bc1, bc2 = 1.0 - self.beta1 ** t, 1.0 - self.beta2 ** t
        return replace(self, bias_correction=False, lr_factor=math.sqrt(bc2) / bc1, eps_factor=math.sqrt(bc2))

    def folded(self) -> "Rule":
        """The rule to apply to a gradient that already carries maximize and coupled weight decay."""
        return replace(self, maximize=False, weight_decay=self.weight_decay * self.decoupled)


@dataclass(eq=False)
class GroupStep:
    """One param group's tensors that take this step (all have gradients), in parameter order, with the rule and
    the code path. TAM has no ``exp_avg_sqs`` (None) and calls its momentum ``exp_avgs``; ``s`` may be None where
    only statistics or an update are asked for."""

    rule: Rule
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

    def take(self, idx: list[int]) -> "GroupStep":
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return replace(self, params=pick(self.params), grads=pick(self.grads), exp_avgs=pick(self.exp_avgs),
                       exp_avg_sqs=pick(self.exp_avg_sqs), s=pick(self.s), steps=pick(self.steps))

    def folded(self) -> "GroupStep":
        """The same step with maximize and coupled weight decay folded into materialised gradients, once, for the
        eager paths (the kernels fold them on the fly from the raw gradient)."""
        r = self.rule
        if not r.maximize and not r.coupled_wd:
            return self
        grads = [_effective_grad(r, p, g) for p, g in zip(self.params, self.grads)]
        return replace(self, grads=grads, rule=r.folded())


def float32_moments(moment_dtype: str, impl: str, p: Tensor) -> bool:
    """Whether a 16-bit parameter's moments are created in float32 (see
    :data:`tam_hf.optim.hyperparams.MOMENT_DTYPES`)."""
    if p.dtype not in (torch.bfloat16, torch.float16):
        return False
    return moment_dtype == "float32" or (moment_dtype == "auto" and impl == "triton")


def default_impl(params: list[Tensor], foreach: Optional[bool], fused: Optional[bool]) -> str:
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


def describe(p: Tensor) -> str:
    """How error messages name a tensor."""
    return f"(shape {tuple(p.shape)}, {p.dtype})"


def input_problem(p: Tensor, g: Tensor, state: Optional[dict], fused: bool,
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


class _Part(NamedTuple):
    """The tensors of a group one path processes: ``idx`` their positions in the group (None: all of them)."""

    path: "_Path"
    idx: Optional[list[int]]
    work: GroupStep


def _plan(work: GroupStep) -> list[_Part]:
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


def torque_step(works: list[GroupStep], stats_reducer: Optional[StatsReducer] = None) -> None:
    """One step of every group: statistics -> optional reducer (ONE call for all groups) -> damping -> update.

    On one process, tensor scope, tensors are independent: a path with a one-pass kernel runs statistics, damping
    and update back to back per tensor, so the update finds m and g still in cache."""
    phased: list[tuple[GroupStep, list[_Part]]] = []
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


def _group_statistics(work: GroupStep, parts: list[_Part]) -> Tensor:
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


def _advance_damping(rule: Rule, stats: Tensor, s: list[Tensor], scope: str) -> list[Tensor]:
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


def _batches(work: GroupStep, coeffs: Optional[list] = None, *, by_dtype: bool = False):
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


# ---------------------------------------------------------------------------------------------- code paths


def _effective_grad(rule: Rule, p: Tensor, g: Tensor) -> Tensor:
    if rule.maximize:
        g = -g
    if rule.coupled_wd:
        g = g.add(p, alpha=rule.coupled_wd)
    return g


def _stat_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _single_tensor_statistics(work: GroupStep) -> Tensor:
    """[n, 3] float64 rows, each tensor reduced in at least float32."""
    rows = []
    for m, g in zip(work.exp_avgs, work.grads):
        mf, gf = m.reshape(-1).to(_stat_dtype(m)), g.reshape(-1).to(_stat_dtype(g))
        rows.append(torch.stack([torch.dot(mf, gf), torch.dot(mf, mf), torch.dot(gf, gf)]).double())
    return torch.stack(rows)


def _multi_tensor_statistics(work: GroupStep) -> Tensor:
    ms, gs = work.exp_avgs, work.grads
    dtype = _stat_dtype(ms[0])
    if not all(m.dtype == ms[0].dtype for m in ms + gs):  # _foreach_norm wants one dtype
        return _single_tensor_statistics(work)
    norm_m = torch.stack(torch._foreach_norm(ms, 2, dtype=dtype))
    norm_g = torch.stack(torch._foreach_norm(gs, 2, dtype=dtype))
    dots = torch.stack([torch.dot(m.reshape(-1).to(dtype), g.reshape(-1).to(dtype)) for m, g in zip(ms, gs)])
    return torch.stack([dots, norm_m.square(), norm_g.square()], dim=1).double()


def _single_tensor_update(work: GroupStep, coeffs: list[Tensor]) -> None:
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


def _multi_tensor_update(work: GroupStep, coeffs: list[Tensor]) -> None:
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


def _fused_statistics(work: GroupStep) -> Tensor:
    """The statistics kernel over raw gradients (maximize and coupled weight decay applied on the fly), one call
    per dtype."""
    r = work.rule

    def rows_of(w: GroupStep) -> Tensor:
        return _fused.statistics(w.params, w.grads, w.exp_avgs, sign=r.sign, weight_decay=r.coupled_wd)

    dtypes = [p.dtype for p in work.params]
    if all(d is dtypes[0] for d in dtypes):
        return rows_of(work)
    rows = torch.zeros(len(dtypes), 3, dtype=torch.float64)
    for dtype in dict.fromkeys(dtypes):
        idx = [i for i, d in enumerate(dtypes) if d is dtype]
        rows[idx] = rows_of(work.take(idx))
    return rows


def _fused_update(work: GroupStep, coeffs: list[Tensor]) -> None:
    for sub, a in _batches(work, coeffs, by_dtype=True):
        r = sub.rule
        if r.adaptive:
            _fused.adatam_update(sub.params, sub.grads, sub.exp_avgs, sub.exp_avg_sqs, a, sign=r.sign,
                                 weight_decay=r.coupled_wd, beta1=r.beta1, beta2=r.beta2, lr=r.update_lr,
                                 eps=r.update_eps, decay=r.decay)
        else:
            _fused.tam_update(sub.params, sub.grads, sub.exp_avgs, a, sign=r.sign, weight_decay=r.coupled_wd,
                              momentum=r.beta1, lr=r.lr)


def _fused_step(work: GroupStep) -> None:
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


def _triton_statistics(work: GroupStep) -> Tensor:
    return _triton().statistics(work)


def _triton_update(work: GroupStep, coeffs: list[Tensor]) -> None:
    _triton().update(work, coeffs)


def _triton_step(work: GroupStep) -> None:
    _triton().step(work)


def _triton_takes(p: Tensor, g: Tensor, m: Tensor, v: Optional[Tensor]) -> bool:
    return _triton().takes(p, g, m, v)


class _Path(NamedTuple):
    """One code path. ``statistics(work)`` -> [n, 3] float64 rows; ``update(work, coeffs)`` applies m (v) and p;
    ``step(work)``, where given, does statistics, damping and update in one pass (tensor scope, no reducer).
    ``takes(p, g, m, v)``: None for an eager path, which takes any tensor and gets gradients with maximize and
    coupled weight decay folded in; for a kernel path, which tensors it can process (they fold those on the fly)."""

    statistics: Callable[[GroupStep], Tensor]
    update: Callable[[GroupStep, list[Tensor]], None]
    step: Optional[Callable[[GroupStep], None]] = None
    takes: Optional[Callable[..., bool]] = None


_PATHS: dict[str, _Path] = {
    "single": _Path(_single_tensor_statistics, _single_tensor_update),
    "foreach": _Path(_multi_tensor_statistics, _multi_tensor_update),
    "fused": _Path(_fused_statistics, _fused_update, step=_fused_step, takes=_fused_takes),
    "triton": _Path(_triton_statistics, _triton_update, step=_triton_step, takes=_triton_takes),
}
