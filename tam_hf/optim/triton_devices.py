"""Which tensors belong to the Triton kernels of ``fused=True``, asked without importing them (they bring triton
and ``torch._dynamo``): the optimizer imports ``triton_kernels`` only for tensors this says yes to."""

from __future__ import annotations

import os

import torch

__all__ = ["DEVICE_TYPES", "FORCE_ON_CPU", "wanted"]

DEVICE_TYPES = ("cuda",)  # ROCm builds of torch report "cuda" too

# Tests only: CPU tensors take these kernels (under the interpreter) instead of the C kernels.
FORCE_ON_CPU = "TAM_HF_TRITON_ON_CPU"


def wanted(device) -> bool:
    """Whether tensors on ``device`` belong to the Triton kernels: CUDA/ROCm ones (CPU ones when tests set
    ``TAM_HF_TRITON_ON_CPU=1``). Says nothing about whether the kernels can run there: see
    :func:`tam_hf.optim.triton_kernels.load`."""
    device = torch.device(device)
    if device.type == "cpu":
        return os.environ.get(FORCE_ON_CPU, "0") not in ("", "0")
    return device.type in DEVICE_TYPES
