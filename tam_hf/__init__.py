"""tam_hf: Torque-Aware Momentum (TAM, AdaTAM, AdaTAMW) for Hugging Face fine-tuning.

Importing ``tam_hf`` is cheap: the optimizers (torch) and ``TAMTrainer`` (transformers) load on first use, so the
child-process hook of ``python -m tam_hf.run`` costs nothing in processes that never train."""

from tam_hf.trainer import register, unregister

__version__ = "0.1.0"
__all__ = ["TAM", "AdaTAM", "AdaTAMW", "AdaTAM8bit", "AdaTAMW8bit", "TAMTrainer", "register", "unregister", "__version__"]


def __getattr__(name):
    if name in ("TAM", "AdaTAM", "AdaTAMW", "AdaTAM8bit", "AdaTAMW8bit", "optim"):
        import tam_hf.optim as optim  # the submodule import sets tam_hf.optim: no recursion into __getattr__

        return optim if name == "optim" else getattr(optim, name)
    if name == "TAMTrainer":
        from tam_hf.trainer.tam_trainer import TAMTrainer

        return TAMTrainer
    raise AttributeError(f"module 'tam_hf' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__) | {"optim", "trainer"})
