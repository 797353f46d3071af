"""Registration in the processes a wrapped command starts: ``trl sft`` re-launching its script through
``accelerate launch``, ``accelerate launch`` and ``torchrun`` starting workers, each a NEW interpreter that never
ran ``register()``.

How it reaches them, and only them:

* ``python -m tam_hf.run`` sets the environment variable :data:`ENV` (``TAM_HF_REGISTER=1``). Environment variables
  are inherited by every process a process starts, and by no other, so the variable marks exactly the process
  tree of the wrapped command.
* tam_hf installs a one-line ``.pth`` file, :data:`PTH_NAME`, in ``site-packages``. Python's ``site`` module runs
  the ``import`` lines of ``.pth`` files at the start of every interpreter of the environment; ours reads the
  variable and, only when it is ``1``, imports this module and calls :func:`activate`, which arms
  :func:`tam_hf.trainer.register.register_on_import`. Everywhere else it costs one dictionary lookup.
* The registration is lazy: arming imports neither transformers nor torch. Each change of ``register()`` is made
  right after the transformers module it edits has been imported (a ``sys.meta_path`` hook), so a child that
  never imports transformers (a compiler probe, the ``accelerate`` launcher itself) is unaffected, and a script
  that does import it sees ``--optim adatam`` before it builds its ``HfArgumentParser``.

Why not the alternatives: a ``sitecustomize.py`` put on ``PYTHONPATH`` would shadow the environment's own
``sitecustomize`` (Debian's, conda's, coverage's) and is dropped by ``python -E``; patching ``subprocess`` or the
launchers would reach into code we do not own and miss the launches we did not foresee; registering at every
interpreter start would import transformers (seconds) in processes that never use it and would change
transformers outside the wrapped command. A ``.pth`` file is the standard start-up hook of installed packages
(coverage's subprocess measurement uses one the same way), and it lives and goes with the installed package.

The ``.pth`` file is written into the wheel (and the editable wheel) by the build (``setup.py``); its text is
:data:`PTH_LINE`, kept in the file ``tam_hf/trainer/tam_hf-register.pth`` next to this module.
:func:`pth_installed` tells whether this environment has it; ``python -m tam_hf.run`` warns when it does not.
"""

from __future__ import annotations

import os

__all__ = ["ENV", "PTH_NAME", "PTH_LINE", "activate", "pth_installed"]

ENV = "TAM_HF_REGISTER"
PTH_NAME = "tam_hf-register.pth"
PTH_LINE = ('import os; os.environ.get("TAM_HF_REGISTER") == "1" and '
            '__import__("tam_hf.trainer.autoregister", fromlist=["activate"]).activate()\n')


def activate() -> bool:
    """Arm the lazy registration when :data:`ENV` is ``1``; returns whether it did."""
    if os.environ.get(ENV) != "1":
        return False
    from tam_hf.trainer.register import register_on_import

    register_on_import()
    return True


def pth_installed() -> bool:
    """Whether this interpreter's site directories hold :data:`PTH_NAME` (so child processes will register)."""
    import site
    import sys

    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    dirs += [p for p in sys.path if p.endswith("site-packages")]
    return any(os.path.isfile(os.path.join(d, PTH_NAME)) for d in dirs)
