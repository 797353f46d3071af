"""Loader for the fused CPU kernels in ``_kernels.c``.

The C source is compiled once per machine with the system compiler (``$CC``, else ``cc``/``gcc``) into a
cache folder (``$TAM_HF_CACHE`` or ``~/.cache/tam_hf``) and loaded with ctypes. Where no compiler works,
``available()`` is False and the optimizers fall back to the eager paths; ``fused=True`` then raises with the
compiler's message. ``TAM_HF_DISABLE_FUSED=1`` turns the fused path off.
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
        getattr(lib, f"tam_stats_{suf}").argtypes = [L, P, P, P, T, T, P]
        getattr(lib, f"tam_update_{suf}").argtypes = [L, P, P, P, T, T, T, T, T]
        getattr(lib, f"adatam_update_{suf}").argtypes = [L, P, P, P, P] + [T] * 8
        getattr(lib, f"tam_step_{suf}").argtypes = [L, P, P, P, P] + [T] * 4 + [D, D]
        getattr(lib, f"adatam_step_{suf}").argtypes = [L, P, P, P, P, P] + [T] * 7 + [D, D]
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


def supports(*tensors: torch.Tensor) -> bool:
    """True when the fused kernels can process these tensors elementwise in place (plain, contiguous CPU
    tensors of one supported dtype; DTensors and other subclasses take the eager path)."""
    dtype = tensors[0].dtype
    return dtype in SUPPORTED_DTYPES and all(
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.device.type == "cpu"
        and t.dtype == dtype
        and t.layout == torch.strided
        and t.is_contiguous()
        for t in tensors
    )


def kernel(name: str, dtype: torch.dtype):
    return getattr(load(), f"{name}_{_SUFFIX[dtype]}")


def pointers(tensors) -> ctypes.Array:
    """A C array of the tensors' data pointers, for the ``*_batch`` kernels."""
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def sizes(tensors) -> ctypes.Array:
    return (ctypes.c_long * len(tensors))(*[t.numel() for t in tensors])
