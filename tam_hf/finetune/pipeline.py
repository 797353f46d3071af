"""One fine-tuning run from a validated recipe, in named phases, read top to bottom:

    plan      TrainingArguments' own checks, the output directory's lock, what to resume or remove, whether the
              checkpoint belongs to these settings. Refusals exit 2 and write nothing.
    build     seed, tokenizer, data (rows checked), model (+LoRA/QLoRA), trainer; then what ``overwrite`` or
              ``resume`` must remove is removed, and ``recipe.yaml`` records the run.
    train     ``trainer.train()``, stopped early by a signal (a checkpoint at that step) or by non-finite values.
    save      the weights (the adapter for LoRA/QLoRA) and the tokenizer, into the output directory.
    evaluate  eval loss and the recipe's metrics.
    lm-eval   lm-evaluation-harness on the trained model (``eval.lm_eval``).
    publish   the Hub upload folder and the push (``hub``).

Causal-LM recipes train on TRL's ``SFTTrainer`` (:mod:`tam_hf.finetune.sft`); sequence classification on
:class:`~tam_hf.trainer.tam_trainer.TAMTrainer` with rows tokenised in :mod:`tam_hf.finetune.data`.

Every phase runs under the same signal handling (:mod:`tam_hf.finetune.signals`) and ends the same way on any
error (:func:`_failure`): one message naming the phase, the error and what was kept; ``summary.json`` with
``status: failed``, the phase and the reason; what the phase half-wrote removed; the lock released. A first
signal lets the phase in progress finish, then the run stops with ``status: interrupted``.
"""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tam_hf.finetune.errors import (Aborted, CheckpointError, EvaluationError, FinetuneError, NonFiniteError,
                                    PushError, ResumeError, RunFailed, WriteError, write_failure)
from tam_hf.finetune.outputs import (CHECKPOINT, checkpoint_problem, complete_checkpoints, completion_marker,
                                     plan_output_dir, remove_checkpoint, remove_entry, run_lock, write_summary)
from tam_hf.finetune.launch import rank
from tam_hf.finetune.config.load import rerun_yaml
from tam_hf.finetune.config.schema import Recipe
from tam_hf.finetune.signals import GracefulStop
from tam_hf.finetune.training_args import build_training_arguments

__all__ = ["finetune", "PHASES"]


@dataclass
class _Run:
    """What the phases hand on to each other."""

    recipe: Recipe
    stop: GracefulStop
    callbacks: list
    started: float = field(default_factory=time.time)
    args: Any = None
    output_dir: Path | None = None
    plan: Any = None
    manifest: Any = None  # this run's record of what it wrote (outputs.Manifest), once the directory is its own
    settings: dict | None = None
    tokenizer: Any = None
    trainer: Any = None
    raw: Any = None
    guard: Any = None
    summary: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)  # (error class, message) raised once every phase has run
    # A staged run (tam_hf.finetune.stages): checkpoints go to the current stage's folder, steps add up.
    work_dir: Path | None = None  # where checkpoints are written: output_dir, or the current stage's folder
    stage: Any = None  # the stage in progress (stages.Stage)
    stages: list = field(default_factory=list)
    model: Any = None  # trained by one stage's trainer after another
    steps_before: int = 0  # steps of the stages before the current one

    @property
    def checkpoint(self) -> str | None:
        return str(self.plan.checkpoint) if self.plan is not None and self.plan.checkpoint is not None else None

    @property
    def steps(self) -> int:
        return self.steps_before + (self.trainer.state.global_step if self.trainer is not None else 0)

    def write(self, phase: str, work: Callable[[], Any]):
        """Run `work`, recording what it writes in the manifest as this phase's (see outputs.Manifest)."""
        self.manifest.begin(phase)
        result = work()
        self.manifest.end()
        return result


def finetune(recipe: Recipe, callbacks: list = ()) -> dict:
    """Run every phase; returns the summary the CLI prints (also ``summary.json`` in the output directory, with
    ``status`` completed or interrupted). Failures raise a :class:`~tam_hf.finetune.errors.FinetuneError`
    carrying the exit code and, once the run owns its output directory, the summary written with ``status:
    failed``. A run that finished training but whose lm-eval or push failed raises after every phase has run
    (EvaluationError, PushError: exit 1, nothing lost)."""
    run = _Run(recipe, GracefulStop(), list(callbacks))
    with run.stop:
        run.args = build_training_arguments(recipe)
        run.output_dir = run.work_dir = Path(run.args.output_dir)
        phases = PHASES
        if recipe.stages is not None:
            from tam_hf.finetune.stages import staged_phases

            phases = staged_phases(dict(PHASES), begin=begin, stopped=_STOPPED)
        with run_lock(run.output_dir):  # a concurrent run into the same directory stops here (rank 0 holds it)
            try:
                for name, phase in phases:
                    run.stop.phase = name
                    if run.stop.requested or phase(run) is _STOPPED:
                        return _interrupted(run)
            except BaseException as exc:
                raise _failure(run, exc) from (None if isinstance(exc, FinetuneError) else exc)
            return _finished(run)


# ------------------------------------------------------------------------------------------------- phases

_STOPPED = object()  # a phase's answer when a signal ended it early


def plan(run: _Run) -> None:
    from tam_hf.finetune.resume import resume_problems, run_settings

    recipe = run.recipe
    resume = recipe.resume if isinstance(recipe.resume, str) else bool(recipe.resume)  # resolved at load
    run.plan = plan_output_dir(run.output_dir, resume, recipe.overwrite)
    if run.plan.checkpoint is not None:
        changed = resume_problems(recipe, run.plan.checkpoint)
        if changed:
            raise ResumeError(f"resume: {run.plan.checkpoint} was written with other settings: {'; '.join(changed)}."
                              " Restore them to continue that run, or start a fresh run with overwrite: true "
                              "(or another training.output_dir)")
    run.settings = run_settings(recipe)


def build(run: _Run) -> Any:
    from transformers import set_seed

    from tam_hf.finetune.guards import nonfinite_guard
    from tam_hf.finetune.model import load_tokenizer

    if not run.plan.clear:  # nothing of an earlier run to remove: the directory is this run's from now on
        run.manifest = run.plan.apply()
    set_seed(run.args.seed)
    run.tokenizer = load_tokenizer(run.recipe.model)
    run.guard = nonfinite_guard(resumed_from=run.checkpoint)
    # The guard comes last: it must see the save decisions of every callback before it.
    callbacks = [run.stop.callback(), *run.callbacks, completion_marker(run.settings), run.guard]
    run.trainer, run.raw = _trainer(run.recipe, run.args, run.tokenizer, callbacks)
    return begin(run)


def begin(run: _Run) -> Any:
    """The end of build, once the model and data have loaded: the directory becomes this run's, recipe.yaml and
    a first summary.json are written."""
    import tam_hf

    if run.stop.requested:  # nothing removed, nothing written: the directory is as it was
        return _STOPPED
    if run.manifest is None:  # loading worked: now remove what overwrite must not find
        run.manifest = run.plan.apply()
    if run.plan.skipped and rank() == 0:
        print(f"resume: skipped incomplete checkpoint(s), removed: {'; '.join(run.plan.skipped)}", file=sys.stderr)
    run.summary = {"status": "running", "output_dir": str(run.output_dir), "optimizer": run.recipe.optimizer.name,
                   "tam_hf_version": tam_hf.__version__}
    if run.checkpoint is not None:
        run.summary.update(resumed_from=run.checkpoint, skipped_checkpoints=run.plan.skipped)
    run.write("build", lambda: (_save_recipe(run), write_summary(run.output_dir, run.summary)))


def train(run: _Run) -> Any:
    trainer = run.trainer
    if _trained_to_the_end(run):
        mean = _restore_finished(run)
    else:
        mean = run.write("train", lambda: trainer.train(resume_from_checkpoint=run.checkpoint)).training_loss
    if not run.stop.requested:
        run.guard.check_weights(trainer.model, trainer.state.global_step)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # The last logged loss, not the run's mean; the mean when no step was logged (and the summary says so).
    run.summary.update(train_loss=logged[-1] if logged else mean, train_loss_logged=bool(logged),
                       mean_train_loss=mean, steps=trainer.state.global_step, damping=_damping(trainer))
    if run.recipe.optimizer.switch is not None:
        from tam_hf.optim.switch import switch_summary

        run.summary["switch"] = switch_summary(trainer.optimizer)
    checkpoint = run.work_dir / f"checkpoint-{trainer.state.global_step}"
    if run.stop.requested and checkpoint.is_dir():  # else the signal came after the last step: save goes on
        run.summary["checkpoint"] = str(checkpoint)
        return _STOPPED


def _trained_to_the_end(run: _Run) -> bool:
    """Resuming a checkpoint written at the last step (a run stopped after training, in its save or evaluation):
    transformers' train() would take one step more, so the checkpoint is loaded without training."""
    if run.checkpoint is None or run.args.max_steps <= 0:
        return False
    import json

    try:
        step = json.loads((Path(run.checkpoint) / "trainer_state.json").read_text())["global_step"]
    except (OSError, ValueError, KeyError):
        return False
    return step >= run.args.max_steps


def _restore_finished(run: _Run) -> None:
    """The model, trainer state and optimizer state of a checkpoint taken at the last step, without a training
    step. The run's mean train loss is not in the checkpoint: the summary has the last logged loss."""
    import torch
    from transformers import TrainerState

    trainer = run.trainer
    trainer._load_from_checkpoint(run.checkpoint)  # the Trainer's own loader: full models, adapters, shards
    trainer.state = TrainerState.load_from_json(str(Path(run.checkpoint) / "trainer_state.json"))
    optimizer_pt = Path(run.checkpoint) / "optimizer.pt"
    if optimizer_pt.is_file():  # for the damping of the summary
        trainer.create_optimizer()
        trainer.optimizer.load_state_dict(torch.load(optimizer_pt, map_location="cpu", weights_only=True))
    return None


def save(run: _Run) -> None:
    # The adapter (lora/qlora) or the whole model, with the tokenizer.
    run.write("save", lambda: run.trainer.save_model(str(run.output_dir)))
    run.summary["model"] = str(run.output_dir)


def evaluate(run: _Run) -> None:
    from tam_hf.finetune.evaluation import evaluate as evaluate_model

    metrics, notes = {}, []
    if run.trainer.eval_dataset is not None:
        metrics, notes = evaluate_model(run.recipe, run.trainer, run.tokenizer, run.raw.get("eval"))
    run.summary["eval"] = metrics
    if run.trainer.validation_dataset is not None:  # for choosing among runs (compare --tune-lr), never the eval set
        run.summary["validation"], more = evaluate_model(run.recipe, run.trainer, run.tokenizer,
                                                         run.raw.get("validation"), split="validation")
        notes += more
    if notes:
        run.summary["notes"] = notes


def lm_eval(run: _Run) -> None:
    """eval.lm_eval on the trained model. Skipped, with a note, in a launched run: lm-eval runs one process,
    and the ranks hold the model (or its shards) apart. Its failure is raised once the Hub step has run."""
    from tam_hf.finetune.errors import LMEvalError
    from tam_hf.finetune.lm_eval import run_lm_eval

    cfg = run.recipe.eval.lm_eval
    if cfg is None:
        return
    if run.trainer.args.world_size > 1:
        run.summary["lm_eval_skipped"] = (f"lm-eval runs in one process, this run had {run.trainer.args.world_size}:"
                                          f" evaluate the saved model with: tam-finetune eval {run.output_dir}")
        return
    try:
        out = run.write("lm-eval", lambda: run_lm_eval(
            run.trainer.model, run.tokenizer, cfg.tasks, run.output_dir, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
            batch_size=cfg.batch_size, saved_at=str(run.output_dir)))
    except LMEvalError as exc:
        run.manifest.end()
        run.summary["lm_eval_error"] = str(exc)
        run.errors.append((EvaluationError, str(exc)))
        return
    run.summary.update(lm_eval=out["tasks"], lm_eval_table=out["table"], lm_eval_results=out["results_file"])


def publish(run: _Run) -> None:
    hub = run.recipe.hub
    if not (hub.push or hub.repo_id):
        return
    from tam_hf.finetune.hub import prepare_upload, push

    folder = run.write("publish", lambda: prepare_upload(run.trainer.model, run.tokenizer, run.recipe, run.summary,
                                                         run.output_dir))
    run.summary["hub_folder"] = str(folder)
    if hub.push:
        pushed, run.summary["hub"] = push(folder, hub.repo_id, hub.private)
        if not pushed:
            run.errors.append((PushError, f"{run.summary['hub']}. The run itself is complete and saved in "
                                          f"{run.output_dir}; retry the push alone with: tam-finetune push "
                                          f"{run.output_dir}"))


PHASES: tuple[tuple[str, Callable[[_Run], Any]], ...] = (
    ("plan", plan), ("build", build), ("train", train), ("save", save), ("evaluate", evaluate),
    ("lm-eval", lm_eval), ("publish", publish))


# ------------------------------------------------------------------------------------------------ endings


def _finished(run: _Run) -> dict:
    run.summary.update(status="completed", wall_s=round(time.time() - run.started, 1))
    write_summary(run.output_dir, run.summary)
    if run.errors:  # lm-eval and the push: everything else ran, nothing the run made is lost
        kind = run.errors[0][0]
        message = ". ".join(m for _, m in run.errors)
        if kind is EvaluationError and len(run.errors) > 1:
            message += f"; retry the push with: tam-finetune push {run.output_dir}"
        raise kind(message, run.summary)
    return run.summary


def _interrupted(run: _Run) -> dict:
    """A signal asked the run to stop; the phase in progress finished. Only a run that owns its directory
    writes a summary (one stopped while loading an overwrite has removed nothing yet)."""
    good, _ = complete_checkpoints(run.work_dir) if run.work_dir.is_dir() else ([], [])
    run.summary.setdefault("checkpoint", str(good[0]) if good else None)
    run.summary.update(status="interrupted", interrupted=True, signal=run.stop.signal_name or "SIGINT",
                       phase=run.stop.phase, steps=run.steps, kept=_kept(run),
                       wall_s=round(time.time() - run.started, 1))
    run.summary.setdefault("output_dir", str(run.output_dir))
    run.summary.setdefault("optimizer", run.recipe.optimizer.name)
    if run.manifest is not None:
        write_summary(run.output_dir, run.summary)
    return run.summary


def _failure(run: _Run, exc: BaseException) -> BaseException:
    """The one place an error of any phase becomes a message, a summary and an exit code. Before the run owns
    its output directory (plan, and build while an overwrite is pending) nothing is written there."""
    phase = run.stop.phase
    if isinstance(exc, Aborted) or isinstance(exc, FinetuneError) and exc.summary is not None:
        return exc  # already recorded
    if run.manifest is None:
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, FinetuneError):
            return Aborted(f"aborted during {phase} (second signal): nothing was written", run.stop.exit_code)
        if isinstance(exc, FinetuneError) or phase == "plan":
            return exc
        return RunFailed(f"{phase} failed: {_cause(exc)}; {run.output_dir} was not changed{_traceback_note(exc)}")
    removed = _remove_half_written(run, phase)
    gone = f"; removed the half-written {', '.join(removed)}" if removed else ""
    kept = _kept(run)
    if isinstance(exc, NonFiniteError):
        reason = f"training diverged: {exc}"
        run.summary["diverged_at_step"] = exc.step
        summary = _record_failure(run, phase, reason)
        last = summary["last_complete_checkpoint"]
        return NonFiniteError(f"{reason}. Nothing was saved for the diverged state; "
                              + (f"the last complete checkpoint is {last}. " if last else "no checkpoint was kept. ")
                              + "Lower optimizer.lr (or check the data) and start over with overwrite: true",
                              summary, step=exc.step)
    if isinstance(exc, KeyboardInterrupt):
        reason = f"aborted by a second signal during {phase}{gone}"
        return Aborted(f"{reason}; {kept}", run.stop.exit_code, _record_failure(run, phase, reason))
    meaning = write_failure(exc)
    if meaning is not None:
        what = _writing(run, phase, removed)
        reason = f"{meaning} in {run.output_dir} while {what}{gone}"
        return WriteError(f"{reason}; {kept}. Free space (or raise the limit) and rerun with resume: true",
                          _record_failure(run, phase, reason))
    if phase == "train" and run.checkpoint is not None and not run.guard.started:
        # Loading the checkpoint happens inside train(), before the first callback of training.
        reason = f"could not resume from {run.checkpoint}: {_cause(exc)}"
        return CheckpointError(f"{reason}. The files are damaged or were written by a different recipe (model, "
                               "LoRA, optimizer); resume from an earlier complete checkpoint (resume: PATH) or start "
                               "over with overwrite: true", summary=_record_failure(run, phase, reason))
    if isinstance(exc, FinetuneError):
        exc.summary = _record_failure(run, phase, str(exc))
        return exc
    reason = f"{phase} failed: {_cause(exc)}"
    summary = _record_failure(run, phase, reason)
    saved = _save_traceback(run, exc)
    return RunFailed(f"{reason}; {kept}" + (f". Traceback: {saved}" if saved else ""), summary)


def _record_failure(run: _Run, phase: str, reason: str) -> dict:
    good, _ = complete_checkpoints(run.work_dir)
    run.summary.setdefault("output_dir", str(run.output_dir))  # a build that failed wrote no first summary
    run.summary.setdefault("optimizer", run.recipe.optimizer.name)
    run.summary.update(status="failed", phase=phase, reason=reason, steps=run.steps,
                       last_complete_checkpoint=str(good[0]) if good else None,
                       wall_s=round(time.time() - run.started, 1))
    try:
        write_summary(run.output_dir, run.summary)
    except OSError as exc:  # the disk that failed the phase may refuse the summary too
        print(f"summary.json could not be written either: {exc}", file=sys.stderr)
    return run.summary


def _remove_half_written(run: _Run, phase: str) -> list[str]:
    """What the failed phase left half-written: an incomplete checkpoint (train), the files the phase had
    written so far (save, lm-eval, publish: a model, results or an upload folder cut short). Rank 0 only."""
    if rank() != 0:
        return []
    if phase == "train":
        removed = []
        for path in sorted(run.work_dir.iterdir()) if run.work_dir.is_dir() else ():
            if CHECKPOINT.match(path.name) and path.is_dir() and checkpoint_problem(path) is not None:
                remove_checkpoint(path)
                removed.append(path.name)
        return removed
    if phase in ("save", "lm-eval", "publish"):
        written = run.manifest.written()
        for name in written:
            remove_entry(run.output_dir / name)
        run.manifest.end()
        return written
    return []


def _writing(run: _Run, phase: str, removed: list[str]) -> str:
    if phase == "train":
        return f"saving {removed[0]}" if removed else f"training (step {run.steps})"
    return {"build": "writing recipe.yaml and summary.json", "save": "saving the model",
            "lm-eval": "writing the lm-eval results", "publish": "preparing the Hub upload folder"}.get(phase, phase)


def _kept(run: _Run) -> str:
    """What the run leaves behind, in words, for its last message."""
    good, _ = complete_checkpoints(run.work_dir) if run.work_dir.is_dir() else ([], [])
    parts = [f"in stage {run.stage.index + 1} of {len(run.stages)} ({run.stage.name})"] if run.stage else []
    parts += [f"trained to step {run.steps}" if run.steps else "nothing was trained in this run",
             f"the last complete checkpoint is {good[0]}" if good else "no checkpoint was kept"]
    if run.steps:
        parts.append("the model is saved" if run.summary.get("model") else "no final model was saved")
    if "eval" in run.summary:
        parts.append("evaluated")
    return ", ".join(parts)


def _cause(exc: BaseException) -> str:
    text = (str(exc).splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _traceback_note(exc: BaseException) -> str:
    return "" if isinstance(exc, (OSError, ValueError)) else " (set TAM_HF_TRACEBACK=1 for the traceback)"


def _save_traceback(run: _Run, exc: BaseException) -> str | None:
    """An error without better words is a bug or an environment problem: keep its traceback for the report."""
    path = run.output_dir / "traceback.txt"
    try:
        run.write("failed", lambda: path.write_text("".join(traceback.format_exception(exc))))
    except OSError:
        return None
    return str(path)


# ----------------------------------------------------------------------------------------------- helpers


def _save_recipe(run: _Run) -> Path:
    """<output_dir>/recipe.yaml: the recipe with every default filled in, a valid recipe of its own, without
    ``resume`` and ``overwrite`` (its "rerun with" line must neither continue this run nor wipe it: rerun into
    the same directory, it is refused with both ways named)."""
    path = run.output_dir / "recipe.yaml"
    path.write_text("# resolved recipe (defaults filled in); rerun with: tam-finetune " + str(path) + "\n"
                    + rerun_yaml(run.recipe))
    return path


def _damping(trainer) -> dict | None:
    from tam_hf.trainer.distributed import find_torque_optimizer

    tam = find_torque_optimizer(trainer.optimizer)[0] if trainer.optimizer is not None else None
    return tam.damping_summary() if tam is not None else None


def _trainer(recipe: Recipe, args, tokenizer, callbacks: list):
    """(trainer, raw DatasetDict): TRL's SFTTrainer for causal LM, TAMTrainer for sequence classification. Loads
    the data (rows checked) and the model; raises DataError for data that cannot be trained on."""
    from tam_hf.finetune.model import load_model

    d = recipe.data
    if recipe.task == "sequence_classification":
        from tam_hf.finetune.data import build_datasets, collator
        from tam_hf.finetune.metrics import classification_metrics
        from tam_hf.trainer.tam_trainer import TAMTrainer

        train_ds, eval_ds, raw, label_names, validation_ds = build_datasets(recipe, tokenizer)
        model = load_model(recipe, tokenizer, label_names)
        compute_metrics = None
        if eval_ds is not None and recipe.eval.metrics:
            compute_metrics = classification_metrics(recipe.eval.metrics, regression=d.target == "score")
        trainer = TAMTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             data_collator=collator(recipe, tokenizer), processing_class=tokenizer,
                             compute_metrics=compute_metrics, callbacks=callbacks)
        trainer.validation_dataset = validation_ds  # scored after training only (the evaluate phase)
        return trainer, raw
    from tam_hf.finetune.data import load_raw
    from tam_hf.finetune.sft import build_sft_trainer

    raw = load_raw(d)
    model = load_model(recipe, tokenizer)
    trainer = build_sft_trainer(
        model, tokenizer, args, raw["train"], raw.get("eval"), fmt=d.format, max_length=d.max_length,
        completion_only_loss=d.completion_only_loss, instruction_template=d.instruction_template, packing=d.packing,
        padding_free=d.padding_free,
        chat_template_path=d.chat_template_path, callbacks=callbacks, validation_rows=raw.get("validation"))
    return trainer, raw
