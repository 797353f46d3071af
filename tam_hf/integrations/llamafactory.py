"""LLaMA-Factory: two routes, one per trainer.

**The default trainer** (a transformers Trainer): no code, run it under tam_hf's launcher::

    python -m tam_hf.run llamafactory-cli train recipes/integrations/llamafactory_adatamw.yaml

with ``optim: adatamw`` (``tam``, ``adatam``) and ``optim_args: decay_rate=0.9`` in the config: the names are
registered in every process the command starts, ``optim_args`` is checked before the model loads, and
``damping/*`` is logged next to the loss.

**The v1 trainer** (``USE_V1=1``) takes its optimizer from an ``OptimizerPlugin`` registry that LLaMA-Factory
0.9.5 ships empty. :func:`register` adds a builder for every TAM optimizer of tam_hf's registry, and
``python -m tam_hf.integrations.llamafactory train CONFIG.yaml`` runs the v1 trainer with them registered
(for several GPUs: ``torchrun --nproc-per-node N -m tam_hf.integrations.llamafactory train CONFIG.yaml``)::

    optim_config:
      name: adatamw
      lr: 2.0e-3              # required: the v1 trainer does not hand its learning_rate to optimizer plugins
      weight_decay: 0.01      # on matrices only, as the Trainer does (not on biases and norms)
      decay_rate: 0.9         # any other key: TAM's settings, checked like --optim_args

The v1 trainer's logs have no place for plugins to add to, so damping is not logged there (the optimizer's
``damping_summary()`` has it). Example: ``recipes/integrations/llamafactory_v1_adatamw.yaml``.
Checked with LLaMA-Factory 0.9.5 by ``scripts/check_integrations.sh``. LLaMA-Factory is imported only by
:func:`register` and the command.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

from tam_hf.optim import registry
from tam_hf.trainer.optim_args import OptimArgsError, parse_optim_args

__all__ = ["register", "optimizer_kwargs", "build_optimizer"]


def optimizer_kwargs(name: str, optim_config: dict) -> dict[str, Any]:
    """Constructor kwargs for the TAM optimizer ``name`` from a v1 ``optim_config``: ``lr``, ``betas``, ``eps``,
    ``weight_decay`` (``momentum`` for tam) as given, every other key parsed and checked as ``--optim_args`` is;
    then the constructor's own range checks. One ``ValueError`` names every problem."""
    spec = registry.get(name)
    given = {k: v for k, v in optim_config.items() if k != "name"}
    direct = spec.training_args_keys()
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if k in direct}
    rest = ",".join(f"{k}={v}" for k, v in given.items() if k not in direct)
    try:
        kwargs.update(parse_optim_args(name, rest))
        if "lr" not in kwargs:
            raise OptimArgsError("lr is required (the v1 trainer does not pass its learning_rate to optimizers)")
        spec.check(kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"LLaMA-Factory optim_config (name: {name}): {e}; set directly: "
                         f"{', '.join(direct)}") from None
    return kwargs


def build_optimizer(name: str, model, optim_config: dict, **_ignored):
    """The v1 ``OptimizerPlugin`` builder: weight decay on matrices, none on biases and norms (1-D tensors)."""
    kwargs = optimizer_kwargs(name, optim_config)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = kwargs.pop("weight_decay", 0.0)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return registry.get(name).cls([g for g in groups if g["params"]], **kwargs)


def register() -> tuple[str, ...]:
    """Register a v1 ``OptimizerPlugin`` for every TAM optimizer (idempotent); returns the names."""
    from llamafactory.v1.plugins.trainer_plugins.optimizer import OptimizerPlugin

    names = registry.torque_names()
    for name in names:
        OptimizerPlugin(name).register()(functools.partial(build_optimizer, name))
    return names


def main(argv: list[str]) -> None:
    register()
    from llamafactory.v1.launcher import main as v1_main

    sys.argv = [sys.argv[0], *argv]
    v1_main()


if __name__ == "__main__":
    main(sys.argv[1:])
