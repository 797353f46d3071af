"""``tam-finetune compare RECIPE.yaml --optimizers adamw,adatamw,adatamw-const --seeds 3 --out DIR``.

Plans every run (:func:`tam_hf.compare.study.plan`), trains the ones not finished yet one after another
(:func:`tam_hf.compare.runner.execute`), then writes the report (:mod:`tam_hf.compare.report`) into DIR. Exit codes:

* 0 the report was written (or ``--dry-run`` printed a valid plan);
* 2 the recipe, an arm, the seeds or a sweep are wrong, or DIR holds finished runs of another recipe (what
  changed is named; ``--overwrite`` replaces them): every problem on stderr, nothing trained;
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
from tam_hf.compare import runner
from tam_hf.compare import study
from tam_hf.compare.tuning import TUNING_SEED, parse_tune_lr
from tam_hf.finetune.errors import RecipeError

__all__ = ["main", "parser", "parse_seeds"]


def parse_seeds(text: str, option: str = "--seeds", first: int = 0) -> list[int]:
    """``3`` -> seeds 0, 1, 2 (``first`` and up); ``13,42`` -> exactly those; ``7,`` -> seed 7 alone."""
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise ValueError(f"{option} {text!r}: no seed; give a count (3) or a list (0,1; one seed: 7,)")
    for word in words:
        if not word.lstrip("-").isdigit():
            raise ValueError(f"{option} {text!r}: {word!r} is not a whole number")
    if "," in text:
        return [int(w) for w in words]  # duplicates are refused by the plan
    if int(text) < 1:
        raise ValueError(f"{option} {text}: give a count >= 1, or a list such as 0,1 (one seed: 7,)")
    return list(range(first, first + int(text)))


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
    p.add_argument("--tune-lr", default=None, metavar="auto|LR1,LR2,...",
                   help="choose each arm's lr on the recipe's validation split first (data.validation_split or "
                        "data.validation_file; never the eval set): auto = 5 lrs spaced x3 around the arm's lr, or "
                        "the same list for every arm (NAME@LR1|LR2|... in --optimizers: that arm's own list); then "
                        "--seeds runs per arm at its chosen lr are scored on the eval set")
    p.add_argument("--tune-seeds", default="1",
                   help=f"tuning runs per lr: K (seeds {TUNING_SEED}..{TUNING_SEED}+K-1, never among --seeds) or a "
                        "list (default 1)")
    p.add_argument("--select", default=None, metavar="METRIC",
                   help="the validation metric that chooses the lr: loss or one of eval.metrics (default: the "
                        "recipe's first eval metric, else loss); lower is better for losses and perplexity")
    p.add_argument("--out", default=None, help="output folder (default: runs/compare/<recipe name>; runs/ is git-ignored)")
    p.add_argument("--keep-models", action="store_true", help="keep each run's weights and checkpoints")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the finished runs in --out that another recipe produced (without it, compare "
                        "stops and names what changed)")
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs; train nothing")
    p.add_argument("--dry-run", action="store_true", help="validate every run and print the plan; train nothing")
    p.add_argument("--verbose", action="store_true",
                   help="show the third-party notices and progress bars that are held back by default")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_intermixed_args(argv)
    out = Path(args.out or Path("runs") / "compare" / Path(args.recipe).stem)
    sets = [*args.overrides, *args.sets]
    try:
        seeds = parse_seeds(args.seeds)
        tune_lr = parse_tune_lr(args.tune_lr)
        if tune_lr is None and args.select is not None:
            raise ValueError("--select chooses among the lrs of --tune-lr; give --tune-lr auto (or a list)")
        if tune_lr is None:
            labels, runs, notes = study.plan(args.recipe, args.optimizers.split(","), seeds, sets, args.sweeps, out)
            tuned = None
        else:
            tuned = study.plan_tuned(args.recipe, args.optimizers.split(","), tune_lr,
                                     parse_seeds(args.tune_seeds, "--tune-seeds", TUNING_SEED), args.select, sets,
                                     args.sweeps, out)
            labels, runs, notes = tuned.labels, tuned.runs, tuned.notes
            study.check_seeds(seeds, tuned)  # before any tuning run, not after
    except (RecipeError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if tuned is not None:
        print(f"compare: tuning the lr of {len(labels)} arm(s) on the validation split by validation {tuned.metric} "
              f"({len(tuned.seeds)} seed(s) per lr), then {len(seeds)} seed(s) per arm at the chosen lr", flush=True)
        for label in labels:
            print(f"  {label:32s} grid {', '.join(f'{lr:.3g}' for lr in tuned.grids[label])}", flush=True)
    code = _train(runs, notes, args, len(labels), len(tuned.seeds) if tuned else len(seeds), out,
                  "tuning runs" if tuned else "runs")
    if code is not None:
        return code
    sections, extra = [], {}
    if tuned is not None:
        choices, sections, extra = _choose(tuned, out)
        while True:  # an auto grid follows a choice at its edge (tuning.beyond_edge), one lr at a time
            more = study.extend_tuned(tuned, choices)
            if not more or (args.report_only and not all(r.done for r in more)):
                break
            print("compare: a choice at the grid's edge: trying " + ", ".join(
                f"{r.label} lr {r.recipe.optimizer.lr:.3g}" for r in more if r.seed == tuned.seeds[0]), flush=True)
            code = _train(more, [], args, len({r.label for r in more}), len(tuned.seeds), out, "tuning runs")
            if code is not None:
                return code
            choices, sections, extra = _choose(tuned, out)
        chosen = {c.label: c.lr for c in choices}
        runs = study.final_runs(tuned, chosen, seeds)
        print("compare: learning rates chosen on the validation split: "
              + ", ".join(f"{c.label} {'none (no lr finished)' if c.lr is None else f'{c.lr:.3g}'}"
                          + (f" (at the grid's {c.edge} edge)" if c.edge else "") for c in choices), flush=True)
        code = _train(runs, [], args, len([c for c in choices if c.lr is not None]), len(seeds), out, "scored runs")
        if code is not None:
            return code
    results = [runner.read_result(r.result_path) for r in runs if r.done]
    if not results:
        print("error: no finished runs to report", file=sys.stderr)
        return 1
    from tam_hf.compare.report import write_report

    present = [label for label in labels if any(r["label"] == label for r in results)]
    command = "tam-finetune compare " + shlex.join(argv)  # what the user typed, quoted to be pasted again
    title = f"{Path(args.recipe).stem}, {len(seeds)} seed(s): line = mean, band = min..max"
    paths, _ = write_report(results, present, out, title, command, notes, sections)
    print((out / "report.md").read_text())  # its Notes section says why a plot panel is empty, if one is
    print("wrote " + ", ".join(str(p) for p in {**paths, **extra}.values()))
    return 0


def _choose(tuned, out: Path):
    """(the choice of every arm, report.md's section, the tuning files written) from the finished tuning runs."""
    from tam_hf.compare.tuning import choose, chosen_section, write_tuning

    done = [(run, runner.read_result(run.result_path)) for run in tuned.runs if run.done]
    choices = []
    for label in tuned.labels:
        by_lr: dict[float, list[dict]] = {}
        for run, result in done:
            if run.label == label:
                by_lr.setdefault(run.recipe.optimizer.lr, []).append(result)
        finished = {lr: rs for lr, rs in by_lr.items() if len(rs) == len(tuned.seeds)}
        choices.append(choose(label, tuned.grids[label], tuned.metric, finished, tuned.extended.get(label)))
    out.mkdir(parents=True, exist_ok=True)
    extra = write_tuning(out, choices, [{**result, "lr": run.recipe.optimizer.lr} for run, result in done])
    return choices, chosen_section(choices, tuned.seeds, tuned.source), extra


def _train(runs, notes, args, n_arms: int, n_seeds: int, out: Path, what: str):
    """Train the runs not finished yet, one after another; None when every one finished (or --dry-run /
    --report-only asked for none), else the exit code."""
    for run in runs:
        if runner.unreadable(run.result_path):
            print(f"note: {run.result_path} is unreadable (cut short by a full disk or a crash?): the run is "
                  "counted as not finished and redone", file=sys.stderr, flush=True)
    todo = [r for r in runs if not r.done]
    replaced = {id(r): changes for r in todo if (changes := r.replaces())}
    print(f"compare: {n_arms} arm(s) x {n_seeds} seed(s){' x lrs' if what == 'tuning runs' else ''} = {len(runs)} {what}; "
          f"{len(runs) - len(todo)} finished, {len(todo)} to do; output {out}", flush=True)
    for run in runs:
        state = "done" if run.done else "to do, over a finished run of another recipe" if id(run) in replaced \
            else "to do"
        print(f"  {run.label:32s} seed {run.seed}  lr {run.recipe.optimizer.lr:.3g}  {state}", flush=True)
    for note in notes:
        print(f"note: {note}", flush=True)
    if replaced and args.report_only:
        print(f"note: {len(replaced)} run folder(s) hold finished runs of another recipe: not in this report",
              file=sys.stderr, flush=True)
    elif replaced and not args.overwrite:
        _refuse_replacing([r for r in todo if id(r) in replaced], replaced, out)
        return 2
    if args.dry_run:
        return 0
    if args.report_only or not todo:
        return None
    from tam_hf.trainer import quiet

    quiet.install(verbose=args.verbose)
    for i, run in enumerate(todo, 1):
        started = time.time()
        print(f"[{i}/{len(todo)}] {run.label} seed {run.seed} lr {run.recipe.optimizer.lr:.3g} -> {run.directory}",
              flush=True)
        try:
            result = runner.execute(run, keep_models=args.keep_models)
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
        if runner.diverged(result):
            print(f"[{i}/{len(todo)}] diverged at step {result['diverged_at_step']} (a result: recorded, not "
                  f"retried): {result['diverged'].split('. ')[0]}", flush=True)
        else:
            print(f"[{i}/{len(todo)}] finished in {time.time() - started:.0f} s", flush=True)
    return None


def _refuse_replacing(runs, changes: dict, out: Path) -> None:
    """The error for finished runs a changed recipe would replace: which runs, what changed, the three ways on."""
    first = runs[0]
    names = ", ".join(f"{r.label} seed {r.seed}" + (f" lr {r.recipe.optimizer.lr:.3g}" if "tuning" in r.directory.parts
                                                     else "") for r in runs[:5])
    more = f" and {len(runs) - 5} more" if len(runs) > 5 else ""
    print(f"error: {out} holds {len(runs)} finished run(s) of another recipe that this command would replace "
          f"({names}{more}). In {first.directory}:\n" + "".join(f"  - {c}\n" for c in changes[id(first)])
          + "Nothing was trained. Keep them: give another --out, or undo the change; replace them: add --overwrite.",
          file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
