"""The ``tam-finetune`` commands, one module each (``run``, ``compare``, ``eval``, ``push``), each a
``main(argv) -> exit code`` that :mod:`tam_hf.cli` dispatches to.

:func:`explain` is the one place where an error becomes what the user reads and the exit code: every error a
user can act on carries its own ``exit_code`` (:mod:`tam_hf.finetune.errors`); anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import os
import sys
import traceback

__all__ = ["explain", "report"]


def explain(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, one-line message) for an error a user can act on; None for anything else (a bug)."""
    code = getattr(exc, "exit_code", None)
    if isinstance(exc, KeyboardInterrupt) and code is None:
        code = 130
    if not isinstance(code, int) or isinstance(code, bool):
        return None
    text = ": ".join(part for part in (getattr(exc, "headline", ""), str(exc)) if part)
    return code, f"error: {text}" if text else "aborted"


def report(exc: BaseException) -> int | None:
    """Print :func:`explain`'s message on stderr and return the exit code (None: re-raise the bug).
    ``TAM_HF_TRACEBACK=1`` prints the traceback as well."""
    answer = explain(exc)
    if answer is None:
        return None
    if os.environ.get("TAM_HF_TRACEBACK", "").strip().lower() in ("1", "true", "yes"):
        traceback.print_exception(exc)
    print(answer[1], file=sys.stderr)
    return answer[0]
