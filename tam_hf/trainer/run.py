"""``python -m tam_hf.run SCRIPT.py|CONSOLE_SCRIPT|-m MODULE [args...]``: run an unmodified training script or
command line tool with every TAM optimizer of the registry available as ``--optim``.

* ``SCRIPT.py`` (any path, ``$(which trl)`` included) runs as ``__main__`` (``runpy``), with ``sys.argv`` and
  ``sys.path[0]`` as ``python SCRIPT.py ...`` would set them; ``-m MODULE`` runs a module; a bare name that is not
  a file runs that console script (``python -m tam_hf.run trl sft ...``, ``... accelerate launch train.py``).
* Registration (:func:`tam_hf.trainer.register.register_on_import`) is lazy: each change is made when the
  transformers module it edits is imported, so it is in place before the script builds its ``HfArgumentParser``.
* Processes the command starts (``trl sft`` re-launches its script through ``accelerate launch``; ``accelerate
  launch`` and ``torchrun`` start workers) register too, and no other process does: the environment variable
  ``TAM_HF_REGISTER=1`` marks the process tree and tam_hf's ``.pth`` start-up hook acts on it
  (:mod:`tam_hf.trainer.autoregister`).
* A bad ``--optim_args`` for a TAM optimizer stops the run when ``TrainingArguments`` is built, before any model is
  loaded, with one line on stderr and exit status 2, as argparse does for a bad argument.

Launchers may also start it per process: ``torchrun --nproc_per_node 2 -m tam_hf.run SCRIPT.py ...`` and
``accelerate launch -m tam_hf.run SCRIPT.py ...``.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Callable, Optional

USAGE = ("usage: python -m tam_hf.run SCRIPT.py [script args...]\n"
         "       python -m tam_hf.run CONSOLE_SCRIPT [args...]     (e.g. trl sft ..., accelerate launch ...)\n"
         "       python -m tam_hf.run -m MODULE [module args...]")


def _console_script(name: str):
    """The ``console_scripts`` entry point called ``name`` (a bare name or the path of its launcher), or None."""
    from importlib.metadata import entry_points

    base = os.path.basename(name)
    for candidate in (name, base, os.path.splitext(base)[0]) if base.lower().endswith(".exe") else (name,):
        found = list(entry_points(group="console_scripts", name=candidate))
        if found:
            return found[0]
    return None


def _target(argv: list[str]) -> Optional[Callable[[], None]]:
    """What to run, with ``sys.argv`` / ``sys.path`` set as the plain command would set them; None: not found."""
    if argv[0] == "-m":
        def run_module():
            sys.argv = argv[1:]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)

        return run_module
    path = argv[0]
    if os.path.isfile(path) and not path.lower().endswith(".exe"):  # a script, a console script's launcher too
        def run_script():
            sys.argv = argv
            sys.path[0] = os.path.dirname(os.path.abspath(path))  # what `python SCRIPT.py` puts there
            runpy.run_path(path, run_name="__main__")

        return run_script
    entry_point = _console_script(path)
    if entry_point is None:
        return None

    def run_console_script():
        import shutil

        sys.argv = [shutil.which(path) or path, *argv[1:]]
        raise SystemExit(entry_point.load()())

    return run_console_script


def _optim_args_error(error: BaseException) -> Optional[BaseException]:
    """The :class:`~tam_hf.trainer.optim_args.OptimArgsError` in ``error`` or its causes, if any."""
    module = sys.modules.get("tam_hf.trainer.optim_args")
    while module is not None and error is not None:
        if isinstance(error, module.OptimArgsError):
            return error
        error = error.__cause__ or error.__context__
    return None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or (argv[0] == "-m" and len(argv) < 2):
        print(USAGE, file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    target = _target(argv)
    if target is None:
        print(f"tam_hf.run: {argv[0]!r} is neither a file nor a console script of this environment\n{USAGE}",
              file=sys.stderr)
        raise SystemExit(2)

    from tam_hf.trainer.autoregister import ENV, pth_installed
    from tam_hf.trainer.register import register_on_import

    os.environ[ENV] = "1"  # for the processes the command starts (tam_hf's .pth hook reads it)
    if not pth_installed():
        print("tam_hf.run: warning: tam_hf's start-up hook (tam_hf-register.pth) is not installed in this "
              "environment, so processes the command starts (accelerate, torchrun, trl) will not know the TAM "
              "--optim names; reinstall tam_hf (pip install -e . from a checkout)", file=sys.stderr)
    register_on_import()
    try:
        target()
    except Exception as e:
        bad = _optim_args_error(e)
        if bad is None:
            raise
        print(f"{os.path.basename(sys.argv[0])}: error: {bad}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
