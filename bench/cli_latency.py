"""How long the commands a user types first take before they do anything: ``tam-finetune RECIPE --validate`` and
``tam-finetune --help``, each the median wall time over ``--runs`` fresh processes, then the import profile of
each (``python -X importtime``, the ``--top`` modules by cumulative time) that says where the time goes.

Each run is a new interpreter, as when a user types the command, and always the same one: this Python running
``-m tam_hf.cli`` (what the ``tam-finetune`` console script calls), with the environment passed on, so that
``PYTHONPATH`` picks the checkout measured. Offline (``HF_HUB_OFFLINE=1`` unless set) so that no network
time enters the figures. Nothing is asserted: the figures go into the README by hand, with the machine and its load.

    python bench/cli_latency.py                      # 5 runs each, recipes/examples/demo_tiny.yaml
    python bench/cli_latency.py --runs 1 --top 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = ROOT / "recipes" / "examples" / "demo_tiny.yaml"


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.setdefault(name, "1")
    return env


def _command(args: list[str], python_flags: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, *python_flags, "-m", "tam_hf.cli", *args]


def time_runs(args: list[str], runs: int) -> tuple[list[float], int]:
    """Wall seconds of each of ``runs`` fresh processes, and the exit status of the last."""
    times, code = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        code = subprocess.run(_command(args), env=_environment(), cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL).returncode
        times.append(time.perf_counter() - started)
    return times, code


def import_profile(args: list[str], top: int) -> list[tuple[float, float, str]]:
    """(cumulative s, self s, module) of the ``top`` imports by cumulative time, from ``-X importtime``."""
    done = subprocess.run(_command(args, ("-X", "importtime")), env=_environment(), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, cumulative, name = (part.strip() for part in line[len("import time:"):].split("|", 2))
        rows.append((int(cumulative) / 1e6, int(own) / 1e6, name.strip()))
    first = {}
    for row in sorted(rows, reverse=True):  # a module may be listed twice (its package first): keep the larger
        first.setdefault(row[2], row)
    return list(first.values())[:top]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="fresh processes per command (default 5)")
    p.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="recipe to validate (default demo_tiny)")
    p.add_argument("--top", type=int, default=10, help="imports listed per command, by cumulative time")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")

    recipe = Path(args.recipe).resolve()
    shown = recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe
    commands = [(f"tam-finetune {shown} --validate", [str(recipe), "--validate"]),
                ("tam-finetune --help", ["--help"])]
    print(f"python {sys.version.split()[0]} at {sys.executable}; {os.cpu_count()} CPU(s); "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| command | runs | median s | min s | max s | exit |")
    print("|---|---|---|---|---|---|")
    for label, command in commands:
        times, code = time_runs(command, args.runs)
        print(f"| {label} | {len(times)} | {statistics.median(times):.2f} | {min(times):.2f} | {max(times):.2f} "
              f"| {code} |", flush=True)
    for label, command in commands:
        print(f"\nimports of `{label}` (python -X importtime, top {args.top} by cumulative time):\n")
        print("| cumulative s | self s | module |")
        print("|---|---|---|")
        for cumulative, own, name in import_profile(command, args.top):
            print(f"| {cumulative:.3f} | {own:.3f} | {name} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
