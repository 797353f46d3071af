"""``tam-finetune push RUN_DIR [--repo-id USER/NAME] [--public]``: upload a finished run's ``hub_upload/`` folder,
e.g. after a push that failed. Exit codes: 0 pushed, 1 the push failed, 2 nothing to push (no upload folder, no
repo id, or a run still writing to RUN_DIR)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tam_hf.commands import report
from tam_hf.finetune.errors import OutputDirError
from tam_hf.finetune.hub import push
from tam_hf.finetune.outputs import run_lock, write_summary
from tam_hf.finetune.config.load import read_recipe_file
from tam_hf.finetune.errors import RecipeError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """`tam-finetune push RUN_DIR [--repo-id USER/NAME]`: upload a finished run's hub_upload/ folder, e.g. after
    a push that failed. Exit codes: 0 pushed, 1 the push failed, 2 nothing to push (no upload folder, no repo id,
    or a run still writing to RUN_DIR)."""
    p = argparse.ArgumentParser(prog="tam-finetune push", description="Upload a finished run's hub_upload/ folder "
                                "to the Hugging Face Hub (e.g. after a push that failed).")
    p.add_argument("run_dir", help="the run's output directory (training.output_dir)")
    p.add_argument("--repo-id", default=None, help="target repository, user/name (default: the recipe's hub.repo_id)")
    p.add_argument("--public", action="store_true", help="create the repository public (default: the recipe's "
                                                         "hub.private, private when unset)")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    folder = run_dir / "hub_upload"
    hub = {}
    if (run_dir / "recipe.yaml").is_file():
        try:
            hub = read_recipe_file(run_dir / "recipe.yaml").get("hub") or {}
        except RecipeError as exc:
            return report(exc)
    repo_id = args.repo_id or hub.get("repo_id")
    problem = (f"{folder} not found: the run prepares it when hub.repo_id is set and training completed"
               if not (folder / "README.md").is_file()
               else None if repo_id else f"no repository to push to: {run_dir}/recipe.yaml has no hub.repo_id; "
                                          "pass --repo-id USER/NAME")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        with run_lock(run_dir):
            ok, message = push(folder, repo_id, private=not args.public and hub.get("private", True) is not False)
            summary_path = run_dir / "summary.json"
            if summary_path.is_file():
                summary = json.loads(summary_path.read_text())
                summary["hub"] = message
                write_summary(run_dir, summary)
    except OutputDirError as exc:
        return report(exc)
    print(message if ok else f"error: {message}; retry with: tam-finetune push {run_dir}",
          file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1
