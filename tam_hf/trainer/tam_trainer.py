"""TAMTrainer: ``transformers.Trainer`` that builds TAM / AdaTAM / AdaTAMW when ``args.optim`` names one.

Only the optimizer *choice* is overridden (``get_optimizer_cls_and_kwargs``, the hook the parent's
``create_optimizer`` calls), so the parent still builds the param groups (weight decay on matrices, none on
biases and norms), honours ``optimizer_cls_and_kwargs`` and ``optimizers=``, and handles every other
``--optim`` value itself. Two additions: the damping telemetry callback, placed before the reporters so they
see it, and an early check of ``--optim_args`` so a typo fails when the trainer is built, not after the
model and data are loaded.

``TrainingArguments(optim="adatam")`` needs ``tam_hf.trainer.register()`` to have run first (the enum lives in
transformers). Without it, ``optimizer_cls_and_kwargs=(tam_hf.AdaTAM, {...})`` also works here.
"""

from __future__ import annotations

from transformers import Trainer

from tam_hf.trainer.callbacks import DampingCallback, install
from tam_hf.trainer.distributed import attach
from tam_hf.trainer.optim_args import OPTIMIZERS, optimizer_cls_and_kwargs

__all__ = ["TAMTrainer"]


def _optim_name(args) -> str:
    return str(getattr(args.optim, "value", args.optim))


class TAMTrainer(Trainer):
    """A ``Trainer`` for which ``--optim tam|adatam|adatamw`` selects the TAM optimizers; see the module
    docstring. Constructor arguments are the parent's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        install(self.callback_handler.callbacks, DampingCallback())
        attach(self)  # DeepSpeed/FSDP: refuse configs that would swap TAM out; exact sharded statistics at train begin
        if self.optimizer_cls_and_kwargs is None and self.optimizer is None and _optim_name(self.args) in OPTIMIZERS:
            optimizer_cls_and_kwargs(self.args)  # raises on bad --optim_args now, before any loading or step

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None):
        if _optim_name(args) in OPTIMIZERS:
            return optimizer_cls_and_kwargs(args)
        return Trainer.get_optimizer_cls_and_kwargs(args, model)
