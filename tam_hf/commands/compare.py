"""``tam-finetune compare RECIPE.yaml --optimizers adamw,adatamw,adatamw-const --seeds 3 --out DIR``.

Plans every run (:func:`tam_hf.compare.study.plan`), trains the ones not finished yet one after another
(:func:`tam_hf.compare.study.execute`), then writes the report (:mod:`tam_hf.compare.report`) into DIR. Exit codes:

* 0 the report was written (or ``--dry-run`` printed a valid plan);
* 2 the recipe, an arm, the seeds or a sweep are wrong: every problem on stderr, nothing trained;
* 1 no finished run to report, or a run failed (its own exit code when it carries one);
* 130 interrupted by Ctrl-C: the finished runs are kept, the same command continues.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from tam_hf.commands import explain
from tam_hf.compare import study
from tam_hf.finetune.errors import RecipeError

__all__ = ["main", "parser", "parse_seeds"]


def parse_seeds(text: str) -> list[int]:
    """``3`` -> seeds 0, 1, 2; ``13,42`` -> exactly those; ``7,`` -> seed 7 alone."""
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise ValueError(f"--seeds {text!r}: no seed; give a count (3) or a list (0,1; one seed: 7,)")
    for word in words:
        if not word.lstrip("-").isdigit():
            raise ValueError(f"--seeds {text!r}: {word!r} is not a whole number")
    if "," in text:
        return [int(w) for w in words]  # duplicates are refused by the plan
    if int(text) < 1:
        raise ValueError(f"--seeds {text}: give a count >= 1, or a list such as 0,1 (one seed: 7,)")
    return list(range(int(text)))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tam-finetune compare",
        description="Run a recipe under several optimizers and seeds; write a report (mean ± 95% CI, differences "
        "paired by seed) with plots.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="arms (one per optimizer in tam_hf.optim.registry, plus a -const control per TAM optimizer):\n"
        + "\n".join(f"  {k:16s} {a.help}" for k, a in study.arms().items())
        + "".join(f"\n  {alias} = {name}" for alias, name in study.ALIASES.items())
        + "\n\nexample: tam-finetune compare recipes/examples/demo_tiny.yaml "
        "--optimizers adamw,adatamw,adatamw-const --seeds 3 --out runs/demo",
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="recipe override for every run, as for the run command (the same as --set)")
    p.add_argument("--optimizers", default="adamw,adatamw",
                   help="comma-separated arms, the first is the baseline of the deltas; NAME@LR sets an lr")
    p.add_argument("--seeds", default="3", help="N (seeds 0..N-1) or a comma-separated list (default 3)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for every run (repeatable), e.g. --set training.max_steps=200")
    p.add_argument("--sweep", dest="sweeps", action="append", default=[], metavar="KEY=V1,V2",
                   help="one arm per value, e.g. --sweep optimizer.decay_rate=0.5,0.9,0.99 (repeatable: product)")
    p.add_argument("--out", default=None, help="output folder (default: runs/compare/<recipe name>; runs/ is git-ignored)")
    p.add_argument("--keep-models", action="store_true", help="keep each run's weights and checkpoints")
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs; train nothing")
    p.add_argument("--dry-run", action="store_true", help="validate every run and print the plan; train nothing")
    p.add_argument("--verbose", action="store_true",
                   help="show the third-party notices and progress bars that are held back by default")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_intermixed_args(argv)
    out = Path(args.out or Path("runs") / "compare" / Path(args.recipe).stem)
    try:
        seeds = parse_seeds(args.seeds)
        labels, runs, notes = study.plan(args.recipe, args.optimizers.split(","), seeds,
                                         [*args.overrides, *args.sets], args.sweeps, out)
    except (RecipeError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for run in runs:
        if study.unreadable(run.result_path):
            print(f"note: {run.result_path} is unreadable (cut short by a full disk or a crash?): the run is "
                  "counted as not finished and redone", file=sys.stderr, flush=True)
    todo = [r for r in runs if not r.done]
    print(f"compare: {len(labels)} arm(s) x {len(seeds)} seed(s) = {len(runs)} runs; "
          f"{len(runs) - len(todo)} finished, {len(todo)} to do; output {out}", flush=True)
    for run in runs:
        print(f"  {run.label:32s} seed {run.seed}  lr {run.recipe.optimizer.lr:.3g}  "
              f"{'done' if run.done else 'to do'}", flush=True)
    for note in notes:
        print(f"note: {note}", flush=True)
    if args.dry_run:
        return 0
    if not args.report_only and todo:
        from tam_hf.trainer import quiet

        quiet.install(verbose=args.verbose)
        for i, run in enumerate(todo, 1):
            started = time.time()
            print(f"[{i}/{len(todo)}] {run.label} seed {run.seed} -> {run.directory}", flush=True)
            try:
                result = study.execute(run, keep_models=args.keep_models)
            except KeyboardInterrupt:
                print("compare interrupted; rerun the same command to continue", file=sys.stderr)
                return 130
            except Exception as exc:  # the run command's answer to a user-facing error; a bug keeps its traceback
                answer = explain(exc)
                if answer is None:
                    raise
                print(f"{run.label} seed {run.seed}: {answer[1]}\nfinished runs are kept; fix the cause and rerun "
                      "the same command to continue", file=sys.stderr)
                return answer[0]
            if study.diverged(result):
                print(f"[{i}/{len(todo)}] diverged at step {result['diverged_at_step']} (a result: recorded, not "
                      f"retried): {result['diverged'].split('. ')[0]}", flush=True)
            else:
                print(f"[{i}/{len(todo)}] finished in {time.time() - started:.0f} s", flush=True)
    results = [study.read_result(r.result_path) for r in runs if r.done]
    if not results:
        print("error: no finished runs to report", file=sys.stderr)
        return 1
    from tam_hf.compare.report import write_report

    present = [label for label in labels if any(r["label"] == label for r in results)]
    command = "tam-finetune compare " + shlex.join(argv)  # what the user typed, quoted to be pasted again
    title = f"{Path(args.recipe).stem}, {len(seeds)} seed(s): line = mean, band = min..max"
    paths, _ = write_report(results, present, out, title, command, notes)
    print((out / "report.md").read_text())  # its Notes section says why a plot panel is empty, if one is
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
