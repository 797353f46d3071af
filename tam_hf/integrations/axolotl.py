"""axolotl: ``optimizer: adatamw`` (or ``tam``, ``adatam``) with the damping telemetry, through one config line::

    plugins:
      - tam_hf.integrations.axolotl.TAMPlugin
    optimizer: adatamw
    optim_args: "decay_rate=0.9"       # optional; checked like --optim_args, before the model loads

Example: ``recipes/integrations/axolotl_adatamw.yml``. Checked with axolotl 0.19.0 by
``scripts/check_integrations.sh``.

Where each part happens in axolotl:

* ``register(cfg)`` runs before axolotl validates the config against transformers' ``OptimizerNames``: it calls
  :func:`tam_hf.register`, so the names validate, ``optim_args`` is checked when the ``TrainingArguments`` are
  built, and the Trainer's handler table builds the optimizer. (axolotl never calls a plugin's
  ``create_optimizer``, so that hook is no way in.) A config that fails validation undoes it
  (``on_config_validation_error``).
* ``post_trainer_create(cfg, trainer)`` puts the damping callback right after the flow callback, before the
  reporters (console, TensorBoard, W&B...), which then log ``damping/*`` next to the loss. Callbacks a plugin
  returns from ``add_callbacks_post_trainer`` are appended after the reporters, too late for them.

``BasePlugin`` is axolotl's: the class is made on first access (module ``__getattr__``), so importing this module
does not import axolotl.
"""

from __future__ import annotations

import functools

__all__ = ["TAMPlugin"]


@functools.cache
def _plugin_class() -> type:
    from axolotl.integrations.base import BasePlugin

    class TAMPlugin(BasePlugin):
        """tam_hf's optimizers as axolotl ``optimizer:`` names, with damping telemetry (see the module)."""

        def register(self, cfg):
            import tam_hf

            tam_hf.register()

        def on_config_validation_error(self, cfg):
            import tam_hf

            tam_hf.unregister()

        def post_trainer_create(self, cfg, trainer):
            from tam_hf.trainer.callbacks import DampingCallback, install

            install(trainer.callback_handler.callbacks, DampingCallback())

    TAMPlugin.__module__ = __name__
    return TAMPlugin


def __getattr__(name):
    if name == "TAMPlugin":
        return _plugin_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
