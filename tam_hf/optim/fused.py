"""Loader for the fused CPU kernels in ``_kernels.c``.

The C source is compiled once per machine with the system compiler (``$CC``, else ``cc``/``gcc``) into a
cache folder (``$TAM_HF_CACHE`` or ``~/.cache/tam_hf``) and loaded with ctypes. Where no compiler works,
``available()`` is False and the optimizers fall back to the eager paths; ``fused=True`` then raises with the
compiler's message. ``TAM_HF_DISABLE_FUSED=1`` turns the fused path off.

The C functions trust their pointers. Python reaches them only through the wrappers below (:func:`statistics`,
:func:`tam_update`, :func:`adatam_update`, :func:`tam_step`, :func:`adatam_step`), which take lists of tensors and
check every one (CPU, plain strided contiguous tensor, the batch's dtype, the parameter's number of elements; ``s``
one element) before any memory is touched, raising ``ValueError`` naming the list and position.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("_kernels.c")
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
SUPPORTED_DTYPES = (torch.float32, torch.float64)
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_warned = False


def _cpu_signature() -> str:
    # -march=native code must not be reused on another CPU model sharing the same cache folder.
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


def _compile() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    try:
        return _build(compiler, _FLAGS)
    except RuntimeError as with_openmp:
        # Apple clang and some minimal toolchains have no OpenMP: the kernels still beat the eager loop serially.
        try:
            return _build(compiler, [f for f in _FLAGS if f != "-fopenmp"])
        except RuntimeError:
            raise with_openmp from None


def _build(compiler: str, flags: list[str]) -> ctypes.CDLL:
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *flags, _cpu_signature()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("TAM_HF_CACHE", Path.home() / ".cache" / "tam_hf")) / "kernels"
    target = cache / f"tam_kernels_{key}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # Build under a temporary name and rename: several ranks may compile at once.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        proc = subprocess.run([compiler, *flags, str(_SOURCE), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"{compiler} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    lib = ctypes.CDLL(str(target))
    _declare(lib)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    P, L, D = ctypes.c_void_p, ctypes.c_long, ctypes.c_double
    for suf, T in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        getattr(lib, f"tam_stats_batch_{suf}").argtypes = [L, P, P, P, P, T, T, P]
        getattr(lib, f"tam_update_batch_{suf}").argtypes = [L, P, P, P, P, P] + [T] * 4
        getattr(lib, f"adatam_update_batch_{suf}").argtypes = [L, P, P, P, P, P, P] + [T] * 7
        getattr(lib, f"tam_step_batch_{suf}").argtypes = [L, P, P, P, P, P] + [T] * 4 + [D, D]
        getattr(lib, f"adatam_step_batch_{suf}").argtypes = [L, P, P, P, P, P, P] + [T] * 7 + [D, D]


def load() -> ctypes.CDLL:
    """The compiled kernels; raises RuntimeError saying why they are unavailable."""
    global _lib, _error
    with _lock:
        if _lib is None and _error is None:
            if os.environ.get("TAM_HF_DISABLE_FUSED", "0") not in ("", "0"):
                _error = "disabled by TAM_HF_DISABLE_FUSED"
            else:
                try:
                    _lib = _compile()
                except (OSError, RuntimeError) as exc:
                    _error = str(exc)
        if _lib is None:
            raise RuntimeError(f"tam_hf fused CPU kernels unavailable: {_error}")
        return _lib


def available(warn: bool = False) -> bool:
    """Whether the kernels load; with ``warn``, say once why not (the optimizers then run the eager loop)."""
    global _warned
    try:
        load()
    except RuntimeError as exc:
        if warn and not _warned and not str(exc).endswith("TAM_HF_DISABLE_FUSED"):
            _warned = True
            warnings.warn(f"{exc}; using the eager single-tensor path", RuntimeWarning, stacklevel=3)
        return False
    return True


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _fits(t, dtype: torch.dtype, numel: int) -> bool:
    # Ordered so that a sparse tensor fails on its layout before is_contiguous() (which it lacks) is asked.
    return (type(t) in _PLAIN and t.is_cpu and t.dtype is dtype and t.layout is torch.strided
            and t.numel() == numel and t.is_contiguous())


def supports(*tensors: torch.Tensor) -> bool:
    """True when the fused kernels can process these tensors elementwise in place: plain, contiguous CPU tensors
    of one supported dtype (DTensors and other subclasses, bf16 or strided tensors take the eager path). Sizes are
    not compared here: a buffer of the wrong size is an error the kernel wrappers raise, not a reason to fall back."""
    dtype = tensors[0].dtype
    return dtype in SUPPORTED_DTYPES and all(
        type(t) in _PLAIN and t.is_cpu and t.dtype is dtype and t.layout is torch.strided and t.is_contiguous()
        for t in tensors
    )


def _problem(t, dtype: torch.dtype, numel: int) -> str:
    if not isinstance(t, torch.Tensor):
        return f"a {type(t).__name__}, not a tensor"
    if type(t) not in _PLAIN:
        return f"a {type(t).__name__} (the kernels take plain tensors)"
    if not t.is_cpu:
        return f"on {t.device} (the kernels run on the CPU)"
    if t.dtype is not dtype:
        return f"{t.dtype}, expected {dtype}"
    if t.layout is not torch.strided:
        return f"{t.layout} (the kernels take dense tensors)"
    if t.numel() != numel:
        return f"{t.numel()} elements, expected {numel}"
    return "not contiguous"


def _checked(kernel: str, lists: dict, scalars: dict | None = None) -> tuple[torch.dtype | None, ctypes.Array]:
    """Checks every tensor a batch kernel will read or write BEFORE any memory is touched: ``lists`` holds the
    parameter-sized tensors (the first list names the parameters and sets dtype and sizes), ``scalars`` the
    one-element ones. A C kernel trusts its pointers, so a short buffer here would be read past, not refused.
    Returns the batch dtype and the C array of sizes."""
    scalars = scalars or {}
    (p_name, params), *_ = lists.items()
    count = len(params)
    for name, ts in [*lists.items(), *scalars.items()]:
        if len(ts) != count:
            raise ValueError(f"fused {kernel}: {len(ts)} {name} tensors for {count} {p_name} tensors")
    if count == 0:
        return None, sizes([])
    dtype = params[0].dtype if isinstance(params[0], torch.Tensor) else None
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"fused {kernel}: {p_name} 0 is {dtype}; the kernels take {SUPPORTED_DTYPES}")
    for k in range(count):
        numel = params[k].numel() if isinstance(params[k], torch.Tensor) else -1
        for name, ts in lists.items():
            if not _fits(ts[k], dtype, numel):
                raise ValueError(f"fused {kernel}: {name} {k} is {_problem(ts[k], dtype, numel)}")
        for name, ts in scalars.items():
            if not _fits(ts[k], dtype, 1):
                raise ValueError(f"fused {kernel}: {name} {k} is {_problem(ts[k], dtype, 1)}")
    return dtype, sizes(params)


def _coefficients(coefficients, count: int) -> torch.Tensor:
    """The per-tensor coefficients as a float64 CPU vector (each value exact: s and p share the kernel's dtype)."""
    a = torch.stack(list(coefficients)).to(dtype=torch.float64) if count else torch.zeros(0, dtype=torch.float64)
    if a.shape != (count,) or not a.is_cpu:
        raise ValueError(f"fused update: {tuple(a.shape)} coefficients on {a.device} for {count} tensors")
    return a.contiguous()


def statistics(params, grads, exp_avgs, *, sign: float, weight_decay: float) -> torch.Tensor:
    """[n, 3] float64 rows (m.g, |m|^2, |g|^2) with g = sign * grad + weight_decay * p, summed in double per
    fixed chunk and then in order (the same bits for any thread count)."""
    dtype, n = _checked("statistics", {"param": params, "grad": grads, "exp_avg": exp_avgs})
    out = torch.zeros(len(params), 3, dtype=torch.float64)
    if dtype is not None:
        _kernel("tam_stats_batch", dtype)(len(params), n, pointers(exp_avgs), pointers(grads), pointers(params),
                                          sign, weight_decay, out.data_ptr())
    return out


def tam_update(params, grads, momentum_buffers, coefficients, *, sign: float, weight_decay: float, momentum: float,
               lr: float) -> None:
    """m = momentum m + a g; p -= lr m (g as in :func:`statistics`, ``a`` the tensor's coefficient)."""
    dtype, n = _checked("tam_update", {"param": params, "grad": grads, "momentum_buffer": momentum_buffers})
    a = _coefficients(coefficients, len(params))
    if dtype is not None:
        _kernel("tam_update_batch", dtype)(len(params), n, pointers(params), pointers(grads),
                                           pointers(momentum_buffers), a.data_ptr(), sign, weight_decay, momentum, lr)
        torch.autograd.graph.increment_version(params)


def adatam_update(params, grads, exp_avgs, exp_avg_sqs, coefficients, *, sign: float, weight_decay: float,
                  beta1: float, beta2: float, lr: float, eps: float, decay: float) -> None:
    """m = beta1 m + a g; v = beta2 v + (1 - beta2) g^2; p = decay p - lr m / (sqrt(v) + eps)."""
    dtype, n = _checked("adatam_update", {"param": params, "grad": grads, "exp_avg": exp_avgs,
                                          "exp_avg_sq": exp_avg_sqs})
    a = _coefficients(coefficients, len(params))
    if dtype is not None:
        _kernel("adatam_update_batch", dtype)(len(params), n, pointers(params), pointers(grads), pointers(exp_avgs),
                                              pointers(exp_avg_sqs), a.data_ptr(), sign, weight_decay, beta1, beta2,
                                              lr, eps, decay)
        torch.autograd.graph.increment_version(params)


def tam_step(params, grads, momentum_buffers, s, *, sign: float, weight_decay: float, momentum: float, lr: float,
             decay_rate: float, damping_eps: float) -> None:
    """TAM's whole step per tensor (statistics, s, update back to back; tensor scope on one process)."""
    dtype, n = _checked("tam_step", {"param": params, "grad": grads, "momentum_buffer": momentum_buffers},
                        {"s": s})
    if dtype is not None:
        _kernel("tam_step_batch", dtype)(len(params), n, pointers(params), pointers(grads),
                                         pointers(momentum_buffers), pointers(s), sign, weight_decay, momentum, lr,
                                         decay_rate, damping_eps)
        torch.autograd.graph.increment_version(params)


def adatam_step(params, grads, exp_avgs, exp_avg_sqs, s, *, sign: float, weight_decay: float, beta1: float,
                beta2: float, lr: float, eps: float, decay: float, decay_rate: float, damping_eps: float) -> None:
    """AdaTAM(W)'s whole step per tensor (statistics, s, update back to back; tensor scope on one process)."""
    dtype, n = _checked("adatam_step", {"param": params, "grad": grads, "exp_avg": exp_avgs,
                                        "exp_avg_sq": exp_avg_sqs}, {"s": s})
    if dtype is not None:
        _kernel("adatam_step_batch", dtype)(len(params), n, pointers(params), pointers(grads), pointers(exp_avgs),
                                            pointers(exp_avg_sqs), pointers(s), sign, weight_decay, beta1, beta2, lr,
                                            eps, decay, decay_rate, damping_eps)
        torch.autograd.graph.increment_version(params)


def _kernel(name: str, dtype: torch.dtype):
    """The raw ctypes function: it trusts its pointers. Call it only through the checked wrappers above."""
    return getattr(load(), f"{name}_{_SUFFIX[dtype]}")


def pointers(tensors) -> ctypes.Array:
    """A C array of the tensors' data pointers, for the batch kernels."""
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def sizes(tensors) -> ctypes.Array:
    return (ctypes.c_long * len(tensors))(*[t.numel() for t in tensors])
