"""The optimizers: TAM, AdaTAM, AdaTAMW (arXiv:2412.18790), their kernels, reference and registry. Torch only."""

from tam_hf.optim.registry import OPTIMIZERS, OptimizerSpec
from tam_hf.optim.tam import TAM, AdaTAM, AdaTAMW, adatam, tam

__all__ = ["TAM", "AdaTAM", "AdaTAMW", "tam", "adatam", "OPTIMIZERS", "OptimizerSpec"]
