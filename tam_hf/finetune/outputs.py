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
* :class:`Manifest` (``<output_dir>/.tam_hf_run.json``) records every file and folder the run writes, phase by
  phase, so that ``overwrite: true`` removes exactly those and refuses a directory holding anything else. A phase
  that writes names itself first (with what the directory held before it): what a run killed mid-write left
  behind is still known to be the run's.
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
from tam_hf.finetune.launch import rank

try:  # POSIX; elsewhere runs go unlocked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = ["LOCK_NAME", "MARKER", "MANIFEST", "Manifest", "run_lock", "previous_outputs", "plan_output_dir",
           "OutputPlan", "checkpoint_problem", "checkpoint_record", "complete_checkpoints", "remove_checkpoint",
           "remove_entry", "completion_marker", "write_summary", "write_json", "json_safe"]

LOCK_NAME = ".tam_hf.lock"
MARKER = "tam_hf_checkpoint.json"
MANIFEST = ".tam_hf_run.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Files a finished run leaves at the top of its output directory (besides checkpoint-* and hub_upload/).
RESULT_FILES = ("summary.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "adapter_model.bin",
                "adapter_config.json", "training_args.bin")


# ------------------------------------------------------------------------------------------------- lock


_HELD: set[Path] = set()  # the directories this process holds the lock of


@contextlib.contextmanager
def run_lock(output_dir):
    """Hold the output directory's lock for the block (rank 0 only). Raises OutputDirError (exit 2) when a live
    process holds it. Creates the directory; removes it again on the way out when the run left it empty. Within
    a block that holds it already (``compare`` locks a run's directory before it prepares it), a no-op."""
    directory = Path(output_dir)
    held = directory.resolve()
    if rank() != 0 or fcntl is None or held in _HELD:
        yield
        return
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
    _HELD.add(held)
    try:
        yield
    finally:
        _HELD.discard(held)
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


def write_marker(checkpoint: Path, step: int, run: dict | None = None) -> None:
    """Flush every file of `checkpoint` to disk, then record them (name -> size) in its completion marker, with
    `run`, the settings the checkpoint was written under (see :mod:`tam_hf.finetune.resume`)."""
    files = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != MARKER):
        _fsync(path)
        files[path.relative_to(checkpoint).as_posix()] = path.stat().st_size
    import tam_hf

    record = {"step": step, "tam_hf_version": tam_hf.__version__, "files": files}
    if run is not None:
        record["run"] = run
    _write_atomic(checkpoint / MARKER, json.dumps(record, indent=1))


def checkpoint_record(checkpoint) -> dict:
    """The completion marker of a checkpoint ({} when it has none or it cannot be read)."""
    try:
        record = json.loads((Path(checkpoint) / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def completion_marker(run: dict | None = None):
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
                write_marker(checkpoint, state.global_step, run)

    return CompletionMarker()


# ------------------------------------------------------------------------------------------------ manifest


def _entries(directory: Path) -> set[str]:
    """The top-level names in `directory`, without the lock and the manifest themselves."""
    if not directory.is_dir():
        return set()
    return {p.name for p in directory.iterdir()} - {LOCK_NAME, MANIFEST}


def remove_entry(path: Path) -> None:
    """Remove one file or folder a run wrote (a checkpoint's marker first, see :func:`remove_checkpoint`)."""
    if CHECKPOINT.match(path.name) and path.is_dir():
        remove_checkpoint(path)
    elif path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class Manifest:
    """What tam_hf runs wrote in one output directory: ``owned`` (names at its top level) and, while a phase is
    writing, ``writing`` = {phase, before}: everything that appears meanwhile is that phase's. Rank 0 writes it."""

    def __init__(self, directory, data: dict | None = None):
        self.directory = Path(directory)
        self.data = data or {"owned": [], "writing": None}

    @classmethod
    def read(cls, directory) -> "Manifest | None":
        """The directory's manifest; None when it has none. An unreadable one (a run killed while writing it,
        which happens atomically, or a hand edit) counts as none: nothing is then known to be a run's."""
        try:
            data = json.loads((Path(directory) / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("owned"), list):
            return None
        return cls(directory, data)

    def owned(self) -> set[str]:
        """The names present now that a run wrote, the ones a phase cut short left behind included."""
        present = _entries(self.directory)
        owned = set(self.data["owned"]) & present
        writing = self.data.get("writing")
        if isinstance(writing, dict):
            owned |= present - set(writing.get("before") or ())
        return owned

    def begin(self, phase: str) -> None:
        self.data["owned"] = sorted(self.owned())
        self.data["writing"] = {"phase": phase, "before": sorted(_entries(self.directory))}
        self._save()

    def written(self) -> list[str]:
        """What the phase in progress has written so far."""
        writing = self.data.get("writing") or {}
        return sorted(_entries(self.directory) - set(writing.get("before") or ()))

    def end(self) -> None:
        self.data["owned"] = sorted(self.owned())
        self.data["writing"] = None
        self._save()

    def _save(self) -> None:
        if rank() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.directory / MANIFEST, json.dumps(self.data, indent=1))


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
    manifest: Manifest | None = None  # the record of a run continued in place

    def apply(self) -> Manifest:
        """Rank 0 only: remove what a resumed or overwriting run must not find (the other ranks read nothing
        of it; incomplete checkpoints would otherwise be rewritten piecemeal or counted by the rotation).
        Returns the manifest this run records its writes in."""
        if rank() == 0:
            for checkpoint in self.stale:
                remove_checkpoint(checkpoint)
            for name in self.clear:
                remove_entry(self.output_dir / name)
        manifest = self.manifest or Manifest(self.output_dir)
        manifest.end()
        return manifest


def plan_output_dir(output_dir, resume, overwrite: bool) -> OutputPlan:
    """Check the output directory against the recipe, before anything is loaded (errors exit 2):

    * ``resume: true``: the newest complete checkpoint-N; incomplete newer ones are named and skipped;
    * ``resume: PATH``: that checkpoint, which must be complete; continuing it in another directory follows the
      rule of a fresh run there;
    * a fresh run: the directory must hold no other run's outputs, unless ``overwrite: true``; then exactly what
      tam_hf runs wrote there is removed (just before training starts), and a directory holding anything else
      is refused."""
    directory = Path(output_dir)
    plan = OutputPlan(directory)
    manifest = Manifest.read(directory)
    if isinstance(resume, str):
        checkpoint = Path(resume).expanduser()
        problem = checkpoint_problem(checkpoint)
        if problem is not None:
            raise CheckpointError(f"resume: {resume} is not a complete checkpoint ({problem}); "
                                  f"{_alternatives(checkpoint.parent)}", exit_code=2)
        plan.checkpoint = checkpoint
        if checkpoint.resolve().parent == directory.resolve():
            plan.manifest = manifest
        else:
            plan.clear = _fresh_start(directory, manifest, overwrite, f" (resume: {resume} would continue its own run"
                                                                      " there)")
        return plan
    if resume:
        complete, skipped = complete_checkpoints(directory)
        if not complete:
            raise CheckpointError(f"resume: true but {directory} holds no complete checkpoint to continue from"
                                  + (f" (skipped {'; '.join(skipped)})" if skipped else "")
                                  + "; start over with overwrite: true", exit_code=2)
        plan.checkpoint, plan.manifest = complete[0], manifest
        newer = [c for c in _checkpoints(directory) if _step(c) > _step(complete[0])]
        plan.stale = newer
        plan.skipped = [s for s in skipped if any(s.startswith(c.name + ":") for c in newer)]
        return plan
    plan.clear = _fresh_start(directory, manifest, overwrite, "")
    return plan


def _fresh_start(directory: Path, manifest: Manifest | None, overwrite: bool, why: str) -> list[str]:
    """What a run starting afresh in `directory` must remove first (overwrite), or the refusal."""
    found = previous_outputs(directory)
    owned = manifest.owned() if manifest is not None else set()
    found += sorted(owned - set(found) - {n.rstrip("/") for n in found})
    if not found:
        return []
    if not overwrite and manifest is not None and _trained_nothing(directory, owned):
        return sorted(owned)  # a run that stopped or failed before its first step: nothing to lose
    if not overwrite:
        shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
        raise OutputDirError(f"{directory} holds another run's outputs ({shown}){why}; continue that run "
                             "with resume: true, start over in it with overwrite: true (what tam_hf runs wrote "
                             "there is removed), or choose another training.output_dir")
    foreign = sorted(_entries(directory) - owned)
    if foreign:
        shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        record = "no tam_hf run recorded writing" if manifest is None else "no tam_hf run wrote"
        raise OutputDirError(f"overwrite: true removes only what tam_hf runs wrote, and {directory} holds "
                             f"{shown}, which {record} there (nothing was removed); move them away or choose "
                             "another training.output_dir")
    return sorted(owned)


def _trained_nothing(directory: Path, owned: set[str]) -> bool:
    try:
        summary = json.loads((directory / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(summary, dict) and summary.get("status") in ("failed", "interrupted")
            and not summary.get("steps") and not any(CHECKPOINT.match(name) for name in owned))


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


def write_json(path, value) -> Path:
    """`value` as JSON at `path`, atomically (a reader finds the old file or the whole new one, never a part) and
    always valid (non-finite numbers become null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n")
    return path


def write_summary(output_dir, summary: dict) -> Path:
    """summary.json, atomically and always valid JSON (rank 0 only)."""
    path = Path(output_dir) / "summary.json"
    if rank() == 0:
        write_json(path, summary)
    return path
