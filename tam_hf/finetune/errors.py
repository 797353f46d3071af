"""What a run can fail with, each kind carrying the exit code the CLI returns for it.

Every error here is a message for the person who started the run, never a traceback: it names what is wrong
(the file and row, the step, the directory, the model id) and the way forward. The exit codes follow the CLI:
2 when nothing was loaded (the run was refused as configured), 1 when the run started and failed.
"""

from __future__ import annotations

import os

__all__ = ["FinetuneError", "OutputDirError", "CheckpointError", "NonFiniteError", "DataError",
           "HubUnavailableError", "PushError", "EvaluationError", "hub_unavailable"]


class FinetuneError(Exception):
    """Base class: ``exit_code`` is what ``tam-finetune`` returns, ``summary`` the run's summary when one was
    written (the CLI may print it before the message)."""

    exit_code = 1

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary


class OutputDirError(FinetuneError):
    """The output directory holds another run's outputs, or another run is writing to it. Nothing was loaded."""

    exit_code = 2


class CheckpointError(FinetuneError):
    """No complete checkpoint to resume from (exit 2, found before loading), or the chosen one could not be
    loaded (exit 1)."""

    def __init__(self, message: str, exit_code: int = 1, summary: dict | None = None):
        super().__init__(message, summary)
        self.exit_code = exit_code


class NonFiniteError(FinetuneError):
    """The loss, the gradients or the weights stopped being finite. No checkpoint or model was written for the
    diverged state; the last good checkpoint is kept. ``step``: the first step found non-finite, when known (the
    check runs at logging, evaluation and save steps, so the run may have gone on a few steps past it)."""

    def __init__(self, message: str, summary: dict | None = None, step: int | None = None):
        super().__init__(message, summary)
        self.step = step


class DataError(FinetuneError, ValueError):
    """The data does not match the recipe or cannot be read (missing column, malformed line, empty file, ...)."""


class HubUnavailableError(FinetuneError):
    """A model or dataset needs the Hugging Face Hub, which is switched off (offline mode) or unreachable."""


class PushError(FinetuneError):
    """The run finished and saved everything locally, but the push to the Hub failed."""


class EvaluationError(FinetuneError):
    """The run finished and saved the model (and ran the Hub step), but lm-evaluation-harness failed on it; the
    message names the saved model and the command that evaluates it again (`tam-finetune eval RUN_DIR`)."""


_TRUE = {"1", "on", "yes", "true"}


def hub_unavailable(kind: str, name: str, exc: BaseException, variables: tuple[str, ...], local: str) -> HubUnavailableError:
    """One line for a `kind` ("model", "dataset") that had to come from the Hub and did not: the id, the offline
    setting in force (or the error when the Hub was reachable in principle) and `local`, the way to run without."""
    offline = next((v for v in variables if os.environ.get(v, "").strip().lower() in _TRUE), None)
    if offline is not None:
        return HubUnavailableError(f"{kind} {name!r} is not in the local Hugging Face cache and {offline}="
                                   f"{os.environ[offline]} keeps the Hub switched off: download it once with network "
                                   f"access (hf download {name}{' --repo-type dataset' if kind == 'dataset' else ''}"
                                   f") or {local}")
    cause = exc
    while cause.__cause__ is not None or cause.__context__ is not None:  # the innermost error names the reason
        cause = cause.__cause__ or cause.__context__
    reason = (str(cause).splitlines() or [""])[0][:200]
    return HubUnavailableError(f"{kind} {name!r} could not be fetched from the Hugging Face Hub "
                               f"({type(cause).__name__}: {reason}): check the network, the id and your login "
                               f"(hf auth login), or {local}")
