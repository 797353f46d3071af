"""``tam-finetune eval RUN_DIR [--tasks a,b] [--num-fewshot K] [--limit N] [--batch-size B]``: lm-evaluation-harness
on a finished run's model (the ``eval`` extra). Settings default to the run's recipe (``eval.lm_eval``). Prints
lm-eval's table; exit 0 done, 2 nothing to evaluate / unknown task / lm-eval missing, 1 lm-eval failed."""

from __future__ import annotations

import argparse
import sys

from tam_hf.commands import report
from tam_hf.finetune.errors import LMEvalError

__all__ = ["main", "parser"]


def parser(prog: str = "tam-finetune eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run lm-evaluation-harness on a finished run's model; "
                                "settings default to the run's recipe (eval.lm_eval).")
    p.add_argument("run_dir", help="the run's output directory (holds recipe.yaml and the saved model or adapter)")
    p.add_argument("--tasks", help="comma-separated lm-eval task names or task YAML files")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="rows per task (a fraction when < 1)")
    p.add_argument("--batch-size", type=int, default=None)
    return p


def main(argv: list[str] | None = None, prog: str = "tam-finetune eval") -> int:
    args = parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    from tam_hf.finetune.lm_eval import evaluate_saved_run

    try:
        result = evaluate_saved_run(args.run_dir, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                    batch_size=args.batch_size)
    except LMEvalError as exc:
        return report(exc)
    print(result["table"])
    print(f"results: {result['results_file']}")
    return 0
