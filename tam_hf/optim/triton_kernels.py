"""Fused Triton kernels for TAM / AdaTAM / AdaTAMW on CUDA and ROCm tensors: the GPU side of ``fused=True``.

A step of a param group is three launches over ALL its tensors, whatever their number and dtypes:

1. ``_stats_kernel``, one program per chunk of ``CHUNK`` elements: the chunk's partial sums (m.g, |m|^2, |g|^2),
   ``g`` after ``maximize`` and coupled weight decay, into a ``[n_chunks, 3]`` float64 buffer;
2. ``_advance_kernel``, one program per tensor: its chunks' partials summed in chunk order, then the cosine, ``s``
   (written into the tensor's 0-dim state) and the update's coefficients (``d + damping_eps``, and under
   ``bias_correction`` lr and eps corrected with the tensor's own step count, read on the device);
3. ``_update_kernel``, one program per chunk: the elementwise update of p, m (and v).

Where something sits between statistics and update (the ``stats_reducer`` of sharded tensors, the "global" cosine
scope, ``fixed_damping``), the optimizer runs :func:`statistics` (kernels 1 and 2), its reduction and the s/d
update on the ``[n, 3]`` rows in torch, then :func:`update` (kernels 2 and 3).

The kernels reach the tensors through one int64 table of data pointers, sizes and dtype codes, with a chunk ->
tensor map. It is built with torch on the host and copied to the device (pinned, non-blocking) only when a
pointer changes: a step normally copies nothing and never waits for the device (no ``.item()``).

Numerics. Elementwise math is float32 for float32, bfloat16 and float16 tensors; m and v are read and written in
the dtype they are stored in. The optimizer gives 16-bit parameters float32 moments on this path: in bfloat16,
v = 0.999 v + 0.001 g^2 changes v by less than half an ulp unless g^2 > ~3 v, so v never decays (it rounds back)
and only grows on outliers, and m keeps 8 significant bits. Moments in the parameter's dtype halve the state
memory and are taken too, at that cost. Statistics accumulate in float64: per lane over a
chunk, then a fixed tree over the lanes, then over chunks in order. float64 keeps the cosine exact where |g|^2
overflows float32 (the CPU kernels do the same) and costs no time: the kernel streams 6-12 bytes per element and
does 3 float64 FMAs for them, within the float64 rate even of consumer GPUs (1/64 of float32). No atomics, so a
rerun gives the same bits (on the same kind of device: the chunking is fixed per device type).

Under ``torch.compile`` the entry points call ``torch.library`` custom ops (opaque to Dynamo and Inductor: no
graph break); eagerly they call the implementation directly, without the dispatcher's per-tensor overhead.

The kernels are built on first use. CPU tensors run only under the Triton interpreter (``TRITON_INTERPRET=1``
set before that first use), for tests; the interpreter truncates float32 -> bfloat16 where a GPU rounds to nearest.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import Tensor

from tam_hf.optim.triton_devices import DEVICE_TYPES, FORCE_ON_CPU

__all__ = ["SUPPORTED_DTYPES", "available", "load", "check_group", "input_problem", "takes", "statistics", "update",
           "step"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# Elements per program and per loop iteration. On a GPU a chunk streams a while, and a 1B-parameter model still
# gives ~16k programs (no tail effect). The interpreter gets tiny chunks so that tests of a few hundred
# elements cross chunk and block boundaries.
_GPU_CONFIG = dict(chunk=65536, block=1024, reduce_block=256, num_warps=4)
_CPU_CONFIG = dict(chunk=128, block=32, reduce_block=2, num_warps=1)

# _advance_kernel modes
_REDUCE, _REDUCE_ADVANCE, _GIVEN = 0, 1, 2

# ------------------------------------------------------------------------------------------------ kernels
#
# Written at module level as plain functions, turned into Triton functions by _build() on first use, so that
# importing this module neither imports triton nor fixes whether kernels are compiled or interpreted.

_DEVICE_FNS: dict = {}
_COMBINE_FNS: dict = {}
_KERNELS: dict = {}
tl = triton = None  # bound by _build()


def _device_fn(fn):
    _DEVICE_FNS[fn.__name__] = fn
    return fn


def _kernel(fn):
    _KERNELS[fn.__name__] = fn
    return fn


def _combine_fn(fn):
    _COMBINE_FNS[fn.__name__] = fn
    return fn


# Only builtins of triton.language, no function of its standard library (tl.sum, tl.zeros, ...): those were made
# jitted or interpreted when triton was imported, and tests may turn the interpreter on only later.


@_combine_fn
def _add(a, b):
    return a + b


# Loads and stores take a tensor's integer address and dtype code (0 float32, 1 bfloat16, 2 float16), so one
# launch serves tensors of every dtype; the branch is uniform within a program. ALIGNED (every address a multiple
# of 16 bytes, checked on the host) lets full blocks use 16-byte vector accesses; MASKED is for the last, partial
# block of a chunk only (a mask of unknown granularity would keep every access scalar).


@_device_fn
def _ptr(addr, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = addr.to(tl.pointer_type(dtype))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@_device_fn
def _ld(ptrs, mask, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(ptrs).to(tl.float32)
    return x


@_device_fn
def _st(ptrs, x, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptrs, x, mask=mask)
    else:
        tl.store(ptrs, x)


@_device_fn
def _load(addr, offs, mask, code, MASKED: tl.constexpr, ALIGNED: tl.constexpr):
    """Elements ``offs`` of the tensor at ``addr``, as float32."""
    if code == 0:
        x = _ld(_ptr(addr, tl.float32, ALIGNED) + offs, mask, MASKED)
    elif code == 1:
        x = _ld(_ptr(addr, tl.bfloat16, ALIGNED) + offs, mask, MASKED)
    else:
        x = _ld(_ptr(addr, tl.float16, ALIGNED) + offs, mask, MASKED)
    return x


@_device_fn
def _store(addr, offs, mask, code, x, MASKED: tl.constexpr, ALIGNED: tl.constexpr):
    if code == 0:
        _st(_ptr(addr, tl.float32, ALIGNED) + offs, x, mask, MASKED)
    elif code == 1:  # round to nearest on a GPU; the interpreter truncates
        _st(_ptr(addr, tl.bfloat16, ALIGNED) + offs, x.to(tl.bfloat16), mask, MASKED)
    else:
        _st(_ptr(addr, tl.float16, ALIGNED) + offs, x.to(tl.float16), mask, MASKED)


@_device_fn
def _chunk(table, n, n_chunks, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tensor, the start of its chunk, the number of full blocks, the chunk's end, dtype codes.

    The table: 8 rows of n int64 (addresses of p, g, m, v, s, step; numel; dtype codes p | g << 2 | m << 4 |
    v << 6), then each chunk's tensor, each chunk's index within its tensor, each tensor's first chunk (n + 1)."""
    c = tl.program_id(0)
    t = tl.load(table + 8 * n + c)
    start = tl.load(table + 8 * n + n_chunks + c) * CHUNK
    end = tl.minimum(start + CHUNK, tl.load(table + 6 * n + t))
    code = tl.load(table + 7 * n + t)
    return t, start, (end - start) // BLOCK, end, code


@_device_fn
def _stats_block(p_addr, g_addr, m_addr, offs, mask, code, sign, wd, HAS_WD: tl.constexpr, MASKED: tl.constexpr,
                 ALIGNED: tl.constexpr):
    g = sign * _load(g_addr, offs, mask, (code >> 2) & 3, MASKED, ALIGNED)
    if HAS_WD:
        g = g + wd * _load(p_addr, offs, mask, code & 3, MASKED, ALIGNED)
    m = _load(m_addr, offs, mask, (code >> 4) & 3, MASKED, ALIGNED).to(tl.float64)
    g = g.to(tl.float64)
    return m * g, m * m, g * g


@_kernel
def _stats_kernel(table, n, n_chunks, partial, sign, wd, HAS_WD: tl.constexpr, ALIGNED: tl.constexpr,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, n_full, end, code = _chunk(table, n, n_chunks, CHUNK, BLOCK)
    p_addr = tl.load(table + t)
    g_addr = tl.load(table + n + t)
    m_addr = tl.load(table + 2 * n + t)
    mg = tl.full([BLOCK], 0.0, tl.float64)
    mm = tl.full([BLOCK], 0.0, tl.float64)
    gg = tl.full([BLOCK], 0.0, tl.float64)
    for it in range(0, n_full):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        x, y, z = _stats_block(p_addr, g_addr, m_addr, offs, offs, code, sign, wd, HAS_WD, False, ALIGNED)
        mg += x
        mm += y
        gg += z
    if start + n_full * BLOCK < end:
        offs = start + n_full * BLOCK + tl.arange(0, BLOCK)
        x, y, z = _stats_block(p_addr, g_addr, m_addr, offs, offs < end, code, sign, wd, HAS_WD, True, ALIGNED)
        mg += x
        mm += y
        gg += z
    c = tl.program_id(0)
    tl.store(partial + 3 * c, tl.reduce(mg, 0, _add))
    tl.store(partial + 3 * c + 1, tl.reduce(mm, 0, _add))
    tl.store(partial + 3 * c + 2, tl.reduce(gg, 0, _add))


@_kernel
def _advance_kernel(table, n, n_chunks, partial, stats, given, coef, decay_rate, one_minus_decay, damping_eps, lr,
                    eps, log_beta1, log_beta2, MODE: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
                    RBLOCK: tl.constexpr):
    """MODE 0: the tensor's statistics row. 1: statistics -> cosine -> s -> coefficients. 2: coefficients from the
    given ``d + damping_eps`` (s already advanced by the caller)."""
    t = tl.program_id(0)
    one = tl.arange(0, 1)  # per-tensor values are 1-element vectors
    zero = tl.full([1], 0.0, tl.float64)  # scalars enter float64 math through it (the interpreter's are Python floats)
    if MODE == 0 or MODE == 1:  # this tensor's partials, summed in chunk order
        first = tl.load(table + 8 * n + 2 * n_chunks + t)
        last = tl.load(table + 8 * n + 2 * n_chunks + t + 1)
        a_mg = tl.full([RBLOCK], 0.0, tl.float64)
        a_mm = tl.full([RBLOCK], 0.0, tl.float64)
        a_gg = tl.full([RBLOCK], 0.0, tl.float64)
        for it in range(0, (last - first + RBLOCK - 1) // RBLOCK):
            rows = first + it * RBLOCK + tl.arange(0, RBLOCK)
            mask = rows < last
            a_mg += tl.load(partial + 3 * rows, mask=mask, other=0.0)
            a_mm += tl.load(partial + 3 * rows + 1, mask=mask, other=0.0)
            a_gg += tl.load(partial + 3 * rows + 2, mask=mask, other=0.0)
        mg = tl.reduce(a_mg, 0, _add)
        mm = tl.reduce(a_mm, 0, _add)
        gg = tl.reduce(a_gg, 0, _add)
        if MODE == 0:
            tl.store(stats + 3 * t, mg)
            tl.store(stats + 3 * t + 1, mm)
            tl.store(stats + 3 * t + 2, gg)
            return
    if MODE == 1:
        den = zero + tl.sqrt(mm) * tl.sqrt(gg)
        cos = mg / tl.where(den > 0.0, den, 1.0)
        ok = (den > 0.0) & ((cos - cos) == 0.0)  # a non-finite cosine counts as 0
        cos = tl.minimum(tl.maximum(tl.where(ok, cos, 0.0), -1.0), 1.0)
        s_ptr = tl.load(table + 4 * n + t).to(tl.pointer_type(tl.float32)) + one
        s_new = ((zero + decay_rate) * tl.load(s_ptr).to(tl.float64) + (zero + one_minus_decay) * cos)
        s_new = s_new.to(tl.float32)
        tl.store(s_ptr, s_new)
        a = ((1.0 + s_new.to(tl.float64)) * 0.5 + damping_eps).to(tl.float32)
    else:
        a = tl.load(given + t + one)
    lr_t = zero + lr
    eps_t = zero + eps
    if BIAS_CORRECTION:  # lr m_hat / (sqrt(v_hat) + eps) = lr sqrt(bc2) / bc1 * m / (sqrt(v) + eps sqrt(bc2))
        step_t = tl.load(tl.load(table + 5 * n + t).to(tl.pointer_type(tl.float32)) + one).to(tl.float64)
        bc1 = 1.0 - tl.exp(step_t * (zero + log_beta1))
        bc2 = tl.sqrt(1.0 - tl.exp(step_t * (zero + log_beta2)))
        lr_t = lr_t * bc2 / bc1
        eps_t = eps_t * bc2
    tl.store(coef + 3 * t + one, a)
    tl.store(coef + 3 * t + 1 + one, lr_t.to(tl.float32))
    tl.store(coef + 3 * t + 2 + one, eps_t.to(tl.float32))


@_device_fn
def _update_block(p_addr, g_addr, m_addr, v_addr, offs, mask, code, a, lr, eps, sign, wd, beta1, beta2,
                  one_minus_beta2, decay, ADAPTIVE: tl.constexpr, HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr,
                  MASKED: tl.constexpr, ALIGNED: tl.constexpr):
    p = _load(p_addr, offs, mask, code & 3, MASKED, ALIGNED)
    g = sign * _load(g_addr, offs, mask, (code >> 2) & 3, MASKED, ALIGNED)
    if HAS_WD:
        g = g + wd * p
    m = beta1 * _load(m_addr, offs, mask, (code >> 4) & 3, MASKED, ALIGNED) + a * g
    _store(m_addr, offs, mask, (code >> 4) & 3, m, MASKED, ALIGNED)
    if ADAPTIVE:
        v = beta2 * _load(v_addr, offs, mask, (code >> 6) & 3, MASKED, ALIGNED) + one_minus_beta2 * g * g
        _store(v_addr, offs, mask, (code >> 6) & 3, v, MASKED, ALIGNED)
        if DECOUPLED:
            p = p * decay
        p = p - lr * m / (tl.sqrt(v) + eps)
    else:
        p = p - lr * m
    _store(p_addr, offs, mask, code & 3, p, MASKED, ALIGNED)


@_kernel
def _update_kernel(table, n, n_chunks, coef, sign, wd, beta1, beta2, one_minus_beta2, decay, ADAPTIVE: tl.constexpr,
                   HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                   BLOCK: tl.constexpr):
    t, start, n_full, end, code = _chunk(table, n, n_chunks, CHUNK, BLOCK)
    p_addr = tl.load(table + t)
    g_addr = tl.load(table + n + t)
    m_addr = tl.load(table + 2 * n + t)
    v_addr = tl.load(table + 3 * n + t)
    a = tl.load(coef + 3 * t)
    lr = tl.load(coef + 3 * t + 1)
    eps = tl.load(coef + 3 * t + 2)
    for it in range(0, n_full):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        _update_block(p_addr, g_addr, m_addr, v_addr, offs, offs, code, a, lr, eps, sign, wd, beta1, beta2,
                      one_minus_beta2, decay, ADAPTIVE, HAS_WD, DECOUPLED, False, ALIGNED)
    if start + n_full * BLOCK < end:
        offs = start + n_full * BLOCK + tl.arange(0, BLOCK)
        _update_block(p_addr, g_addr, m_addr, v_addr, offs, offs < end, code, a, lr, eps, sign, wd, beta1, beta2,
                      one_minus_beta2, decay, ADAPTIVE, HAS_WD, DECOUPLED, True, ALIGNED)


# ------------------------------------------------------------------------------------------ availability

_lock = threading.RLock()
_built: Optional[bool] = None  # None: not built; else whether the kernels were built for the interpreter
_build_error: Optional[str] = None
_probed: dict = {}  # device -> None (the kernels run there) or why not
_warned = False


def _build() -> None:
    """Import triton and turn the functions above into its kernels (interpreted under TRITON_INTERPRET=1)."""
    global _built, _build_error, triton, tl
    with _lock:
        if _built is not None or _build_error is not None:
            return
        try:
            import triton as _triton
            import triton.language as _tl
        except Exception as exc:  # ImportError, or an install that fails while importing
            _build_error = f"triton is not importable ({type(exc).__name__}: {exc})"
            return
        triton, tl = _triton, _tl
        interpret = bool(triton.knobs.runtime.interpret)
        # Under the interpreter, device functions stay plain Python: it re-patches triton.language on every call
        # of a jitted one (milliseconds each), and they run inside the kernel's patch anyway.
        for name, fn in _DEVICE_FNS.items():
            globals()[name] = fn if interpret else triton.jit(fn)
        for name, fn in _COMBINE_FNS.items():
            globals()[name] = triton.jit(fn)
        for name, fn in _KERNELS.items():  # one compiled kernel whatever the number of tensors and chunks
            globals()[name] = triton.jit(fn, do_not_specialize=["n", "n_chunks"])
        _built = interpret


def _reason(device: torch.device) -> Optional[str]:
    """Why the kernels cannot run on ``device``, or None."""
    _build()
    if _build_error is not None:
        return _build_error
    if device.type == "cpu":
        if not _built:
            return (f"CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 set before the kernels' first "
                    f"use, for tests; {FORCE_ON_CPU}=1 selects them)")
    elif device.type not in DEVICE_TYPES:
        return f"they run on CUDA and ROCm devices, not {device.type}"
    key = str(device)
    with _lock:
        if key not in _probed:
            _probed[key] = _probe(device)
        return _probed[key]


class _ProbeRule:
    adaptive, lr, beta1, beta2, eps, weight_decay, decoupled, maximize = True, 0.1, 0.9, 0.999, 1e-8, 0.0, False, False
    decay_rate, damping_eps, fixed_damping, bias_correction = 0.9, 1e-8, None, False


def _probe(device: torch.device) -> Optional[str]:
    """Compile and run the kernels once on two small tensors (full blocks and a partial one): a missing compiler
    or a broken driver shows up here, with its message, rather than in the middle of a training step."""
    try:
        p = [torch.ones(3, device=device), torch.ones(2 * _config(device)["block"] + 5, device=device)]
        g = [torch.full_like(x, 0.5) for x in p]
        m, v = [torch.zeros_like(x) for x in p], [torch.zeros_like(x) for x in p]
        s = [torch.zeros((), device=device) for _ in p]
        rule = _ProbeRule()
        _step_impl(p, g, m, v, s, [], *_scalars(rule))
        if device.type != "cpu":
            torch.cuda.synchronize(device)
        # m_0 = 0, so the cosine is 0, s stays 0 and d = 0.5
        expected = 1.0 - rule.lr * (0.5 + rule.damping_eps) * 0.5 / (math.sqrt(0.001 * 0.25) + rule.eps)
        if not all(torch.allclose(x.cpu(), torch.full(x.shape, expected), rtol=1e-5) for x in p):
            return "a probe step gave wrong values"
    except Exception as exc:  # whatever the toolchain or driver raised: say what
        return f"{type(exc).__name__}: {str(exc).strip()[:2000]}"
    return None


def load(device) -> None:
    """Raise RuntimeError saying why the kernels cannot run on ``device`` (triton missing or broken, no GPU, ...)."""
    reason = _reason(torch.device(device))
    if reason is not None:
        raise RuntimeError(f"tam_hf Triton kernels unavailable on {device}: {reason}")


@torch.compiler.assume_constant_result  # under torch.compile: asked once, eagerly (the probe is never traced)
def available(device, warn: bool = False) -> bool:
    """Whether the kernels run on ``device``; with ``warn``, say once why not (the caller then takes foreach)."""
    global _warned
    reason = _reason(torch.device(device))
    if reason is not None and warn and not _warned:
        _warned = True
        warnings.warn(f"tam_hf Triton kernels unavailable on {device} ({reason}); using the foreach path",
                      RuntimeWarning, stacklevel=3)
    return reason is None


# ------------------------------------------------------------------------------------------------ checks


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2): the kernels work on what this rank holds."""
    return t.to_local() if hasattr(t, "device_mesh") and hasattr(t, "to_local") else t


def _dense(t: Tensor) -> bool:
    """Whether the elements fill ``numel`` consecutive slots from ``data_ptr()`` (contiguous, or dense in another
    order such as channels_last): then the kernels may treat the tensor as flat."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted((d for d in zip(t.shape, t.stride()) if d[0] != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def check_group(params: Sequence[Tensor], group_index: int) -> None:
    """For ``fused=True`` at construction: raises ValueError naming the first parameter the kernels cannot take
    (dtype, a second device), then RuntimeError if they cannot run on the group's device (and why)."""
    device = params[0].device
    for i, p in enumerate(params):
        if p.device != device or p.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"fused=True on {device.type} supports float32, bfloat16 and float16 parameters on one "
                             f"device per param group: parameter {i} of param group {group_index} is {p.dtype} "
                             f"on {p.device}")
    load(device)


def input_problem(p: Tensor, g: Tensor, state: Optional[dict], device: torch.device) -> Optional[tuple[str, str]]:
    """Why the kernels cannot take this parameter, as (what is not supported, detail), or None. ``device``: the
    device of the param group's first parameter (one launch serves one device). Asked for every tensor of a step
    before any state changes."""
    what = "with fused=True runs float32, bfloat16 and float16 tensors on one CUDA/ROCm device per param group"
    if p.device != device:
        return what, f"the parameter is on {p.device}, the group's first on {device}"
    if p.dtype not in SUPPORTED_DTYPES:
        return what, f"the parameter is {p.dtype}"
    if g.device != device or g.dtype not in SUPPORTED_DTYPES:
        return what, f"its gradient is {g.dtype} on {g.device}"
    if g.shape != p.shape:
        return what, f"its gradient has shape {tuple(g.shape)}"
    if not _dense(_local(p)):
        return "with fused=True needs dense parameters", f"strides {p.stride()} leave gaps or overlap"
    for name, t in (state or {}).items():
        if isinstance(t, Tensor) and name != "step" and (t.device != device or t.dtype not in SUPPORTED_DTYPES):
            return what, f"its {name} is {t.dtype} on {t.device}"
    return None


def takes(p: Tensor, g: Tensor, m: Tensor, v: Optional[Tensor]) -> bool:
    """Whether the kernels process this tensor (else the optimizer hands it to its single-tensor path)."""
    tensors = [_local(t) for t in ((p, g, m) if v is None else (p, g, m, v))]
    lp = tensors[0]
    return (lp.dtype in SUPPORTED_DTYPES and _dense(lp) and all(
        t.device == lp.device and t.dtype in SUPPORTED_DTYPES and t.shape == lp.shape for t in tensors)
        and all(t.stride() == lp.stride() for t in tensors[2:]))


# ----------------------------------------------------------------------------------------- pointer table

_tables: "OrderedDict[tuple, tuple]" = OrderedDict()
_MAX_TABLES = 64  # one per param group in use; bounded so that swapped-out groups do not pile up


def _like(g: Tensor, p: Tensor) -> Tensor:
    """The gradient laid out in memory like its parameter (copied only when its strides differ)."""
    if g.stride() == p.stride() and _dense(g):
        return g
    out = torch.empty_like(p, dtype=g.dtype)
    out.copy_(g)
    return out


def _table(params, grads, ms, vs, s, steps, config) -> tuple:
    """(device table, n tensors, n chunks, whether all p/g/m/v addresses are 16-byte aligned). Built and copied
    once, then reused while every address and size stays (gradients normally reuse their memory)."""
    n = len(params)
    zeros = [0] * n
    ptrs = [[t.data_ptr() for t in ts] if ts else zeros for ts in (params, grads, ms, vs, s, steps)]
    numels = [p.numel() for p in params]
    codes = [_CODES[p.dtype] | _CODES[g.dtype] << 2 | _CODES[m.dtype] << 4 | (_CODES[v.dtype] << 6 if vs else 0)
             for p, g, m, v in zip(params, grads, ms, vs or params)]
    device = params[0].device
    key = (device, config["chunk"], *map(tuple, ptrs), tuple(numels), tuple(codes))
    with _lock:
        hit = _tables.get(key)
        if hit is not None:
            _tables.move_to_end(key)
            return hit
    chunks = torch.tensor([-(-k // config["chunk"]) for k in numels], dtype=torch.int64)
    first = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(chunks, 0, out=first[1:])
    n_chunks = int(first[-1])
    owner = torch.repeat_interleave(torch.arange(n), chunks)
    host = torch.cat([torch.tensor([x for row in ptrs for x in row] + numels + codes, dtype=torch.int64),
                      owner, torch.arange(n_chunks) - first[owner], first])
    if device.type == "cpu":
        table = host
    else:  # pinned and non-blocking: no wait for the device (the caching host allocator keeps it until copied)
        table = host.pin_memory().to(device, non_blocking=True)
    entry = (table, n, n_chunks, all(x % 16 == 0 for row in ptrs[:4] for x in row))
    with _lock:
        _tables[key] = entry
        if len(_tables) > _MAX_TABLES:
            _tables.popitem(last=False)
    return entry


# ------------------------------------------------------------------------------------ launches (host side)


def _config(device: torch.device) -> dict:
    return _CPU_CONFIG if device.type == "cpu" else _GPU_CONFIG


def _scalars(rule) -> tuple:
    """The hyperparameters of an update rule as the custom ops take them."""
    return (bool(rule.adaptive), float(rule.lr), float(rule.beta1), float(rule.beta2), float(rule.eps),
            float(rule.weight_decay), bool(rule.decoupled), bool(rule.maximize), float(rule.decay_rate),
            float(rule.damping_eps), bool(rule.bias_correction))


def _prepared(params, grads, ms, vs, s, steps):
    params = [_local(p) for p in params]
    grads = [_like(_local(g), p) for g, p in zip(grads, params)]
    return (params, grads, [_local(m) for m in ms], [_local(v) for v in vs], [_local(x) for x in s],
            [_local(x) for x in steps])


# Launches ask for fused multiply-adds explicitly (Triton 3.9's default, which 3.10 turns off): the same numerics
# whatever the installed version.


def _launch_stats(table, n, n_chunks, aligned, device, sign, wd, cfg) -> Tensor:
    partial = torch.empty(n_chunks, 3, dtype=torch.float64, device=device)
    if n_chunks:
        _stats_kernel[(n_chunks,)](table, n, n_chunks, partial, sign, wd, HAS_WD=wd != 0.0, ALIGNED=aligned,
                                   CHUNK=cfg["chunk"], BLOCK=cfg["block"], num_warps=cfg["num_warps"],
                                   enable_fp_fusion=True)
    return partial


def _launch_advance(table, n, n_chunks, partial, stats, given, coef, mode, adaptive, lr, beta1, beta2, eps,
                    decay_rate, damping_eps, bias_correction, cfg) -> None:
    log = lambda b: math.log(b) if b > 0 else -math.inf  # noqa: E731
    _advance_kernel[(n,)](table, n, n_chunks, partial, stats, given, coef, decay_rate, 1.0 - decay_rate,
                          damping_eps, lr, eps, log(beta1), log(beta2), MODE=mode,
                          BIAS_CORRECTION=bias_correction and adaptive, RBLOCK=cfg["reduce_block"], num_warps=1,
                          enable_fp_fusion=True)


def _launch_update(table, n, n_chunks, aligned, coef, adaptive, lr, beta1, beta2, weight_decay, decoupled, maximize,
                   cfg) -> None:
    wd = 0.0 if decoupled else weight_decay
    if n_chunks:
        _update_kernel[(n_chunks,)](
            table, n, n_chunks, coef, -1.0 if maximize else 1.0, wd, beta1, beta2, 1.0 - beta2,
            1.0 - lr * weight_decay if decoupled else 1.0, ADAPTIVE=adaptive, HAS_WD=wd != 0.0,
            DECOUPLED=decoupled and weight_decay != 0.0, ALIGNED=aligned, CHUNK=cfg["chunk"], BLOCK=cfg["block"],
            num_warps=cfg["num_warps"], enable_fp_fusion=True)


def _on(device: torch.device):
    """Launches go to the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _statistics_impl(params, grads, ms, maximize: bool, coupled_wd: float) -> Tensor:
    with _on(params[0].device):
        return _statistics_on_device(params, grads, ms, maximize, coupled_wd)


def _statistics_on_device(params, grads, ms, maximize: bool, coupled_wd: float) -> Tensor:
    device = params[0].device
    cfg = _config(device)
    params, grads, ms, _, _, _ = _prepared(params, grads, ms, [], [], [])
    table, n, n_chunks, aligned = _table(params, grads, ms, [], [], [], cfg)
    partial = _launch_stats(table, n, n_chunks, aligned, device, -1.0 if maximize else 1.0, coupled_wd, cfg)
    stats = torch.empty(n, 3, dtype=torch.float64, device=device)
    _launch_advance(table, n, n_chunks, partial, stats, stats, stats, _REDUCE, False, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                    False, cfg)
    return stats


def _step_impl(*args) -> None:
    """``_step_on_device`` on the tensors' device."""
    with _on(args[0][0].device):
        _step_on_device(*args)


def _step_on_device(params, grads, ms, vs, s, steps, adaptive, lr, beta1, beta2, eps, weight_decay, decoupled,
                    maximize, decay_rate, damping_eps, bias_correction, coeffs: Optional[Tensor] = None) -> None:
    """``coeffs`` None: the whole step (statistics, s, update). Else the update only, with these ``d +
    damping_eps`` (one per tensor; s was advanced by the caller)."""
    device = params[0].device
    cfg = _config(device)
    params, grads, ms, vs, s, steps = _prepared(params, grads, ms, vs if adaptive else [], s, steps)
    table, n, n_chunks, aligned = _table(params, grads, ms, vs, s if coeffs is None else [],
                                         steps if bias_correction else [], cfg)
    coef = torch.empty(n, 3, dtype=torch.float32, device=device)
    if coeffs is None:
        partial = _launch_stats(table, n, n_chunks, aligned, device, -1.0 if maximize else 1.0,
                                0.0 if decoupled else weight_decay, cfg)
        mode, given = _REDUCE_ADVANCE, coef
    else:
        partial, mode, given = coef, _GIVEN, coeffs.to(device=device, dtype=torch.float32)
    _launch_advance(table, n, n_chunks, partial, coef, given, coef, mode, adaptive, lr, beta1, beta2, eps, decay_rate,
                    damping_eps, bias_correction, cfg)
    _launch_update(table, n, n_chunks, aligned, coef, adaptive, lr, beta1, beta2, weight_decay, decoupled, maximize,
                   cfg)


# ---------------------------------------------------------------------------- custom ops (torch.compile)


@torch.library.custom_op("tam_hf::triton_statistics", mutates_args=())
def _statistics_op(params: list[Tensor], grads: list[Tensor], ms: list[Tensor], maximize: bool,
                   coupled_wd: float) -> Tensor:
    return _statistics_impl(params, grads, ms, maximize, coupled_wd)


@_statistics_op.register_fake
def _(params, grads, ms, maximize, coupled_wd):
    return params[0].new_empty((len(params), 3), dtype=torch.float64)


@torch.library.custom_op("tam_hf::triton_step", mutates_args=("params", "ms", "vs", "s"))
def _step_op(params: list[Tensor], grads: list[Tensor], ms: list[Tensor], vs: list[Tensor], s: list[Tensor],
             steps: list[Tensor], adaptive: bool, lr: float, beta1: float, beta2: float, eps: float,
             weight_decay: float, decoupled: bool, maximize: bool, decay_rate: float, damping_eps: float,
             bias_correction: bool, coeffs: Optional[Tensor]) -> None:
    _step_impl(params, grads, ms, vs, s, steps, adaptive, lr, beta1, beta2, eps, weight_decay, decoupled, maximize,
               decay_rate, damping_eps, bias_correction, coeffs)


@_step_op.register_fake
def _(*args):
    return None


# ------------------------------------------------------------------------------------------ entry points
#
# They take the optimizer's per-group step (``work``): ``rule`` (adaptive, lr, beta1, beta2, eps, weight_decay,
# decoupled, maximize, decay_rate, damping_eps, bias_correction), ``params``, ``grads`` (raw: maximize and coupled
# weight decay are applied on the fly), ``exp_avgs`` (TAM's momentum), ``exp_avg_sqs`` (None for TAM), ``s``
# (0-dim float32) and, under bias_correction, ``steps``: each tensor's 0-dim float32 step count on the device,
# this step included (Python numbers are accepted too, at the cost of a copy).


def _step_tensors(work, device) -> list[Tensor]:
    if not (work.rule.bias_correction and work.rule.adaptive):
        return []
    if work.steps is None:
        raise ValueError("bias_correction needs each tensor's step count")
    steps = list(work.steps)
    if all(isinstance(x, Tensor) and x.device == device and x.dtype == torch.float32 for x in steps):
        return steps
    # Python numbers, or counts left on the CPU by a loaded state dict: one copy (the kernel reads device memory)
    counts = torch.tensor([float(x) for x in steps]) if not all(isinstance(x, Tensor) for x in steps) else (
        torch.stack([x.reshape(()).float().cpu() for x in steps]))
    return list(counts.to(device, non_blocking=True).unbind())


def _call_step(work, coeffs: Optional[Tensor]) -> None:
    params = list(work.params)
    args = (params, list(work.grads), list(work.exp_avgs), list(work.exp_avg_sqs or []),
            list(work.s) if coeffs is None else [], _step_tensors(work, params[0].device), *_scalars(work.rule),
            coeffs)
    if torch.compiler.is_compiling():
        torch.ops.tam_hf.triton_step(*args)
        return
    _step_impl(*args)
    torch.autograd.graph.increment_version(params)  # as the in-place ops of the eager paths would


def statistics(work) -> Tensor:
    """``[n, 3]`` float64 rows (m.g, |m|^2, |g|^2) of the group's tensors as held here, for a reducer."""
    rule = work.rule
    coupled_wd = 0.0 if rule.decoupled else float(rule.weight_decay)
    args = (list(work.params), list(work.grads), list(work.exp_avgs), bool(rule.maximize), coupled_wd)
    if torch.compiler.is_compiling():
        return torch.ops.tam_hf.triton_statistics(*args)
    return _statistics_impl(*args)


def update(work, coeffs: Sequence[Tensor]) -> None:
    """m (v) and p of every tensor with the given coefficients ``d + damping_eps`` (0-dim tensors, one per tensor;
    ``s`` already advanced)."""
    if work.params:
        _call_step(work, torch.stack([c.reshape(()) for c in coeffs]))


def step(work) -> None:
    """The whole step of a param group (tensor scope, nothing between statistics and update): three launches."""
    if work.params:
        _call_step(work, None)
