"""tam_hf: Torque-Aware Momentum (TAM, AdaTAM, AdaTAMW) for Hugging Face fine-tuning."""

from tam_hf.optim import TAM, AdaTAM, AdaTAMW
from tam_hf.trainer import register

__version__ = "0.1.0"
__all__ = ["TAM", "AdaTAM", "AdaTAMW", "TAMTrainer", "register", "__version__"]


def __getattr__(name):
    # TAMTrainer imports transformers (seconds); optimizer-only users should not pay for it.
    if name == "TAMTrainer":
        from tam_hf.trainer.tam_trainer import TAMTrainer

        return TAMTrainer
    raise AttributeError(f"module 'tam_hf' has no attribute {name!r}")
