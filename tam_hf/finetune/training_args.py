"""The run's ``TrainingArguments``: the recipe's ``training`` section plus its optimizer, mapped the way a stock
HF script passes an optimizer (``optim``, ``learning_rate``, ``weight_decay``, ``adam_*``, ``optim_args``).

The optimizer is chosen through ``TrainingArguments.optim`` (made valid for the TAM names by
``tam_hf.trainer.register()``), so the Trainer builds the param groups (no weight decay on biases and norms) and
a checkpoint resumes with the same optimizer. Which constructor keys travel in which field is the optimizer
registry's table (``OptimizerSpec.training_args_keys``); the rest go in ``optim_args``, and so does
``optimizer.switch`` (as ``switch_to``, ``switch_at_step``, ``switch_lr``: the Trainer then builds a
:class:`~tam_hf.optim.switch.SwitchOptimizer`).
"""

from __future__ import annotations

from tam_hf.finetune.config.schema import Recipe
from tam_hf.finetune.errors import RecipeError

__all__ = ["build_training_arguments"]


def build_training_arguments(recipe: Recipe):
    """TrainingArguments for the recipe. Their own consistency checks (``__post_init__``) run here, before
    anything is loaded, and fail as a RecipeError (exit 2) like every other recipe problem."""
    import torch
    from transformers import TrainingArguments

    from tam_hf.optim.registry import get as optimizer_spec
    from tam_hf.trainer.register import register

    kwargs = dict(recipe.training)
    spec = optimizer_spec(recipe.optimizer.name)
    kwargs["optim"] = spec.optim
    fields = spec.training_args_keys()
    extra = {}
    for key, value in recipe.optimizer.kwargs().items():
        if key in fields:
            kwargs.update(zip(fields[key], value if len(fields[key]) > 1 else (value,)))
        else:
            extra[key] = value
    switch = recipe.optimizer.switch
    if switch is not None:  # read by tam_hf.trainer.optim_args, never passed to a constructor
        extra.update(switch_to=switch.to, switch_at_step=switch.at_step)
        if switch.lr is not None:
            extra["switch_lr"] = switch.lr
    if extra:
        kwargs["optim_args"] = ",".join(f"{k}={v}" for k, v in extra.items())
    if recipe.distributed is not None and recipe.distributed.deepspeed:
        kwargs["deepspeed"] = recipe.distributed.deepspeed
    kwargs.setdefault("seed", 42)
    # Pinned host memory only helps copies to an accelerator; without one torch warns on every dataloader.
    kwargs.setdefault("dataloader_pin_memory", torch.cuda.is_available() or torch.xpu.is_available())
    register()  # makes optim="tam|adatam|adatamw" valid TrainingArguments values
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as exc:
        raise RecipeError([f"training: {exc}".replace("\n", " ")], "recipe") from None
