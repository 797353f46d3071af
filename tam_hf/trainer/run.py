"""``python -m tam_hf.run SCRIPT.py [script args...]``: run an unmodified training script with
``--optim tam|adatam|adatamw`` available.

It calls :func:`tam_hf.trainer.register` and then runs the script as ``__main__`` (``runpy``), with ``sys.argv`` and
``sys.path[0]`` as ``python SCRIPT.py ...`` would set them, so the script's ``HfArgumentParser`` is built
after registration. ``python -m tam_hf.run -m package.module [args...]`` runs a module instead.

Launchers start it per process like any module: ``torchrun --nproc_per_node 2 -m tam_hf.run SCRIPT.py ...``
and ``accelerate launch -m tam_hf.run SCRIPT.py ...``.
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = "usage: python -m tam_hf.run SCRIPT.py [script args...]\n       python -m tam_hf.run -m MODULE [module args...]"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or (argv[0] == "-m" and len(argv) < 2):
        print(USAGE, file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)

    from tam_hf.trainer.register import register

    register()
    if argv[0] == "-m":
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return
    script = argv[0]
    if not os.path.exists(script):
        print(f"tam_hf.run: no such script: {script}\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = argv
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # what `python SCRIPT.py` puts there
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
