"""``tam-finetune RECIPE.yaml [key.path=value ...] [--validate] [--print-config] [--nproc N] [--verbose]``.

One recipe, one run: validate (every problem at once, nothing loaded), launch under torchrun / accelerate when
asked to, else run :func:`tam_hf.finetune.pipeline.finetune` in this process and print the summary. Exit codes:

* 0 done (or ``--validate`` found the recipe valid);
* 2 the recipe or the output directory is wrong: every problem listed on stderr, nothing loaded;
* 1 the run started and failed (its data, a write, divergence, lm-eval, the push): one line, and the summary;
* 128 + the signal's number (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP): interrupted. After the first signal the run
  finishes the phase in progress (during training: the step, then a checkpoint), prints its summary and still
  exits with this code, so a scheduler or script sees that the work is not done; a second signal aborts at once.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from tam_hf.commands import report
from tam_hf.finetune.errors import RecipeError
from tam_hf.finetune.launch import launch_command, launch_problems, rank

__all__ = ["main", "parser", "format_summary"]


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
    p.add_argument("--verbose", action="store_true",
                   help="show the third-party notices and progress bars that are held back by default")
    return p


def format_summary(s: dict) -> str:
    """The summary a finished (or interrupted) run prints: the numbers of ``summary.json`` for a reader."""
    lines = ["", "== tam-finetune summary =="]
    if s.get("interrupted"):
        lines.append(f"interrupted ({s.get('signal')}) in the {s.get('phase', 'train')} phase: {s.get('kept')}")
        lines.append("continue with: tam-finetune <recipe> resume=true")
    loss = s.get("train_loss")
    if not isinstance(loss, (int, float)):
        shown = "train loss: n/a"
    elif s.get("train_loss_logged", True):
        shown = f"final train loss: {loss:.4f}"
    else:
        shown = f"mean train loss: {loss:.4f} (no step was logged)"
    lines.append(f"optimizer: {s.get('optimizer')}   steps: {s.get('steps')}   {shown}")
    for split in ("eval", "validation"):
        for key, value in (s.get(split) or {}).items():
            value = f"{value:.4f}" if isinstance(value, float) else "n/a" if value is None else value
            lines.append(f"{split} {key}: {value}")
    c = s.get("continual")
    if c:  # a staged run: eval above is the final model's average over the stages
        shown = lambda v, sign="": "n/a" if v is None else f"{v:{sign}.4f}"  # noqa: E731
        lines.append(f"stages: {', '.join(x['name'] for x in s.get('stages') or [])}; on {c['metric']}: final "
                     f"average {shown(c['final_average'])}, forgetting {shown(c['forgetting'], '+')}, backward "
                     f"transfer {shown(c['backward_transfer'], '+')} (summary.json: stages, continual)")
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
    if s.get("status") == "failed":  # what it kept is in the error below
        lines.append(f"outputs: {s.get('output_dir')} (summary.json; the run failed in its {s.get('phase')} phase)")
    else:
        lines.append(f"outputs: {s.get('output_dir')} (model, recipe.yaml, summary.json, checkpoints)")
    if "hub_folder" in s:
        lines.append(f"hub upload folder: {s['hub_folder']}")
    if "hub" in s:
        lines.append(f"hub: {s['hub']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "tam-finetune") -> int:
    """Parse the run command's arguments, validate, launch or train; returns the exit code."""
    args = parser(prog).parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    from tam_hf.finetune.config.load import load_recipe, to_yaml  # pydantic: not for --help

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        problems = launch_problems(recipe, args.nproc)
        if problems:
            raise RecipeError(problems, args.recipe)
    except RecipeError as exc:
        return report(exc)
    if args.validate or args.print_config:
        print(to_yaml(recipe), end="")
    if args.validate:
        print(f"# {args.recipe}: valid (TrainingArguments' own cross-field checks run when training starts, "
              "before anything loads)", file=sys.stderr)
        return 0

    from tam_hf.finetune import pipeline
    from tam_hf.finetune.training_args import build_training_arguments
    from tam_hf.trainer import quiet

    quiet.install(verbose=args.verbose)
    try:
        build_training_arguments(recipe)  # their own checks, before a launcher starts processes
    except RecipeError as exc:
        return report(exc)
    command = launch_command(recipe, args.recipe, args.overrides, args.nproc,
                             ["--print-config"] if args.print_config else [])
    if command is not None:  # this process only starts the launcher; each launched process trains
        print("+ " + " ".join(command), file=sys.stderr)
        return subprocess.run(command).returncode
    try:
        summary = pipeline.finetune(recipe)
    except BaseException as exc:  # what report() does not recognise is a bug: re-raised with its traceback
        _leave_process_group(finished=False)
        if isinstance(getattr(exc, "summary", None), dict) and rank() == 0:
            print(format_summary(exc.summary))
        code = report(exc)
        if code is None:
            raise
        return code
    _leave_process_group(finished=True)
    if rank() == 0:  # launched runs: one summary, from the first process
        print(format_summary(summary))
        if not args.verbose and quiet.held():
            print(f"note: {len(quiet.held())} third-party notice(s) or progress bar(s) held back (--verbose shows "
                  "them)", file=sys.stderr)
    if summary.get("interrupted"):
        import signal

        return 128 + int(getattr(signal, str(summary.get("signal") or "SIGINT"), signal.SIGINT))
    return 0


def _leave_process_group(finished: bool) -> None:
    """A launched process leaves its process group before it exits (after a barrier when the run finished on every
    rank): a gloo group left for the interpreter to tear down can abort a rank (SIGABRT, "terminate called without
    an active exception") after the work is done, and the launcher then reports the run as failed."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()

