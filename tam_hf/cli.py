"""`tam-finetune RECIPE.yaml [key.path=value ...] [--validate] [--print-config]`, and
`tam-finetune compare RECIPE.yaml --optimizers adamw,adatamw --seeds 3` (see :mod:`tam_hf.compare.study`).

Exit codes: 0 done, 2 invalid recipe (every problem listed on stderr, nothing loaded), 1 data that does not
fit the recipe, 130 interrupted before a checkpoint could be saved.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


from tam_hf.finetune.launch import launch_command, launch_problems
from tam_hf.finetune.recipe import RecipeError, load_recipe, to_yaml

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tam-finetune",
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


def _format_summary(s: dict) -> str:
    lines = ["", "== tam-finetune summary =="]
    if s.get("interrupted"):
        lines.append(f"interrupted at step {s['steps']}; checkpoint: {s['checkpoint']}")
        lines.append("continue with: tam-finetune <recipe> resume=true")
    lines.append(f"optimizer: {s['optimizer']}   steps: {s['steps']}   final train loss: {s['train_loss']:.4f}")
    for key, value in (s.get("eval") or {}).items():
        lines.append(f"eval {key}: {value:.4f}" if isinstance(value, float) else f"eval {key}: {value}")
    d = s.get("damping")
    if d:
        lines.append(f"damping: mean {d['mean']:.3f}  min {d['min']:.3f}  max {d['max']:.3f}  "
                     f"below 0.5: {d['frac_below_half']:.0%} of tensors")
    lines.append(f"wall time: {s['wall_s']:.1f} s")
    lines.append(f"outputs: {s['output_dir']} (model, recipe.yaml, summary.json, checkpoints)")
    if "hub_folder" in s:
        lines.append(f"hub upload folder: {s['hub_folder']}")
    if "hub" in s:
        lines.append(f"hub: {s['hub']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:  # tam-finetune compare RECIPE --optimizers ... (see tam_hf/compare.py)
        from tam_hf.compare.study import main as compare_main

        return compare_main(argv[1:])
    args = _parser().parse_intermixed_args(argv)  # flags may come before or after the overrides
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

    from tam_hf.finetune.data import DataError
    from tam_hf.finetune.runner import finetune

    try:
        summary = finetune(recipe)
    except DataError as exc:
        print(f"error: data does not fit the recipe: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\naborted (second Ctrl-C): no checkpoint was written for the current step", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") == "0":  # launched runs: one summary, from the first process
        print(_format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
