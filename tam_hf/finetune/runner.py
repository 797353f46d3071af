"""One fine-tuning run from a validated recipe: tokenizer → data → model → TrainingArguments → TAMTrainer →
save → evaluate → optional push. The CLI (tam_hf.cli) is a thin layer over :func:`finetune`.

The optimizer is chosen the way a stock HF script chooses it, through ``TrainingArguments.optim`` (made valid
for tam/adatam/adatamw by ``tam_hf.trainer.register()``), so the Trainer builds the param groups (no weight decay on
biases and norms) and a checkpoint resumes with the same optimizer.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from pathlib import Path


from tam_hf.finetune.recipe import Recipe, RecipeError, resolve_path, to_yaml

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
    """First Ctrl-C: finish the current step, save a checkpoint, stop (resume with `resume: true`).
    A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: saving a checkpoint after this step (press again to abort without saving)", flush=True)

    def callback(self):
        from transformers import TrainerCallback

        stop = self

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if stop.requested:
                    control.should_save = True
                    control.should_training_stop = True

        return _Stop()


def _damping(optimizer) -> dict | None:
    for _ in range(8):  # unwrap accelerate / DeepSpeed wrappers
        if optimizer is None or hasattr(optimizer, "damping_summary"):
            break
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer.damping_summary() if hasattr(optimizer, "damping_summary") else None


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


def _exact_match(recipe, model, tokenizer, raw_eval) -> float:
    from tam_hf.finetune.data import prompt_and_answer
    from tam_hf.finetune.metrics import exact_match

    rows = raw_eval.select(range(min(len(raw_eval), recipe.eval.max_generate_samples)))
    pairs = [prompt_and_answer(row, recipe.data) for row in rows]
    answers = _generate_answers(model, tokenizer, [p for p, _ in pairs], recipe.eval.max_new_tokens)
    references = [ref for _, ref in pairs]
    if recipe.eval.answer_pattern is not None:  # e.g. GSM8K: the number after '####' in a worked solution
        return exact_match(answers, references, recipe.eval.answer_pattern)
    # A model that learned to stop emits EOS; anything after the first line is not part of the answer.
    return exact_match([a.split("\n")[0] for a in answers], references)


def save_resolved(recipe: Recipe, output_dir: Path) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "recipe.yaml"
    path.write_text("# resolved recipe (defaults filled in); rerun with: tam-finetune " + str(path) + "\n"
                    + to_yaml(recipe))
    return path


def finetune(recipe: Recipe, callbacks: list = ()) -> dict:
    """Train, save, evaluate and (when asked) push; returns the summary the CLI prints (also saved as
    summary.json in the output directory)."""
    from transformers import set_seed

    import tam_hf
    from tam_hf.finetune.data import build_datasets, collator
    from tam_hf.finetune.metrics import classification_metrics, perplexity
    from tam_hf.finetune.model import load_model, load_tokenizer
    from tam_hf.trainer.tam_trainer import TAMTrainer

    started = time.time()
    args = build_training_arguments(recipe)
    output_dir = Path(args.output_dir)
    set_seed(args.seed)
    tokenizer = load_tokenizer(recipe.model)
    train_ds, eval_ds, raw, label_names = build_datasets(recipe, tokenizer)
    model = load_model(recipe, tokenizer, label_names)
    compute_metrics = None
    if recipe.task == "sequence_classification" and eval_ds is not None:
        compute_metrics = classification_metrics(recipe.eval.metrics, regression=recipe.data.target == "score")
    stop = GracefulStop()
    trainer = TAMTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         data_collator=collator(recipe, tokenizer), processing_class=tokenizer,
                         compute_metrics=compute_metrics, callbacks=[stop.callback(), *callbacks])
    save_resolved(recipe, output_dir)
    resume = str(resolve_path(recipe.resume)) if isinstance(recipe.resume, str) else (recipe.resume or None)
    with stop:
        result = trainer.train(resume_from_checkpoint=resume)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {
        "output_dir": str(output_dir),
        "train_loss": logged[-1] if logged else result.training_loss,  # the last logged loss, not the run's mean
        "mean_train_loss": result.training_loss,
        "steps": trainer.state.global_step,
        "damping": _damping(trainer.optimizer),
        "optimizer": recipe.optimizer.name,
        "tam_hf_version": tam_hf.__version__,
    }
    if stop.requested:
        summary.update(interrupted=True, checkpoint=str(output_dir / f"checkpoint-{trainer.state.global_step}"))
        summary["wall_s"] = round(time.time() - started, 1)
        return summary
    trainer.save_model(str(output_dir))  # the adapter (lora/qlora) or the whole model, with the tokenizer
    metrics = {}
    if eval_ds is not None:
        metrics = {k.removeprefix("eval_"): v for k, v in trainer.evaluate().items()
                   if k.removeprefix("eval_") in ("loss", *recipe.eval.metrics)}
        if "perplexity" in recipe.eval.metrics:
            metrics["perplexity"] = perplexity(metrics["loss"])
        if "exact_match" in recipe.eval.metrics:
            metrics["exact_match"] = _exact_match(recipe, trainer.model, tokenizer, raw["eval"])
    summary["eval"] = metrics
    summary["wall_s"] = round(time.time() - started, 1)
    if recipe.hub.push or recipe.hub.repo_id:
        from tam_hf.finetune.hub import prepare_upload, push

        folder = prepare_upload(trainer.model, tokenizer, recipe, summary, output_dir)
        summary["hub_folder"] = str(folder)
        if recipe.hub.push:
            summary["hub"] = push(folder, recipe.hub.repo_id, recipe.hub.private)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    return summary


def _json_default(value):
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)
