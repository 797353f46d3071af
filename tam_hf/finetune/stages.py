"""Staged runs (a recipe's ``stages:``): continual fine-tuning across a sequence of datasets, the way a
distribution shift is studied. The phases are the pipeline's (:mod:`tam_hf.finetune.pipeline`: its run record,
signal handling, failures, manifest and checkpoint markers, handed in by :func:`staged_phases`); ``train`` runs
the stages one after the other:

    for each stage k:  train on stage k's data (its own TrainingArguments and lr schedule: warm-up restarts),
                       save its final model, optimizer state and trainer state into its folder,
                       evaluate on EVERY stage's eval set (and validation set, where the data has one),
                       write the stage's completion record, update summary.json.

What carries over: the model (a LoRA adapter too: one model object is trained by each stage's trainer in turn)
and, unless the stage says ``reset_optimizer: true``, the optimizer's state: the new stage's optimizer is built
over the same parameters and the previous stage's state is loaded into it when training starts (its
hyperparameters and lr schedule stay the new stage's; AdamW's and AdaTAM's step counts go on).

Layout of ``<output_dir>``::

    stage-<k>-<name>/checkpoint-N       the stage's checkpoints, completion-marked as a run's are
    stage-<k>-<name>/                   its final model, optimizer.pt, trainer_state.json (with the evaluations
                                        after the stage), tam_hf_stage.json
    model files, summary.json, recipe.yaml   the final model (after the last stage) and the run's summary

``resume: true`` skips every stage whose completion record is intact (and was written under the stage's
settings), then continues the first unfinished stage from its newest complete checkpoint, or starts it from the
previous stage's saved model and optimizer state. The summary's ``eval`` / ``validation`` are the final model's
average over the stages, ``stages`` the per-stage evaluations and ``continual`` the numbers of
:mod:`tam_hf.finetune.continual`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from tam_hf.finetune.config.schema import DataConfig, Recipe, StageConfig
from tam_hf.finetune.config.stage_rules import STAGE_MARKER, restage, stage_folder
from tam_hf.finetune.continual import continual_metrics, higher_is_better, mean_metrics
from tam_hf.finetune.errors import CheckpointError, RecipeError, ResumeError
from tam_hf.finetune.outputs import (CHECKPOINT, Manifest, OutputPlan, complete_checkpoints, plan_output_dir,
                                     write_json, write_summary)

__all__ = ["Stage", "stage_recipe", "staged_phases", "finished_stages", "resume_point", "OPTIMIZER_FILE", "STATE_FILE"]

OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"  # the stage's trainer state, its log with the evaluations after the stage
SPLITS = ("eval", "validation")  # the sets every stage is evaluated on, where the data has them


@dataclass
class _Pipeline:
    """What a staged run takes from the pipeline (which imports this module): the end of its build, its train
    phase (run once per stage) and the answer of a phase that a signal stopped."""

    begin: Callable
    train: Callable
    stopped: object


@dataclass
class Stage:
    index: int  # 0-based; its folder is stage-<index + 1>-<name>
    config: StageConfig
    recipe: Recipe  # the recipe this stage trains under: its data and training merged in, no stages
    args: Any  # its TrainingArguments (output_dir: its folder)
    folder: Path
    record: dict | None = None  # its results, once finished
    checkpoint: Path | None = None  # where it continues from (resume)
    trained_here: bool = False  # finished in this process: the model in memory holds its weights
    raw: Any = None  # its rows: train, eval and validation (canonical columns)
    tokenized: Any = None  # classification: the same, tokenised with the run's labels
    sets: Any = None  # every stage's eval (and validation) set, prepared by this stage's trainer

    @property
    def name(self) -> str:
        return self.config.name


def stage_recipe(recipe: Recipe, index: int, folder: Path) -> Recipe:
    """The recipe stage ``index`` trains under: the stage's data and training keys over the recipe's."""
    stage = recipe.stages[index]
    data = DataConfig.model_validate({**recipe.data.model_dump(), **stage.data})
    training = {**recipe.training, **stage.training, "output_dir": str(folder)}
    return recipe.model_copy(update={"data": data, "training": training, "stages": None, "resume": False,
                                     "overwrite": False})


def _settings(stage: Stage) -> dict:
    """What a finished stage's record must match for resume to skip it."""
    from tam_hf.finetune.resume import run_settings

    return json.loads(json.dumps({**run_settings(stage.recipe), "reset_optimizer": stage.config.reset_optimizer,
                                  "max_steps": stage.args.max_steps,
                                  "num_train_epochs": stage.args.num_train_epochs}, default=str))


# ------------------------------------------------------------------------------------------------- plan


def plan(run) -> None:
    """Every stage's TrainingArguments (their own checks, all stages' problems at once), then what the output
    directory holds: nothing of another run (or overwrite), or the stages to skip and where to continue."""
    from tam_hf.finetune.training_args import build_training_arguments

    recipe, problems = run.recipe, []
    for i, config in enumerate(recipe.stages):
        folder = run.output_dir / stage_folder(i, config.name)
        stage_of = stage_recipe(recipe, i, folder)
        try:
            args = build_training_arguments(stage_of)
        except RecipeError as exc:
            problems += [restage(p, i) for p in exc.problems]
            continue
        run.stages.append(Stage(i, config, stage_of, args, folder))
    if problems:
        raise RecipeError(problems, "recipe")
    run.plan = _resume_plan(run) if recipe.resume else plan_output_dir(run.output_dir, False, recipe.overwrite)


def _resume_plan(run) -> OutputPlan:
    from tam_hf.finetune.resume import resume_problems

    plan = OutputPlan(run.output_dir, manifest=Manifest.read(run.output_dir))
    current = next((s for s in run.stages if not _skip_finished(s)), None)
    if current is not None:
        complete, skipped = complete_checkpoints(current.folder)
        newest = int(CHECKPOINT.match(complete[0].name).group(1)) if complete else -1
        plan.stale = [p for p in sorted(current.folder.iterdir()) if CHECKPOINT.match(p.name) and p.is_dir()
                      and int(CHECKPOINT.match(p.name).group(1)) > newest] if current.folder.is_dir() else []
        plan.skipped = [s for s in skipped if any(s.startswith(p.name + ":") for p in plan.stale)]
        if complete:
            changed = resume_problems(current.recipe, complete[0])
            if changed:
                raise ResumeError(f"resume: {complete[0]} (stage {current.name}) was written with other settings: "
                                  f"{'; '.join(changed)}. Restore them to continue that run, or start a fresh run "
                                  "with overwrite: true (or another training.output_dir)")
            current.checkpoint = plan.checkpoint = complete[0]
        elif current.index == 0:
            raise CheckpointError(f"resume: true but {run.output_dir} holds no finished stage and no complete "
                                  f"checkpoint of stage {current.name}; start over with overwrite: true", exit_code=2)
        # Folders of later stages belong to an earlier attempt that ran past this point: they are trained again.
        plan.stale += [s.folder for s in run.stages[current.index + 1:] if s.folder.is_dir()]
    return plan


def _finished_marker(folder: Path) -> dict | None:
    """The completion record of the stage in ``folder`` when it is there and intact (every file it lists has the
    size it lists), else None."""
    try:
        marker = json.loads((folder / STAGE_MARKER).read_text())
        intact = all((folder / name).stat().st_size == size for name, size in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return marker if intact else None


def finished_stages(output_dir: Path, recipe: Recipe) -> list[Path]:
    """The folders of the stages, from the first on, that finished in an earlier attempt (completion record
    intact): the ones ``resume: true`` skips. Settings are not compared here: the resumed run checks them and
    names what differs."""
    done = []
    for i, config in enumerate(recipe.stages):
        folder = Path(output_dir) / stage_folder(i, config.name)
        if _finished_marker(folder) is None:
            break
        done.append(folder)
    return done


def resume_point(output_dir: Path, recipe: Recipe) -> str | None:
    """Where ``resume: true`` continues the staged run in ``output_dir``: "stage-2-b/checkpoint-30", "after
    stage-1-a" ("after" the last stage when every stage finished), or None when nothing there can be continued."""
    done = finished_stages(output_dir, recipe)
    if len(done) < len(recipe.stages):
        complete, _ = complete_checkpoints(Path(output_dir) / stage_folder(len(done), recipe.stages[len(done)].name))
        if complete:
            return f"{complete[0].parent.name}/{complete[0].name}"
    return f"after {done[-1].name}" if done else None


def _skip_finished(stage: Stage) -> bool:
    """Whether ``stage`` finished in an earlier attempt (its record intact); raises when it finished under other
    settings than the recipe's now."""
    marker = _finished_marker(stage.folder)
    if marker is None:
        return False
    now, then = _settings(stage), marker.get("settings") or {}
    changed = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
    if changed:
        raise ResumeError(f"resume: stage {stage.name} finished with other settings ({', '.join(changed)} differ); "
                          "restore them to continue that run, or start over with overwrite: true")
    stage.record = marker["record"]
    return True


# ------------------------------------------------------------------------------------------------ build


def build(pipeline: _Pipeline, run) -> Any:
    """The tokenizer, every stage's data (all checked before the model loads) and the one model they train."""
    from transformers import set_seed

    from tam_hf.finetune.model import load_model, load_tokenizer

    if not run.plan.clear:
        run.manifest = run.plan.apply()
    set_seed(run.args.seed)
    run.tokenizer = load_tokenizer(run.recipe.model)
    labels = _load_data(run)
    run.model = load_model(run.stages[0].recipe, run.tokenizer, labels)
    return pipeline.begin(run)


def _load_data(run) -> list[str] | None:
    """Every stage's rows; for classification tokenised with the labels of all stages together (one head for
    every stage). Returns those label names (None for causal LM and regression)."""
    from datasets import DatasetDict

    from tam_hf.finetune.data import check_rows, label_names, load_raw, tokenize_split

    for stage in run.stages:
        stage.raw = load_raw(stage.recipe.data)
    data = run.recipe.data
    if data.format != "classification":
        return None
    for stage in run.stages:
        check_rows(stage.raw, stage.recipe.data)
        label_names(stage.raw, stage.recipe.data)  # a missing label, named with its file and line
    names = label_names(DatasetDict({f"{s.index}-{split}": ds.select_columns(["label"]) for s in run.stages
                                     for split, ds in s.raw.items()}), data)
    label2id = {n: i for i, n in enumerate(names)} if names else None
    for stage in run.stages:
        stage.tokenized = {split: tokenize_split(ds, split, run.tokenizer, stage.recipe.data, label2id,
                                                 f"tokenising {stage.name} {split}") for split, ds in stage.raw.items()}
    return names


# ------------------------------------------------------------------------------------------------ train


def train(pipeline: _Pipeline, run) -> Any:
    """Each unfinished stage in turn; then the trainer of the last stage holds the final model."""
    run.summary["stages"] = [s.record for s in run.stages if s.record is not None]  # finished before a resume
    for stage in run.stages:
        if stage.record is not None:
            continue
        if run.stop.requested:
            return pipeline.stopped
        if _run_stage(pipeline, run, stage) is pipeline.stopped:
            return pipeline.stopped
    last = run.stages[-1]
    if not last.trained_here:  # every stage had finished before this attempt: load the last one's model
        run.stage = last
        run.trainer, last.sets = _stage_trainer(run, last, [*run.callbacks])
        _load_stage(run.trainer, last, state=True)
    run.steps_before = sum(s.record["steps"] for s in run.stages[:-1])


def _run_stage(pipeline: _Pipeline, run, stage: Stage) -> Any:
    from transformers import set_seed

    from tam_hf.finetune.guards import nonfinite_guard
    from tam_hf.finetune.outputs import completion_marker
    from tam_hf.finetune.resume import run_settings

    previous = run.stages[stage.index - 1] if stage.index else None
    run.stage, run.args, run.work_dir = stage, stage.args, stage.folder
    run.plan.checkpoint = stage.checkpoint
    run.steps_before = sum(s.record["steps"] for s in run.stages[:stage.index])
    run.summary["stage"] = stage.name
    run.write("train", lambda: stage.folder.mkdir(parents=True, exist_ok=True))  # the folder is this run's
    run.guard = nonfinite_guard(resumed_from=run.checkpoint)
    carry = []
    if previous is not None and stage.checkpoint is None and not stage.config.reset_optimizer:
        carry = [_carry_optimizer(previous.folder / OPTIMIZER_FILE)]
    # First the stop, then the carried state (a user's callback sees the state the stage starts from); the guard
    # comes last: it must see the save decisions of every callback before it.
    callbacks = [run.stop.callback(), *carry, *run.callbacks, completion_marker(run_settings(stage.recipe)),
                 run.guard]
    run.trainer, stage.sets = _stage_trainer(run, stage, callbacks)
    if previous is not None and stage.checkpoint is None and not previous.trained_here:
        _load_stage(run.trainer, previous)  # resumed at this stage's start: the previous stage's final model
    # Loading an adapter draws random numbers (peft initialises it first): every stage starts training from its
    # seed's state, whether the run went on or was resumed here (a checkpoint restores its own RNG states).
    set_seed(stage.args.seed)
    if pipeline.train(run) is pipeline.stopped:
        return pipeline.stopped
    run.stop.phase = "save"
    run.write("save", lambda: _save_stage(run, stage))
    run.stop.phase = "evaluate"
    evaluations, notes = _evaluate_stage(run, stage)
    s = run.summary
    stage.record = {"name": stage.name, "steps": run.trainer.state.global_step, "train_loss": s.get("train_loss"),
                    "train_loss_logged": s.get("train_loss_logged"), "mean_train_loss": s.get("mean_train_loss"),
                    "damping": s.get("damping"), **evaluations}
    if notes:
        stage.record["notes"] = notes
    _mark_finished(run, stage)
    stage.trained_here = True
    run.stop.phase = "train"
    run.stage = None
    s.pop("stage", None)
    s.update(stages=[x.record for x in run.stages if x.record is not None], steps=run.steps)
    write_summary(run.output_dir, s)


def _stage_trainer(run, stage: Stage, callbacks: list):
    """(trainer of ``stage`` over the run's model, {"eval/NAME" | "validation/NAME": prepared set} of every
    stage). The trainer evaluates on the stage's own eval set while training; the others after it."""
    by_key = {f"{split}/{s.name}": (s, split) for s in run.stages for split in SPLITS if split in s.raw}
    recipe, data = stage.recipe, stage.recipe.data
    if recipe.task == "sequence_classification":
        from tam_hf.finetune.data import collator
        from tam_hf.finetune.metrics import classification_metrics
        from tam_hf.trainer.tam_trainer import TAMTrainer

        metrics = classification_metrics(recipe.eval.metrics, regression=data.target == "score") \
            if recipe.eval.metrics else None
        trainer = TAMTrainer(model=run.model, args=stage.args, train_dataset=stage.tokenized["train"],
                             eval_dataset={k: s.tokenized[split] for k, (s, split) in by_key.items()},
                             data_collator=collator(recipe, run.tokenizer), processing_class=run.tokenizer,
                             compute_metrics=metrics, callbacks=callbacks)
    else:
        from tam_hf.finetune.sft import build_sft_trainer

        trainer = build_sft_trainer(
            run.model, run.tokenizer, stage.args, stage.raw["train"],
            {k: s.raw[split] for k, (s, split) in by_key.items()}, fmt=data.format, max_length=data.max_length,
            completion_only_loss=data.completion_only_loss, instruction_template=data.instruction_template,
            packing=data.packing, padding_free=data.padding_free, chat_template_path=data.chat_template_path,
            callbacks=callbacks)
    sets = dict(trainer.eval_dataset)
    trainer.eval_dataset, trainer.validation_dataset = sets[f"eval/{stage.name}"], None
    return trainer, sets


def _carry_optimizer(path: Path):
    """A TrainerCallback that loads the previous stage's optimizer state into this stage's optimizer as training
    starts (after the Trainer has built it over the same parameters). Only the per-parameter state is taken: the
    param groups' hyperparameters (lr and the schedule's initial_lr included) stay this stage's."""
    import torch
    from transformers import TrainerCallback

    class CarryOptimizer(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            saved = torch.load(path, map_location="cpu", weights_only=True)
            now = optimizer.state_dict()
            sizes = lambda d: [len(g["params"]) for g in d["param_groups"]]  # noqa: E731
            if sizes(saved) != sizes(now):
                raise RuntimeError(f"the optimizer state of the previous stage ({path}) holds parameter groups of "
                                   f"sizes {sizes(saved)}, this stage's optimizer {sizes(now)}: the trained "
                                   "parameters differ; set reset_optimizer: true for this stage")
            optimizer.load_state_dict({"state": saved["state"], "param_groups": now["param_groups"]})

    return CarryOptimizer()


def _load_stage(trainer, stage: Stage, state: bool = False) -> None:
    """The final model of a finished stage (full weights or the adapter) into ``trainer``'s model; with
    ``state`` its trainer state too (the run's summary reads the steps and the log from it)."""
    from transformers import TrainerState

    trainer._load_from_checkpoint(str(stage.folder))  # the Trainer's own loader: full models, adapters, shards
    if state:
        trainer.state = TrainerState.load_from_json(str(stage.folder / STATE_FILE))


def _save_stage(run, stage: Stage) -> None:
    """What the next stage (and a resumed run) starts from: the model and the optimizer state (the trainer state
    is saved after the stage's evaluations, by :func:`_mark_finished`)."""
    import torch

    trainer = run.trainer
    trainer.save_model(str(stage.folder))
    if trainer.args.should_save:
        torch.save(trainer.optimizer.state_dict(), stage.folder / OPTIMIZER_FILE)


def _evaluate_stage(run, stage: Stage) -> tuple[dict, list[str]]:
    """({"eval": {stage name: metrics}, "validation": {...}}, notes): the model after ``stage`` on every stage's
    sets, each with that stage's recipe (its generation prompts and answers)."""
    from tam_hf.finetune.evaluation import evaluate as evaluate_model

    trainer, own = run.trainer, run.trainer.eval_dataset
    out, notes = {}, []
    try:
        for other in run.stages:
            for split in SPLITS:
                key = f"{split}/{other.name}"
                if key in stage.sets:
                    # The validation sets through the trainer's validation_dataset: logged as validation_*, never
                    # mixed into the eval curve.
                    which = "validation_dataset" if split == "validation" else "eval_dataset"
                    setattr(trainer, which, stage.sets[key])
                    metrics, more = evaluate_model(other.recipe, trainer, run.tokenizer, other.raw[split],
                                                   split=split)
                    out.setdefault(split, {})[other.name] = metrics
                    notes += [f"{other.name} {split}: {n}" for n in more]
    finally:
        trainer.eval_dataset, trainer.validation_dataset = own, None
    return out, notes


def _mark_finished(run, stage: Stage) -> None:
    """The stage's trainer state (its log holds the evaluations after the stage: a resumed ``compare`` run reads
    it back), then its completion record, written last: its files (flushed, with their sizes), its settings and
    results. Resume skips a stage only when this record is intact."""
    if stage.args.should_save:
        run.trainer.state.save_to_json(str(stage.folder / STATE_FILE))
    files = {}
    for path in sorted(p for p in stage.folder.iterdir() if p.is_file() and p.name != STAGE_MARKER):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[path.name] = path.stat().st_size
    if stage.args.should_save:
        write_json(stage.folder / STAGE_MARKER, {"stage": stage.name, "index": stage.index, "files": files,
                                                 "settings": _settings(stage), "record": stage.record})


# --------------------------------------------------------------------------------------------- evaluate


def evaluate(run) -> None:
    """The run's numbers from the stages' evaluations: ``eval`` / ``validation`` = the final model's average over
    the stages' sets, ``continual`` on the recipe's first metric (eval loss when it has none)."""
    records, names = [s.record for s in run.stages], [s.name for s in run.stages]
    last = records[-1]
    metric = run.recipe.eval.metrics[0] if run.recipe.eval.metrics else "loss"
    better = higher_is_better(metric)
    matrix = [[(r.get("eval") or {}).get(n, {}).get(metric) for n in names] for r in records]
    s = run.summary
    s.update(stages=records, steps=sum(r["steps"] for r in records), train_loss=last["train_loss"],
             train_loss_logged=last["train_loss_logged"], mean_train_loss=last["mean_train_loss"],
             damping=last["damping"])
    s["continual"] = {"metric": metric, "higher_is_better": better, **continual_metrics(matrix, better),
                      "matrix": matrix}
    s["eval"] = mean_metrics([last["eval"][n] for n in names])
    validation = last.get("validation") or {}
    if validation:
        s["validation"] = mean_metrics([validation[n] for n in names if n in validation])
    notes = [n for r in records for n in r.get("notes", ())]
    if notes:
        s["notes"] = notes


def staged_phases(single: dict[str, Callable], begin: Callable, stopped: object) -> tuple:
    """The phases of a staged run: plan, build, train and evaluate of its own around the pipeline's ``single``
    phases (save, lm-eval, publish; its train runs once per stage)."""
    pipeline = _Pipeline(begin=begin, train=single["train"], stopped=stopped)
    return (("plan", plan), ("build", partial(build, pipeline)), ("train", partial(train, pipeline)),
            ("save", single["save"]), ("evaluate", evaluate), ("lm-eval", single["lm-eval"]),
            ("publish", single["publish"]))
