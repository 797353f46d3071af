"""TAMTrainer: ``transformers.Trainer`` that builds the registry's TAM optimizer when ``args.optim`` names one.

Only the optimizer *choice* is overridden (``get_optimizer_cls_and_kwargs``, the hook the parent's
``create_optimizer`` calls), so the parent still builds the param groups (weight decay on matrices, none on
biases and norms), honours ``optimizer_cls_and_kwargs`` and ``optimizers=``, and handles every other
``--optim`` value itself. Two additions: the damping telemetry callback, placed before the reporters so they
see it, and the distributed checks (:func:`tam_hf.trainer.distributed.attach`). Neither needs ``register()``:
TAMTrainer changes no global.

``TrainingArguments(optim="adatam")`` needs ``tam_hf.register()`` to have run first (the enum lives in
transformers; register() also checks ``--optim_args`` when the arguments are built). Without it,
``optimizer_cls_and_kwargs=(tam_hf.AdaTAM, {...})`` also works here.
"""

from __future__ import annotations

from transformers import Trainer

from tam_hf.trainer.callbacks import DampingCallback, install
from tam_hf.trainer.distributed import attach
from tam_hf.trainer.optim_args import optimizer_cls_and_kwargs, torque_spec

__all__ = ["TAMTrainer", "equip"]


def equip(trainer) -> None:
    """What a tam_hf trainer adds to its parent, once built: the damping telemetry (before the reporters, so they
    see it) and the distributed checks (refuse configs that would swap TAM out; exact sharded statistics at
    train begin). TAMTrainer and the causal-LM SFT trainer both call it."""
    install(trainer.callback_handler.callbacks, DampingCallback())
    attach(trainer)


class TAMTrainer(Trainer):
    """A ``Trainer`` for which ``--optim`` selects the registry's TAM optimizers; see the module docstring.
    Constructor arguments are the parent's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        equip(self)

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None):
        if torque_spec(args.optim) is not None:
            return optimizer_cls_and_kwargs(args)
        return Trainer.get_optimizer_cls_and_kwargs(args, model)
