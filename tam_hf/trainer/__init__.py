"""The Hugging Face glue: ``register()`` / ``unregister()`` (``--optim tam|adatam|adatamw`` in any Trainer),
``TAMTrainer``, ``python -m tam_hf.run``, ``--optim_args`` parsing, telemetry callbacks and the DeepSpeed/FSDP
checks.

Importing this package is cheap (no transformers, no torch): the child-process hook imports it at interpreter
start (:mod:`tam_hf.trainer.autoregister`)."""

from tam_hf.trainer import quiet  # noqa: F401  (before anything imports bitsandbytes)
from tam_hf.trainer.register import register, unregister

__all__ = ["TAMTrainer", "register", "unregister"]


def __getattr__(name):
    # TAMTrainer imports transformers' Trainer (seconds); register() alone should not pay for it.
    if name == "TAMTrainer":
        from tam_hf.trainer.tam_trainer import TAMTrainer

        return TAMTrainer
    raise AttributeError(f"module 'tam_hf.trainer' has no attribute {name!r}")
