"""The ``run`` command: `tam-finetune RECIPE.yaml [key.path=value ...] [--validate] [--print-config] [--nproc N]`.

One recipe, one run: validate (every problem at once, nothing loaded), launch under torchrun / accelerate when
asked to, else train in this process and print the summary. :func:`run_recipe` returns the exit code:

* 0 done (or ``--validate`` found the recipe valid);
* 2 invalid recipe: every problem listed on stderr, nothing loaded;
* 1 data that does not fit the recipe;
* 130 (Ctrl-C) or 143 (SIGTERM), 128 + the signal as a shell reports a process stopped by it: interrupted. After
  the first signal the run saves a checkpoint at the end of the step, prints its summary and still exits with
  this code, so a scheduler or script sees that the work is not done; a second Ctrl-C aborts at once (130).

An error raised by the run ends in a message instead of a traceback when it carries its own ``exit_code``
(an ``int`` attribute; a ``summary`` dict attribute, when set, is printed first), or when :data:`RUN_ERRORS`
lists it. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from tam_hf.finetune.data import DataError
from tam_hf.finetune.launch import launch_command, launch_problems
from tam_hf.finetune.recipe import RecipeError, load_recipe, to_yaml

__all__ = ["run_recipe", "format_summary", "parser", "exit_for", "RUN_ERRORS"]

# Errors without an exit_code of their own -> (exit code, message on stderr). The first match wins.
RUN_ERRORS: list[tuple[type[BaseException], int, str]] = [
    (DataError, 1, "error: data does not fit the recipe: {exc}"),
    (RecipeError, 2, "error: {exc}"),  # a problem only the run could see (e.g. a model without a chat template)
    (KeyboardInterrupt, 130, "\naborted (second Ctrl-C): no checkpoint was written for the current step"),
]


def parser(prog: str = "tam-finetune") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune a Hugging Face model with Torque-Aware Momentum from a YAML recipe.",
        epilog="example: tam-finetune recipes/examples/demo_tiny.yaml training.max_steps=10 optimizer.lr=2e-3",
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="override a recipe value (read as YAML), e.g. finetune.lora.r=8")
    p.add_argument("--validate", action="store_true", help="check the recipe, print it resolved, load nothing")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe before training")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train on N processes (torchrun; with distributed.accelerate_config, accelerate launch's "
                        "--num_processes)")
    return p


def format_summary(s: dict) -> str:
    """The summary a finished (or interrupted) run prints: the numbers of ``summary.json`` for a reader."""
    lines = ["", "== tam-finetune summary =="]
    if s.get("interrupted"):
        lines.append(f"interrupted at step {s['steps']}; checkpoint: {s['checkpoint']}")
        lines.append("continue with: tam-finetune <recipe> resume=true")
    loss = s.get("train_loss")
    loss = f"{loss:.4f}" if isinstance(loss, (int, float)) else "n/a"
    lines.append(f"optimizer: {s.get('optimizer')}   steps: {s.get('steps')}   final train loss: {loss}")
    for key, value in (s.get("eval") or {}).items():
        shown = f"{value:.4f}" if isinstance(value, float) else "n/a" if value is None else value
        lines.append(f"eval {key}: {shown}")
    lines += [f"note: {note}" for note in s.get("notes") or []]
    d = s.get("damping")
    if d:
        lines.append(f"damping: mean {d['mean']:.3f}  min {d['min']:.3f}  max {d['max']:.3f}  "
                     f"below 0.5: {d['frac_below_half']:.0%} of tensors")
    if s.get("lm_eval_table"):
        lines += [f"lm-eval ({s.get('lm_eval_results')}):", s["lm_eval_table"].rstrip()]
    elif s.get("lm_eval_skipped"):
        lines.append(f"lm-eval skipped: {s['lm_eval_skipped']}")
    elif s.get("lm_eval_error"):
        lines.append("lm-eval failed (see the error below)")
    if "wall_s" in s:
        lines.append(f"wall time: {s['wall_s']:.1f} s")
    lines.append(f"outputs: {s.get('output_dir')} (model, recipe.yaml, summary.json, checkpoints)")
    if "hub_folder" in s:
        lines.append(f"hub upload folder: {s['hub_folder']}")
    if "hub" in s:
        lines.append(f"hub: {s['hub']}")
    return "\n".join(lines)


def run_recipe(argv: list[str], prog: str = "tam-finetune") -> int:
    """Parse the run command's arguments, validate, launch or train; returns the exit code."""
    args = parser(prog).parse_intermixed_args(argv)  # flags may come before or after the overrides
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        from tam_hf.finetune.runner import build_training_arguments

        build_training_arguments(recipe)  # TrainingArguments' own checks, still before any loading
        problems = launch_problems(recipe, args.nproc)
        if problems:
            raise RecipeError(problems, args.recipe)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.validate or args.print_config:
        print(to_yaml(recipe), end="")
    if args.validate:
        print(f"# {args.recipe}: valid", file=sys.stderr)
        return 0

    command = launch_command(recipe, args.recipe, args.overrides, args.nproc,
                             ["--print-config"] if args.print_config else [])
    if command is not None:  # this process only starts the launcher; each launched process trains
        print("+ " + " ".join(command), file=sys.stderr)
        return subprocess.run(command).returncode

    from tam_hf.finetune.runner import finetune

    try:
        summary = finetune(recipe)
    except BaseException as exc:  # what exit_for does not recognise is re-raised with its traceback
        answer = exit_for(exc)
        if answer is None:
            raise
        _leave_process_group(finished=False)
        code, message = answer
        if isinstance(getattr(exc, "summary", None), dict) and _first_process():
            print(format_summary(exc.summary))
        print(message, file=sys.stderr)
        return code
    _leave_process_group(finished=True)
    if _first_process():  # launched runs: one summary, from the first process
        print(format_summary(summary))
    if summary.get("interrupted"):
        return 128 + int(getattr(signal, str(summary.get("signal") or "SIGINT"), signal.SIGINT))
    return 0


def _leave_process_group(finished: bool) -> None:
    """A launched process leaves its process group before it exits (after a barrier when the run finished on every
    rank): a gloo group left for the interpreter to tear down can abort a rank (SIGABRT, "terminate called without
    an active exception") after the work is done, and the launcher then reports the run as failed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def _first_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def exit_for(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, message) for an error the user can act on; None for a bug."""
    for kind, code, message in RUN_ERRORS:
        if isinstance(exc, kind):
            return code, message.format(exc=exc)
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int) and not isinstance(code, bool):
        return code, f"error: {exc}"
    return None
