"""``tam-finetune``: dispatch only. The first word picks a command; anything else is a recipe for ``run``.

    tam-finetune RECIPE.yaml [key.path=value ...]        the same as: tam-finetune run RECIPE.yaml ...
    tam-finetune compare RECIPE.yaml --optimizers adamw,adatamw --seeds 3
    tam-finetune eval RUN_DIR --tasks hellaswag
    tam-finetune push RUN_DIR --repo-id USER/NAME

Each command is a ``main(argv) -> exit code`` in the layer that does the work (see :data:`COMMANDS`); this
module parses nothing else. Exit codes are the command's: for ``run`` 0 done, 2 invalid recipe, 1 data that
does not fit the recipe, 130 / 143 interrupted by Ctrl-C / SIGTERM (:mod:`tam_hf.finetune.main`).
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["main", "COMMANDS"]

# command -> (module, function taking argv and returning the exit code, one line of help). Imported only when
# chosen, so `tam-finetune compare --help` does not pay for the run's imports and vice versa.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("tam_hf.finetune.main", "run_recipe", "train one recipe (the default: the word 'run' may be left out)"),
    "compare": ("tam_hf.compare.study", "main",
                "run one recipe under several optimizers and seeds; report mean ± std with plots"),
    "eval": ("tam_hf.finetune.lm_eval", "main", "lm-evaluation-harness on a finished run's model (the eval extra)"),
    "push": ("tam_hf.finetune.hub", "push_main", "upload a finished run's hub_upload/ folder (e.g. after a failed push)"),
}
DEFAULT = "run"


def _overview() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: tam-finetune [COMMAND] ARGS ...   (tam-finetune COMMAND --help for a command's options)", "",
             "commands:"]
    lines += [f"  {name:{width}s}  {text}" for name, (_, _, text) in COMMANDS.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(_overview())  # then the default command's own help: most users want the recipe options
    name = argv[0] if argv[:1] and argv[0] in COMMANDS else DEFAULT
    rest = argv[1:] if argv[:1] == [name] else argv
    module, function, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), function)(rest)


if __name__ == "__main__":
    sys.exit(main())
