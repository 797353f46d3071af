"""The ``tam-finetune`` commands, one module each (``run``, ``compare``, ``eval``, ``push``), each a
``main(argv) -> exit code`` that :mod:`tam_hf.cli` dispatches to.

:func:`report` is the one place where an error becomes what the user sees and the exit code: every error a
user can act on carries its own ``exit_code`` (:mod:`tam_hf.finetune.errors`); anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import os
import sys
import traceback

__all__ = ["report"]


def report(exc: BaseException) -> int | None:
    """Print `exc` as one line on stderr and return its exit code; None when it carries none (a bug: re-raise
    it). ``TAM_HF_TRACEBACK=1`` prints the traceback as well."""
    code = getattr(exc, "exit_code", None)
    if isinstance(exc, KeyboardInterrupt) and code is None:
        code = 130
    if not isinstance(code, int) or isinstance(code, bool):
        return None
    if os.environ.get("TAM_HF_TRACEBACK", "").strip() in ("1", "true", "yes"):
        traceback.print_exception(exc)
    text = ": ".join(part for part in (getattr(exc, "headline", ""), str(exc)) if part)
    print(f"error: {text}" if text else "aborted", file=sys.stderr)
    return code
