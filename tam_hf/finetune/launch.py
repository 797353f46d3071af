"""Multi-process launching for `tam-finetune`: `--nproc N` (torchrun) and `distributed.accelerate_config`
(accelerate launch). The CLI re-runs itself under the launcher with the same recipe and overrides; inside a
launched process (``WORLD_SIZE`` set) it trains directly.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # the schema imports pydantic: not needed for `tam-finetune --help`
    from tam_hf.finetune.config.schema import Recipe

__all__ = ["launched", "rank", "launch_command", "launch_problems"]


def rank() -> int:
    """This process's rank in a launched run (torchrun and accelerate set RANK); 0 on its own."""
    return int(os.environ.get("RANK", "0"))


def launched() -> bool:
    """True inside a process started by torchrun / accelerate launch."""
    return "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ


def _accelerate_config(recipe: Recipe) -> Optional[str]:
    d = recipe.distributed
    return None if d is None or d.accelerate_config is None else d.accelerate_config


def launch_problems(recipe: Recipe, nproc: Optional[int]) -> list[str]:
    """What would make a multi-process run silently wrong, found before anything starts."""
    problems = []
    if nproc is not None and nproc < 1:
        problems.append(f"--nproc: {nproc} must be >= 1")
    multi = (nproc or 1) > 1 or _accelerate_config(recipe) is not None
    if multi and not launched():
        import torch

        if not torch.cuda.is_available() and recipe.training.get("use_cpu") is not True:
            # Without use_cpu accelerate sees no distributed setup on a machine without GPUs: every process
            # trains alone on the same data, and nothing says so.
            problems.append("several processes on a machine without a GPU need training.use_cpu: true "
                            "(otherwise each process silently trains alone on the same data)")
    return problems


def launch_command(recipe: Recipe, recipe_path: str, overrides: list[str], nproc: Optional[int],
                   extra: list[str] = ()) -> Optional[list[str]]:
    """The command that runs this recipe under a launcher, or None when this process should train itself."""
    if launched():
        return None
    config = _accelerate_config(recipe)
    tail = ["-m", "tam_hf.cli", recipe_path, *overrides, *extra]
    if config is not None:
        procs = ["--num_processes", str(nproc)] if nproc else []
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, *procs, *tail]
    if nproc and nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *tail]
    return None
