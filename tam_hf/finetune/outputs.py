"""An output directory a run can trust: one run at a time, never over another run's results by accident, and
checkpoints that count only once they are complete.

* :func:`run_lock` holds ``<output_dir>/.tam_hf.lock`` (``fcntl.flock``, the holder's pid inside) for the run's
  lifetime. The kernel drops the lock when its process dies, so a lock file left by a killed run is stale and
  taken over; a live holder makes a second run refuse at once. In launched runs only rank 0 locks.
* :func:`plan_output_dir` refuses, before anything is loaded, a directory holding another run's outputs unless
  the recipe says ``resume: true`` (continue it) or ``overwrite: true`` (start over), and picks the checkpoint to
  resume from: the newest *complete* one, naming any it skipped.
* :func:`completion_marker` writes ``checkpoint-N/tam_hf_checkpoint.json`` once the Trainer has written every
  file of checkpoint N (``on_save`` runs after the weights, optimizer, scheduler, RNG states and trainer state),
  listing each file's size. A checkpoint whose marker is missing or disagrees with the files was cut short
  (kill -9, a full disk) or damaged later; it is skipped on resume.
* :func:`write_summary` writes ``summary.json`` atomically and always as valid JSON (non-finite numbers become
  ``null``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tam_hf.finetune.errors import CheckpointError, OutputDirError

try:  # POSIX; elsewhere runs go unlocked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = ["LOCK_NAME", "MARKER", "run_lock", "rank", "previous_outputs", "plan_output_dir", "OutputPlan",
           "checkpoint_problem", "complete_checkpoints", "remove_checkpoint", "completion_marker", "write_summary",
           "json_safe"]

LOCK_NAME = ".tam_hf.lock"
MARKER = "tam_hf_checkpoint.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Files a finished run leaves at the top of its output directory (besides checkpoint-* and hub_upload/).
RESULT_FILES = ("summary.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "adapter_model.bin",
                "adapter_config.json", "training_args.bin")


def rank() -> int:
    """This process's rank in a launched run (torchrun and accelerate set RANK); 0 on its own."""
    return int(os.environ.get("RANK", "0"))


# ------------------------------------------------------------------------------------------------- lock


@contextlib.contextmanager
def run_lock(output_dir):
    """Hold the output directory's lock for the block (rank 0 only). Raises OutputDirError (exit 2) when a live
    process holds it. Creates the directory; removes it again on the way out when the run left it empty."""
    if rank() != 0 or fcntl is None:
        yield
        return
    directory = Path(output_dir)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").split()
            os.close(fd)
            who = f"pid {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "") if holder else "another process"
            raise OutputDirError(f"{directory} is in use by another run ({who}, lock file {path}); wait for it to "
                                 "finish, stop it, or choose another training.output_dir") from None
        # The previous holder unlinks the file as it lets go: make sure the file locked is the one at `path`.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    stale = os.read(fd, 200).decode(errors="replace").split()
    if stale:  # a holder that exited normally removed the file: this one's process died holding it
        print(f"note: taking over the stale lock of process {stale[0]} (no longer running) in {directory}",
              file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only when empty: a run that loaded nothing leaves nothing behind


# ------------------------------------------------------------------------------------------- checkpoints


def _step(path: Path) -> int:
    return int(CHECKPOINT.match(path.name).group(1))


def _checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N directories, newest (highest N) first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if CHECKPOINT.match(p.name) and p.is_dir()]
    return sorted(found, key=_step, reverse=True)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None when it is complete.

    Complete means: its completion marker lists every file with the size found on disk. A checkpoint written
    without tam_hf (no marker) counts when its trainer_state.json, which the Trainer writes last, is intact."""
    checkpoint = Path(checkpoint)
    marker = checkpoint / MARKER
    if marker.is_file():
        try:
            files = json.loads(marker.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return f"its completion marker {MARKER} is unreadable"
        for name, size in files.items():
            path = checkpoint / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} is {path.stat().st_size} bytes, {size} when it was saved (truncated or corrupt)"
        return None
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        if state.get("global_step") == _step(checkpoint):
            return None
    except (OSError, ValueError, AttributeError):
        pass
    return "it has no completion marker: its save was interrupted"


def complete_checkpoints(output_dir) -> tuple[list[Path], list[str]]:
    """(complete checkpoints newest first, 'checkpoint-N: reason' for each incomplete one)."""
    complete, skipped = [], []
    for checkpoint in _checkpoints(Path(output_dir)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            complete.append(checkpoint)
        else:
            skipped.append(f"{checkpoint.name}: {problem}")
    return complete, skipped


def remove_checkpoint(checkpoint: Path) -> None:
    """Remove a checkpoint directory, its completion marker first, so that a removal cut short never leaves a
    directory that still looks complete."""
    with contextlib.suppress(FileNotFoundError):
        (Path(checkpoint) / MARKER).unlink()
    shutil.rmtree(checkpoint, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(scratch, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(scratch, path)
    _fsync(path.parent)


def write_marker(checkpoint: Path, step: int) -> None:
    """Flush every file of `checkpoint` to disk, then record them (name -> size) in its completion marker."""
    files = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != MARKER):
        _fsync(path)
        files[path.relative_to(checkpoint).as_posix()] = path.stat().st_size
    import tam_hf

    _write_atomic(checkpoint / MARKER, json.dumps({"step": step, "tam_hf_version": tam_hf.__version__,
                                                   "files": files}, indent=1))


def completion_marker():
    """A TrainerCallback that marks each checkpoint complete once the Trainer has saved it: on_save runs after
    the Trainer wrote every file of checkpoint-N (and rotated old ones). Rank 0 writes the marker, after every
    rank has finished writing its part (DeepSpeed and FSDP save optimizer shards from each rank)."""
    from transformers import TrainerCallback

    class CompletionMarker(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.barrier()
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if args.should_save and checkpoint.is_dir():
                write_marker(checkpoint, state.global_step)

    return CompletionMarker()


# ------------------------------------------------------------------------------------- output directory


def previous_outputs(output_dir) -> list[str]:
    """Names of what another run left in `output_dir` (checkpoints, weights, summary, upload folder)."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    found = [p.name for p in _checkpoints(directory)][::-1]
    found += sorted({p.name for pattern in RESULT_FILES for p in directory.glob(pattern) if p.is_file()})
    if (directory / "hub_upload").is_dir():
        found.append("hub_upload/")
    return found


@dataclass
class OutputPlan:
    """What the run does with its output directory: resume from `checkpoint` (skipping `skipped`), or clear
    `clear` first (overwrite). Carried out by :meth:`apply` once the model and data have loaded."""

    output_dir: Path
    checkpoint: Path | None = None
    skipped: list[str] = field(default_factory=list)
    stale: list[Path] = field(default_factory=list)  # incomplete checkpoints newer than `checkpoint`
    clear: list[str] = field(default_factory=list)

    def apply(self) -> None:
        """Rank 0 only: remove what a resumed or overwriting run must not find (the other ranks read nothing
        of it). Incomplete checkpoints would otherwise be rewritten piecemeal or counted by the rotation."""
        if rank() != 0:
            return
        for checkpoint in self.stale:
            remove_checkpoint(checkpoint)
        for name in self.clear:
            path = self.output_dir / name.rstrip("/")
            if CHECKPOINT.match(path.name):
                remove_checkpoint(path)
            elif path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def plan_output_dir(output_dir, resume, overwrite: bool) -> OutputPlan:
    """Check the output directory against the recipe, before anything is loaded (errors exit 2):

    * ``resume: true``: the newest complete checkpoint-N; incomplete newer ones are named and skipped;
    * ``resume: PATH``: that checkpoint, which must be complete;
    * neither: the directory must hold no other run's outputs, unless ``overwrite: true`` (then they are
      removed just before training starts)."""
    directory = Path(output_dir)
    plan = OutputPlan(directory)
    if isinstance(resume, str):
        checkpoint = Path(resume).expanduser()
        problem = checkpoint_problem(checkpoint)
        if problem is not None:
            raise CheckpointError(f"resume: {resume} is not a complete checkpoint ({problem}); "
                                  f"{_alternatives(checkpoint.parent)}", exit_code=2)
        plan.checkpoint = checkpoint
        return plan
    if resume:
        complete, skipped = complete_checkpoints(directory)
        if not complete:
            raise CheckpointError(f"resume: true but {directory} holds no complete checkpoint to continue from"
                                  + (f" (skipped {'; '.join(skipped)})" if skipped else "")
                                  + "; start over with overwrite: true", exit_code=2)
        plan.checkpoint = complete[0]
        newer = [c for c in _checkpoints(directory) if _step(c) > _step(complete[0])]
        plan.stale = newer
        plan.skipped = [s for s in skipped if any(s.startswith(c.name + ":") for c in newer)]
        return plan
    found = previous_outputs(directory)
    if found and not overwrite:
        shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
        raise OutputDirError(f"{directory} holds another run's outputs ({shown}); continue that run with "
                             "resume: true, start over in it with overwrite: true (its checkpoints, weights and "
                             "summary are removed), or choose another training.output_dir")
    plan.clear = found
    return plan


def _alternatives(directory: Path) -> str:
    complete, _ = complete_checkpoints(directory)
    if complete:
        return "complete checkpoints there: " + ", ".join(c.name for c in complete[:3])
    return f"no complete checkpoint in {directory}"


# ---------------------------------------------------------------------------------------------- summary


def json_safe(value):
    """`value` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return json_safe(value.item())
    return str(value)


def write_summary(output_dir, summary: dict) -> Path:
    """summary.json, atomically and always valid JSON (rank 0 only)."""
    path = Path(output_dir) / "summary.json"
    if rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    return path
