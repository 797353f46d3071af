"""What a run can fail with, each kind carrying the exit code the CLI returns for it.

Every error here is a message for the person who started the run, never a traceback: it names what is wrong
(the file and row, the step, the directory, the model id) and the way forward. The exit codes follow the CLI:
2 when nothing was loaded (the run was refused as configured), 1 when the run started and failed.
"""

from __future__ import annotations

import os

__all__ = ["RecipeError", "FinetuneError", "OutputDirError", "CheckpointError", "ResumeError", "NonFiniteError", "DataError",
           "HubUnavailableError", "PushError", "EvaluationError", "LMEvalError", "WriteError", "ModelError", "Aborted", "RunFailed", "hub_unavailable",
           "write_failure"]


class RecipeError(ValueError):
    """All the problems found in one recipe, reported together; nothing was loaded."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} is not valid, found {len(self.problems)} problem(s):\n{lines}")


class FinetuneError(Exception):
    """Base class: ``exit_code`` is what ``tam-finetune`` returns, ``summary`` the run's summary when one was
    written (the CLI may print it before the message)."""

    exit_code = 1
    headline = ""  # said before the message, e.g. "data does not fit the recipe"

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


class ResumeError(FinetuneError):
    """``resume`` asks to continue a run with settings that differ from the ones it ran with (optimizer, model,
    data, learning-rate schedule), or into an output directory holding another run. Nothing was loaded."""

    exit_code = 2


class NonFiniteError(FinetuneError):
    """The loss, the gradients or the weights stopped being finite. No checkpoint or model was written for the
    diverged state; the last good checkpoint is kept. ``step``: the first step found non-finite, when known (the
    check runs at logging, evaluation and save steps, so the run may have gone on a few steps past it)."""

    def __init__(self, message: str, summary: dict | None = None, step: int | None = None):
        super().__init__(message, summary)
        self.step = step


class DataError(FinetuneError, ValueError):
    """The data does not match the recipe or cannot be read (missing column, malformed line, empty file, ...)."""

    headline = "data does not fit the recipe"


class ModelError(FinetuneError):
    """A local model directory that cannot be loaded (no weights, a damaged config)."""


class HubUnavailableError(FinetuneError):
    """A model or dataset needs the Hugging Face Hub, which is switched off (offline mode) or unreachable."""


class PushError(FinetuneError):
    """The run finished and saved everything locally, but the push to the Hub failed."""


class EvaluationError(FinetuneError):
    """The run finished and saved the model (and ran the Hub step), but lm-evaluation-harness failed on it; the
    message names the saved model and the command that evaluates it again (`tam-finetune eval RUN_DIR`)."""


class LMEvalError(FinetuneError):
    """lm-evaluation-harness is missing, was given nothing to evaluate (exit 2), or failed (exit 1)."""

    def __init__(self, message: str, exit_code: int = 1, summary: dict | None = None):
        super().__init__(message, summary)
        self.exit_code = exit_code


class WriteError(FinetuneError):
    """Writing a checkpoint, the model or a result failed (full disk, file size limit, read-only or forbidden
    directory). What was half-written is removed; the message names the error, the file system and what is kept."""


class Aborted(FinetuneError, KeyboardInterrupt):
    """A second signal stopped the run at once (a KeyboardInterrupt still, so callers that stop on Ctrl-C do);
    the exit code is 128 + the signal's number."""

    def __init__(self, message: str, exit_code: int = 130, summary: dict | None = None):
        super().__init__(message, summary)
        self.exit_code = exit_code


class RunFailed(FinetuneError):
    """An error tam_hf has no better words for, in a phase of a run: the message names the phase, the error and
    what was kept; the traceback is saved beside the run's summary."""


# Messages of write failures that reach Python without an errno: torch.save's zip writer and safetensors.
_WRITE_FAILURES = {"unexpected pos": "no space left on the device (or a file size limit)",
                   "file write failed": "no space left on the device (or a file size limit)",
                   "No space left": "no space left on the device", "File too large": "file too large (a file size limit)",
                   "Read-only file system": "read-only file system", "Permission denied": "permission denied",
                   "Disk quota exceeded": "disk quota exceeded"}
_ERRNO_NAMES = {"ENOSPC": "no space left on the device", "EFBIG": "file too large (a file size limit)",
                "EROFS": "read-only file system", "EACCES": "permission denied", "EPERM": "operation not permitted",
                "EDQUOT": "disk quota exceeded"}


def write_failure(exc: BaseException) -> str | None:
    """What went wrong, in words, when `exc` (or an error it was raised from) is a failed write; else None."""
    import errno

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            name = errno.errorcode.get(exc.errno, "")
            if name in _ERRNO_NAMES:
                return _ERRNO_NAMES[name]
        text = str(exc)
        for needle, meaning in _WRITE_FAILURES.items():
            if needle in text:
                return meaning
        exc = exc.__cause__ or exc.__context__
    return None


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
