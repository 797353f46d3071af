"""Running the runs of a study (planned by :mod:`tam_hf.compare.study`), one at a time, resumably.

Resumable: each run lives in ``DIR/runs/<arm>/seed<k>`` (a tuning run in ``DIR/tuning/<arm>/lr<lr>/seed<k>``) and
is finished when its ``result.json`` can be read and was produced by the same resolved recipe; a rerun of the same
command skips those and only does the rest (a partial run is continued from its last complete checkpoint when it
saved one, else started again; a staged run also from the end of its last finished stage; its ``wall_s`` then adds
up the time of every attempt up to that checkpoint, recorded in ``study.json``: a staged run continued at a stage's
end, where no checkpoint recorded a time, reports its resumed part only, and says so). A finished run of another
recipe in a run's folder is not replaced unless asked (``compare --overwrite``): the command stops first, naming
what changed (:meth:`tam_hf.compare.study.Run.replaces`). ``result.json`` and ``study.json`` are written
atomically; one that cannot be read (cut short by a full disk or a crash) means "not finished": the run is done
again, with a note. A run's folder is locked while it is prepared and trained: a second command into the same study
stops at a run the first holds (the holder named).

A run that diverges (non-finite loss, gradients or weights) is a result, not a reason to stop: its
``result.json`` says ``status: diverged`` with the step and reason and no metrics (train loss and eval null), the
study carries on, a rerun does not retry it, and the report lists it (per arm: how many seeds diverged, which)
and leaves it out of the means. Any other run error stops the study with its message and exit code.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

__all__ = ["RECORD", "read_result", "unreadable", "execute", "diverged"]

# A partial run's own record (fingerprint, seconds to each checkpoint over every attempt), written atomically.
RECORD = "study.json"
KEEP_FILES = ("result.json", "summary.json", "recipe.yaml", RECORD)


def read_result(path: Path) -> Optional[dict]:
    """A run's result.json (or :data:`RECORD`), or None when there is none or it cannot be read whole (a disk
    that filled up, a power cut): such a run is not finished and is done again."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def unreadable(path: Path) -> bool:
    """A result.json that exists but :func:`read_result` cannot read."""
    return path.exists() and read_result(path) is None


def _history_callback(finished: tuple = ()):
    """A callback that keeps the Trainer's state, so the log history (the final evaluation included: it is
    appended to the same state after training) outlives the run; finetune() returns only the summary. A staged
    run trains one Trainer per stage, each counting steps from 0: its history is every stage's, one after the
    other, each stage's steps shifted by the steps of the stages before it (one axis for the curves); the states
    of stages ``finished`` in an earlier attempt (read back from their folders) come first."""
    from transformers import TrainerCallback

    class _History(TrainerCallback):
        def __init__(self):
            self.states = list(finished)

        def on_train_begin(self, args, state, control, **kwargs):
            if not any(state is seen for seen in self.states):
                self.states.append(state)

        @property
        def log_history(self) -> list[dict]:
            out, offset = [], 0
            for state in self.states:
                out += [{**entry, "step": entry["step"] + offset} if "step" in entry else entry
                        for entry in state.log_history]
                offset += state.global_step
            return out

    return _History()


def _prepare(run) -> tuple[Optional[str], Optional[float], tuple]:
    """Continue a partial run from its last complete checkpoint (a staged run: or from the end of its last
    finished stage) when the recipe is unchanged; else start over. Returns (where it continues from, the seconds
    the earlier attempts took to get there, the trainer states of the stages finished before), None, None, ()
    for a fresh start; the seconds are None too when no attempt recorded them."""
    from tam_hf.finetune.outputs import write_json

    d = run.directory
    record = _record(d)
    point = _resume_point(run) if record.get("fingerprint") == run.fingerprint else None
    if point is not None:
        run.recipe.resume = True
        return point, (record.get("elapsed_s") or {}).get(_elapsed_key(d, d / point)), _finished_states(run)
    _remove_all_but(d, ())
    write_json(d / RECORD, {"fingerprint": run.fingerprint, "elapsed_s": {}})
    return None, None, ()


def _remove_all_but(directory: Path, keep: tuple) -> None:
    """Remove every entry of the run's folder but ``keep`` and the lock this process holds on it (the lock goes
    when it is let go)."""
    from tam_hf.finetune.outputs import LOCK_NAME

    for path in directory.iterdir():
        if path.name not in (*keep, LOCK_NAME):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _resume_point(run) -> Optional[str]:
    """What ``resume: true`` would continue from, relative to the run's folder, or None."""
    from tam_hf.finetune.outputs import complete_checkpoints
    from tam_hf.finetune.stages import resume_point

    if run.recipe.stages:
        return resume_point(run.directory, run.recipe)
    good, _ = complete_checkpoints(run.directory)
    return good[0].name if good else None


def _finished_states(run) -> tuple:
    from transformers import TrainerState

    from tam_hf.finetune.stages import STATE_FILE, finished_stages

    if not run.recipe.stages:
        return ()
    done = finished_stages(run.directory, run.recipe)
    return tuple(TrainerState.load_from_json(str(folder / STATE_FILE)) for folder in done)


def _elapsed_key(directory: Path, checkpoint: Path) -> Optional[str]:
    """The key of a checkpoint's time in the run's record: its step for a checkpoint of the run itself (as
    records written before staged runs had them), "<stage folder>/checkpoint-N" for a stage's; None for a point
    that is no checkpoint (a stage's end: no time is recorded there)."""
    from tam_hf.finetune.outputs import CHECKPOINT

    if not CHECKPOINT.match(checkpoint.name):
        return None
    if checkpoint.parent == directory:
        return checkpoint.name.rsplit("-", 1)[1]
    return f"{checkpoint.parent.name}/{checkpoint.name}"


def _record(directory: Path) -> dict:
    """RECORD of a partial run: its fingerprint, and checkpoint step -> seconds from the run's first start to that
    checkpoint over every attempt. Unreadable counts as absent: the run starts over."""
    value = read_result(directory / RECORD)
    return value if value is not None else {}


def _elapsed_callback(directory: Path, before: float):
    """Records, at every checkpoint, the seconds spent so far (``before`` from earlier attempts plus this one), so
    that a run killed and continued from that checkpoint reports the wall time of all its parts."""
    from transformers import TrainerCallback

    from tam_hf.finetune.outputs import write_json

    started = time.time()

    class _Elapsed(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            record = _record(directory)
            key = _elapsed_key(directory, Path(args.output_dir) / f"checkpoint-{state.global_step}")
            record.setdefault("elapsed_s", {})[key] = round(before + time.time() - started, 1)
            write_json(directory / RECORD, record)

    return _Elapsed()


def _prune(directory: Path) -> None:
    """Drop weights and checkpoints of a finished run: a study of many runs would otherwise fill the disk."""
    _remove_all_but(directory, KEEP_FILES)


def execute(run, keep_models: bool = False) -> dict:
    """Train one run and write its result.json (atomically: a reader finds no file or the whole file); a run
    that diverges is written as a diverged result (see the module docstring). Other run errors propagate."""
    from tam_hf.finetune.outputs import run_lock

    # Held from before the folder is prepared (a fresh start empties it) until the result is written: a second
    # command into the same folder stops at a run this one is training (OutputDirError, which names the holder)
    # instead of clearing it. The pipeline's own lock on the folder is this one.
    with run_lock(run.directory):
        return _execute(run, keep_models)


def _execute(run, keep_models: bool) -> dict:
    from tam_hf.finetune.errors import NonFiniteError
    from tam_hf.finetune.outputs import write_json
    from tam_hf.finetune.pipeline import finetune

    resumed_from, before, finished = _prepare(run)
    history = _history_callback(finished)
    result = {"label": run.label, "seed": run.seed, "lr": run.recipe.optimizer.lr, "fingerprint": run.fingerprint,
              "fixed_damping": run.fixed_damping}
    callbacks = [history, _elapsed_callback(run.directory, before or 0.0)]
    try:
        summary = finetune(run.recipe, callbacks=callbacks)
    except NonFiniteError as exc:
        summary = dict(exc.summary or {})
        # No metric of a diverged run may enter a mean: the report reads train_loss / eval / damping / wall_s.
        summary.update(status="diverged", train_loss=None, eval=None, damping=None)
        result.update(status="diverged", diverged=str(exc), diverged_at_step=exc.step,
                      wall_s=_add_parts(result, summary.pop("wall_s", None), resumed_from, before))
    else:
        if summary.get("interrupted"):
            raise KeyboardInterrupt
        result["status"] = "completed"
        summary["wall_s"] = _add_parts(result, summary.get("wall_s"), resumed_from, before)
    result.update(summary=summary, log_history=history.log_history)
    write_json(run.result_path, result)
    if not keep_models:
        _prune(run.directory)
    return result


def _add_parts(result: dict, wall_s: Optional[float], resumed_from: Optional[str], before: Optional[float]):
    """The wall time of every attempt of a resumed run added up (recorded in ``result``); this attempt's alone
    when the run was not resumed, or the earlier attempts recorded nothing (said in ``result``)."""
    if resumed_from is None or not isinstance(wall_s, (int, float)):
        return wall_s
    result["resumed_from"] = resumed_from
    if before is None:
        result["wall_s_note"] = f"resumed from {resumed_from}, whose time was not recorded: wall_s " \
                                "counts the resumed part only"
        return wall_s
    result["wall_s_parts"] = [before, wall_s]
    return round(before + wall_s, 1)


def diverged(result: dict) -> bool:
    return result.get("status") == "diverged"
