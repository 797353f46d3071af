"""tam_hf: Torque-Aware Momentum (TAM, AdaTAM, AdaTAMW) for Hugging Face fine-tuning."""

from tam_hf.optim import TAM, AdaTAM, AdaTAMW

__version__ = "0.1.0"
__all__ = ["TAM", "AdaTAM", "AdaTAMW", "__version__"]
