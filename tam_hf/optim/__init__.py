"""The optimizers: TAM, AdaTAM, AdaTAMW (arXiv:2412.18790), their kernels, reference and registry. Torch only."""

from tam_hf.optim.registry import OPTIMIZERS, OptimizerSpec
from tam_hf.optim.tam import TAM, AdaTAM, AdaTAMW, adatam, tam
from tam_hf.optim.tam8bit import AdaTAM8bit, AdaTAMW8bit

__all__ = ["TAM", "AdaTAM", "AdaTAMW", "AdaTAM8bit", "AdaTAMW8bit", "tam", "adatam", "OPTIMIZERS", "OptimizerSpec"]
