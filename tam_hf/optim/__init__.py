"""The optimizers: TAM, AdaTAM, AdaTAMW (arXiv:2412.18790), their kernels, reference and registry. Torch only.

Importing the package (or ``tam_hf.optim.registry``) imports no torch: the names below load their module on
first use, so validating a recipe never pays for torch. ``tam_hf.optim.tam`` is the module; the functional TAM
step is ``tam_hf.optim.tam.tam``."""

import importlib

__all__ = ["TAM", "AdaTAM", "AdaTAMW", "TorqueOptimizer", "AdaTAM8bit", "AdaTAMW8bit", "adatam", "OPTIMIZERS",
           "OptimizerSpec"]

_HOME = {"TAM": "tam", "AdaTAM": "tam", "AdaTAMW": "tam", "TorqueOptimizer": "tam", "adatam": "tam",
         "AdaTAM8bit": "tam8bit", "AdaTAMW8bit": "tam8bit", "OPTIMIZERS": "registry", "OptimizerSpec": "registry"}


def __getattr__(name):
    if name not in _HOME:
        raise AttributeError(f"module 'tam_hf.optim' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tam_hf.optim.{_HOME[name]}"), name)


def __dir__():
    return sorted(set(globals()) | set(__all__))
