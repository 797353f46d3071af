"""One fine-tuning run from a validated recipe: tokenizer → data → model → trainer → train → save → evaluate →
lm-eval → optional push. The CLI (tam_hf.cli) is a thin layer over :func:`finetune`.

Causal-LM recipes train on TRL's ``SFTTrainer`` (:func:`tam_hf.finetune.sft.build_sft_trainer`: TRL tokenises,
masks the prompt, packs); sequence classification on :class:`~tam_hf.trainer.tam_trainer.TAMTrainer` with the
rows tokenised in :mod:`tam_hf.finetune.data`.

The optimizer is chosen the way a stock HF script chooses it, through ``TrainingArguments.optim`` (made valid
for tam/adatam/adatamw by ``tam_hf.trainer.register()``), so the Trainer builds the param groups (no weight decay on
biases and norms) and a checkpoint resumes with the same optimizer.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path


from tam_hf.finetune.recipe import Recipe, RecipeError, rerun_yaml, resolve_path

__all__ = ["finetune", "training_arguments", "build_training_arguments", "GracefulStop"]

# Constructor keys transformers' own optimizers (adamw_torch, sgd) read from TrainingArguments fields; the rest
# travel in optim_args. TAM optimizers follow the registry's mapping (OptimizerSpec.training_args_keys).
_HF_FIELDS = {"lr": ("learning_rate",), "weight_decay": ("weight_decay",), "eps": ("adam_epsilon",),
              "betas": ("adam_beta1", "adam_beta2")}


def training_arguments(recipe: Recipe) -> dict:
    """TrainingArguments keyword arguments: the recipe's `training` section plus the optimizer mapped onto
    optim / learning_rate / weight_decay / adam_* / optim_args."""
    kwargs = dict(recipe.training)
    opt = recipe.optimizer
    from tam_hf.optim.registry import get as optimizer_spec

    spec = optimizer_spec(opt.name)
    kwargs["optim"] = spec.optim
    fed = spec.training_args_keys() if spec.torque else _HF_FIELDS
    extra = {}
    for key, value in opt.kwargs().items():
        if key in fed:
            kwargs.update(zip(fed[key], value if len(fed[key]) > 1 else (value,)))
        else:
            extra[key] = value
    if extra:
        kwargs["optim_args"] = ",".join(f"{k}={v}" for k, v in extra.items())
    if recipe.distributed is not None and recipe.distributed.deepspeed:
        kwargs["deepspeed"] = str(resolve_path(recipe.distributed.deepspeed))
    kwargs.setdefault("seed", 42)
    if "dataloader_pin_memory" not in kwargs:
        import torch

        # Pinned host memory only helps copies to an accelerator; without one torch warns on every dataloader.
        kwargs["dataloader_pin_memory"] = torch.cuda.is_available() or torch.xpu.is_available()
    return kwargs


def build_training_arguments(recipe: Recipe):
    """TrainingArguments for the recipe. Its own consistency checks (__post_init__) run here, before anything
    is loaded, and come back as a RecipeError like every other recipe problem."""
    from transformers import TrainingArguments

    from tam_hf.trainer.register import register

    register()  # makes optim="tam|adatam|adatamw" valid TrainingArguments values
    try:
        return TrainingArguments(**training_arguments(recipe))
    except (ValueError, TypeError) as exc:
        raise RecipeError([f"training: {exc}".replace("\n", " ")], "recipe") from None


class GracefulStop:
    """First Ctrl-C (SIGINT) or SIGTERM (what a scheduler sends before preempting a job): finish the current
    step, save a checkpoint, stop; resume with `resume: true`. A second signal interrupts at once
    (KeyboardInterrupt); the runner then removes the checkpoint it was writing, if any.

    In a launched run the ranks agree on the step to stop at (a one-element all-reduce per step), since a
    signal reaches each process at a slightly different point of its step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        what = "Ctrl-C" if signum == signal.SIGINT else self.signal_name
        again = "press Ctrl-C again" if signum == signal.SIGINT else f"send {self.signal_name} again"
        print(f"\n{what}: saving a checkpoint after this step, then stopping ({again} to abort without saving)",
              file=sys.stderr, flush=True)

    def callback(self):
        from transformers import TrainerCallback

        stop = self

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                import torch
                import torch.distributed as dist

                if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                    flag = torch.tensor([1.0 if stop.requested else 0.0], device=args.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    if flag.item() > 0 and not stop.requested:
                        stop.requested, stop.signal_name = True, stop.signal_name or "SIGTERM"
                if stop.requested:
                    control.should_save = True
                    control.should_training_stop = True

        return _Stop()


def _damping(optimizer) -> dict | None:
    from tam_hf.trainer.distributed import find_torque_optimizer

    tam = find_torque_optimizer(optimizer)[0] if optimizer is not None else None
    return tam.damping_summary() if tam is not None else None


def _generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    import torch

    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues at the right edge
    answers = []
    try:
        model.eval()
        for start in range(0, len(prompts), 16):
            batch = tokenizer(prompts[start:start + 16], return_tensors="pt", padding=True).to(model.device)
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def _generated(recipe, model, tokenizer, raw_eval) -> tuple[list[str], list[str]]:
    """(answers generated greedily for the first eval.max_generate_samples evaluation prompts, their references)."""
    from tam_hf.finetune.data import prompt_and_answer

    rows = raw_eval.select(range(min(len(raw_eval), recipe.eval.max_generate_samples)))
    pairs = [prompt_and_answer(row, recipe.data) for row in rows]
    answers = _generate_answers(model, tokenizer, [p for p, _ in pairs], recipe.eval.max_new_tokens)
    return answers, [ref for _, ref in pairs]


def _answer_texts(recipe, answers: list[str]) -> list[str]:
    """The part of each generation that is the answer: all of it with an answer_pattern (the pattern finds the
    answer in it), else the first line (a model that learned to stop emits EOS; what follows is not the answer)."""
    return answers if recipe.eval.answer_pattern is not None else [a.split("\n")[0] for a in answers]


def _exact_match(recipe, answers: list[str], references: list[str]) -> float:
    from tam_hf.finetune.metrics import exact_match

    # With a pattern (GSM8K: the number after '####' in a worked solution) both sides are reduced to it.
    return exact_match(_answer_texts(recipe, answers), references, recipe.eval.answer_pattern)


def _evaluate(recipe: Recipe, trainer, tokenizer, raw_eval) -> tuple[dict, list[str]]:
    """(eval metrics, notes): the trainer's loss and metrics, perplexity from the loss, and the generated metrics
    (exact_match, evaluate metrics on causal LM). A perplexity beyond float range is null, with a note."""
    from tam_hf.finetune.hf_metrics import BUILTIN, is_metric_key, text_metrics
    from tam_hf.finetune.metrics import perplexity

    names = recipe.eval.metrics
    metrics = {k.removeprefix("eval_"): v for k, v in trainer.evaluate().items()
               if k.removeprefix("eval_") == "loss" or is_metric_key(k.removeprefix("eval_"), names)}
    notes = []
    if "perplexity" in names:
        metrics["perplexity"] = perplexity(metrics["loss"])
        if metrics["perplexity"] is None:
            notes.append(f"eval perplexity is null: exp(eval loss {metrics['loss']:.4g}) is beyond float range")
    generated = [n for n in names if n == "exact_match" or n not in BUILTIN]
    if recipe.task == "causal_lm" and generated:
        answers, references = _generated(recipe, trainer.model, tokenizer, raw_eval)
        if "exact_match" in names:
            metrics["exact_match"] = _exact_match(recipe, answers, references)
        metrics.update(text_metrics(names, _answer_texts(recipe, answers), references))
    return metrics, notes


def save_resolved(recipe: Recipe, output_dir: Path) -> Path:
    """<output_dir>/recipe.yaml: the recipe with every default filled in, a valid recipe of its own, without
    ``resume`` and ``overwrite`` (its "rerun with" line must neither continue this run nor wipe it: rerun into the
    same directory, it is refused with both ways named)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "recipe.yaml"
    path.write_text("# resolved recipe (defaults filled in); rerun with: tam-finetune " + str(path) + "\n"
                    + rerun_yaml(recipe))
    return path


def _resume_target(recipe: Recipe):
    return str(resolve_path(recipe.resume)) if isinstance(recipe.resume, str) else bool(recipe.resume)


def finetune(recipe: Recipe, callbacks: list = ()) -> dict:
    """Train, save, evaluate and (when asked) push; returns the summary the CLI prints (also saved as
    summary.json in the output directory, with ``status`` completed or interrupted).

    Failures raise a :class:`~tam_hf.finetune.errors.FinetuneError` carrying the exit code (and, once the run
    has started, the summary written with ``status: failed``): the output directory refused or locked (2,
    nothing loaded), no complete checkpoint to resume (2), data that does not fit (1), the Hub needed while
    offline (1), non-finite training (1), a checkpoint that cannot be loaded (1), lm-eval failing on the saved
    model (1, status completed with ``lm_eval_error``; the Hub step still runs), a failed push (1, after
    everything was saved locally). A second Ctrl-C raises KeyboardInterrupt after removing the half-written
    checkpoint, if any."""
    from tam_hf.finetune.outputs import plan_output_dir, run_lock

    started = time.time()
    args = build_training_arguments(recipe)
    output_dir = Path(args.output_dir)
    with run_lock(output_dir):  # a concurrent run into the same directory stops here (rank 0 holds it)
        plan = plan_output_dir(output_dir, _resume_target(recipe), recipe.overwrite)
        return _train(recipe, args, plan, started, callbacks)


def _build_trainer(recipe: Recipe, args, tokenizer, callbacks: list):
    """(trainer, raw DatasetDict): TRL's SFTTrainer for causal LM, TAMTrainer for sequence classification. Loads
    the data (rows checked) and the model; raises DataError for data that cannot be trained on."""
    from tam_hf.finetune.model import load_model

    d = recipe.data
    if recipe.task == "sequence_classification":
        from tam_hf.finetune.data import build_datasets, collator
        from tam_hf.finetune.hf_metrics import classification_metrics
        from tam_hf.trainer.tam_trainer import TAMTrainer

        train_ds, eval_ds, raw, label_names = build_datasets(recipe, tokenizer)
        model = load_model(recipe, tokenizer, label_names)
        compute_metrics = None
        if eval_ds is not None and recipe.eval.metrics:
            compute_metrics = classification_metrics(recipe.eval.metrics, regression=d.target == "score")
        trainer = TAMTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             data_collator=collator(recipe, tokenizer), processing_class=tokenizer,
                             compute_metrics=compute_metrics, callbacks=callbacks)
        return trainer, raw
    from tam_hf.finetune.data import load_raw
    from tam_hf.finetune.sft import build_sft_trainer

    raw = load_raw(d)
    model = load_model(recipe, tokenizer)
    trainer = build_sft_trainer(
        model, tokenizer, args, raw["train"], raw.get("eval"), fmt=d.format, max_length=d.max_length,
        completion_only_loss=d.completion_only_loss, instruction_template=d.instruction_template, packing=d.packing,
        padding_free=d.padding_free,
        chat_template_path=str(resolve_path(d.chat_template_path)) if d.chat_template_path else None,
        callbacks=callbacks)
    return trainer, raw


def _lm_eval(recipe: Recipe, trainer, tokenizer, output_dir: Path, summary: dict) -> str | None:
    """eval.lm_eval on the trained model, into the summary (``lm_eval`` per task, ``lm_eval_table``); the error
    message when lm-eval failed (``lm_eval_error``), else None. Skipped, with a note, in a launched run: lm-eval
    runs one process, and the ranks hold the model (or its shards) apart."""
    from tam_hf.finetune.lm_eval import LMEvalError, run_lm_eval

    cfg = recipe.eval.lm_eval
    if trainer.args.world_size > 1:
        summary["lm_eval_skipped"] = (f"lm-eval runs in one process, this run had {trainer.args.world_size}: "
                                      f"evaluate the saved model with: tam-finetune eval {output_dir}")
        return None
    limit = cfg.limit if cfg.limit is None or cfg.limit < 1 else int(cfg.limit)
    try:
        out = run_lm_eval(trainer.model, tokenizer, cfg.tasks, output_dir, num_fewshot=cfg.num_fewshot, limit=limit,
                          batch_size=cfg.batch_size, saved_at=str(output_dir))
    except LMEvalError as exc:
        summary["lm_eval_error"] = str(exc)
        return str(exc)
    summary.update(lm_eval=out["tasks"], lm_eval_table=out["table"], lm_eval_results=out["results_file"])
    return None


def _train(recipe: Recipe, args, plan, started: float, callbacks) -> dict:
    from transformers import set_seed

    import tam_hf
    from tam_hf.finetune.errors import CheckpointError, EvaluationError, NonFiniteError, PushError
    from tam_hf.finetune.guards import nonfinite_guard
    from tam_hf.finetune.model import load_tokenizer
    from tam_hf.finetune.outputs import complete_checkpoints, completion_marker, rank, write_summary

    output_dir = plan.output_dir
    set_seed(args.seed)
    tokenizer = load_tokenizer(recipe.model)
    stop = GracefulStop()
    checkpoint = str(plan.checkpoint) if plan.checkpoint is not None else None
    guard = nonfinite_guard(resumed_from=checkpoint)
    # The guard comes last: it must see the save decisions of every callback before it.
    trainer, raw = _build_trainer(recipe, args, tokenizer, [stop.callback(), *callbacks, completion_marker(), guard])
    plan.apply()  # loading worked: now remove what overwrite / resume must not find
    if plan.skipped and rank() == 0:
        print(f"resume: skipped incomplete checkpoint(s), removed: {'; '.join(plan.skipped)}", file=sys.stderr)
    save_resolved(recipe, output_dir)
    summary = {"status": "running", "output_dir": str(output_dir), "optimizer": recipe.optimizer.name,
               "tam_hf_version": tam_hf.__version__}
    if checkpoint is not None:
        summary.update(resumed_from=checkpoint, skipped_checkpoints=plan.skipped)

    def fail(reason: str) -> dict:
        good, _ = complete_checkpoints(output_dir)
        summary.update(status="failed", reason=reason, steps=trainer.state.global_step,
                       last_complete_checkpoint=str(good[0]) if good else None,
                       wall_s=round(time.time() - started, 1))
        write_summary(output_dir, summary)
        return summary

    try:
        with stop:
            result = trainer.train(resume_from_checkpoint=checkpoint)
            if not stop.requested:
                guard.check_weights(trainer.model, trainer.state.global_step)
    except NonFiniteError as exc:
        reason = f"training diverged: {exc}"
        summary["diverged_at_step"] = exc.step
        failed = fail(reason)
        last = failed["last_complete_checkpoint"]
        raise NonFiniteError(f"{reason}. Nothing was saved for the diverged state; "
                             + (f"the last complete checkpoint is {last}. " if last else "no checkpoint was kept. ")
                             + "Lower optimizer.lr (or check the data) and start over with overwrite: true",
                             failed, step=exc.step) from None
    except KeyboardInterrupt:
        removed = _remove_unfinished_checkpoints(output_dir)
        fail("aborted by a second interrupt" + (f"; removed the half-written {', '.join(removed)}" if removed else ""))
        raise
    except Exception as exc:
        if checkpoint is None or guard.started:
            raise
        # Loading the checkpoint happens inside train(), before the first callback of training.
        cause = str(exc).splitlines()[0] if str(exc) else ""
        reason = f"could not resume from {checkpoint}: {type(exc).__name__}: {cause}"
        raise CheckpointError(f"{reason}. The files are damaged or were written by a different recipe "
                              "(model, LoRA, optimizer); resume from an earlier complete checkpoint (resume: PATH) "
                              "or start over with overwrite: true", summary=fail(reason)) from exc

    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary.update(
        train_loss=logged[-1] if logged else result.training_loss,  # the last logged loss, not the run's mean
        mean_train_loss=result.training_loss,
        steps=trainer.state.global_step,
        damping=_damping(trainer.optimizer),
    )
    if stop.requested:
        summary.update(status="interrupted", interrupted=True, signal=stop.signal_name or "SIGINT",
                       checkpoint=str(output_dir / f"checkpoint-{trainer.state.global_step}"),
                       wall_s=round(time.time() - started, 1))
        write_summary(output_dir, summary)
        return summary
    trainer.save_model(str(output_dir))  # the adapter (lora/qlora) or the whole model, with the tokenizer
    metrics, notes = {}, []
    if trainer.eval_dataset is not None:
        metrics, notes = _evaluate(recipe, trainer, tokenizer, raw.get("eval"))
    summary.update(status="completed", eval=metrics)
    if notes:
        summary["notes"] = notes
    lm_eval_error = _lm_eval(recipe, trainer, tokenizer, output_dir, summary) if recipe.eval.lm_eval else None
    pushed = True
    if recipe.hub.push or recipe.hub.repo_id:
        from tam_hf.finetune.hub import prepare_upload, push

        folder = prepare_upload(trainer.model, tokenizer, recipe, summary, output_dir)
        summary["hub_folder"] = str(folder)
        if recipe.hub.push:
            pushed, summary["hub"] = push(folder, recipe.hub.repo_id, recipe.hub.private)
    summary["wall_s"] = round(time.time() - started, 1)
    write_summary(output_dir, summary)
    if lm_eval_error is not None:  # the Hub step above still ran: nothing the run made is lost
        raise EvaluationError(lm_eval_error + ("" if pushed else f". The push failed too: {summary['hub']}; retry it "
                                               f"with: tam-finetune push {output_dir}"), summary)
    if not pushed:
        raise PushError(f"{summary['hub']}. The run itself is complete and saved in {output_dir}; retry the "
                        f"push alone with: tam-finetune push {output_dir}", summary)
    return summary


def _remove_unfinished_checkpoints(output_dir: Path) -> list[str]:
    """After a second Ctrl-C: a checkpoint cut short in the middle of its save is removed, never left behind
    looking like a checkpoint (resume would skip it anyway). Returns the names removed."""
    from tam_hf.finetune.outputs import CHECKPOINT, checkpoint_problem, rank, remove_checkpoint

    if rank() != 0 or not output_dir.is_dir():
        return []
    removed = []
    for path in sorted(output_dir.iterdir()):
        if CHECKPOINT.match(path.name) and path.is_dir() and checkpoint_problem(path) is not None:
            remove_checkpoint(path)
            removed.append(path.name)
            print(f"removed the half-written {path.name}", file=sys.stderr)
    return removed
