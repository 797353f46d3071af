"""``tam-finetune``: dispatch only. The first word picks a command; anything else is a recipe for ``run``.

    tam-finetune RECIPE.yaml [key.path=value ...]        the same as: tam-finetune run RECIPE.yaml ...
    tam-finetune compare RECIPE.yaml --optimizers adamw,adatamw --seeds 3
    tam-finetune eval RUN_DIR --tasks hellaswag
    tam-finetune push RUN_DIR --repo-id USER/NAME

Each command is a module of :mod:`tam_hf.commands` with a ``main(argv) -> exit code``; this module parses
nothing else. Exit codes are the command's (see :mod:`tam_hf.commands.run`).
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["main", "COMMANDS"]

# command -> one line of help; the module tam_hf.commands.<command> is imported only when chosen, so
# `tam-finetune compare --help` does not pay for the run's imports and vice versa.
COMMANDS: dict[str, str] = {
    "run": "train one recipe (the default: the word 'run' may be left out)",
    "compare": "run one recipe under several optimizers and seeds; report mean ± 95% CI with plots",
    "eval": "lm-evaluation-harness on a finished run's model (the eval extra)",
    "push": "upload a finished run's hub_upload/ folder (e.g. after a failed push)",
}
DEFAULT = "run"


def _overview() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: tam-finetune [COMMAND] ARGS ...   (tam-finetune COMMAND --help for a command's options)", "",
             "commands:"]
    lines += [f"  {name:{width}s}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(_overview())  # then the default command's own help: most users want the recipe options
    name = argv[0] if argv[:1] and argv[0] in COMMANDS else DEFAULT
    rest = argv[1:] if argv[:1] == [name] else argv
    try:
        command = importlib.import_module(f"tam_hf.commands.{name}")
    except ModuleNotFoundError as exc:  # a plain `pip install tam_hf` is the optimizers alone
        if (exc.name or "tam_hf").split(".")[0] == "tam_hf":
            raise
        print(f"error: tam-finetune {name} needs {exc.name}, which is not installed: "
              "pip install 'tam_hf[recipes]'", file=sys.stderr)
        return 1
    return command.main(rest)


if __name__ == "__main__":
    sys.exit(main())
