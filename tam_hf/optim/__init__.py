"""The optimizers: TAM, AdaTAM, AdaTAMW (arXiv:2412.18790), their kernels, reference and registry. Torch only."""

from tam_hf.optim.registry import OPTIMIZERS, OptimizerSpec
from tam_hf.optim.tam import TAM, AdaTAM, AdaTAMW, TorqueOptimizer, adatam, tam
from tam_hf.optim.tam8bit import AdaTAM8bit, AdaTAMW8bit

__all__ = ["TAM", "AdaTAM", "AdaTAMW", "TorqueOptimizer", "AdaTAM8bit", "AdaTAMW8bit", "tam", "adatam", "OPTIMIZERS",
           "OptimizerSpec"]
