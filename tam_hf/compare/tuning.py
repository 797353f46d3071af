"""Learning-rate tuning for ``tam-finetune compare --tune-lr``: the grids, the choice on the validation split, and
what the choice is reported with (``tuning.csv``, ``tuning.png``, the "Learning rates chosen" section of report.md).

The protocol, fixed before anything runs:

1. Every arm gets its own grid: ``--tune-lr auto`` is :data:`GRID_POINTS` points spaced x :data:`GRID_STEP` (log
   scale) centred on the arm's lr (its transfer-rule lr, or the ``NAME@LR`` given); ``--tune-lr 1e-5,3e-5,...`` is
   the same list for every arm; ``NAME@LR1|LR2|...`` is that arm's own list. Every arm trains as many tuning runs
   as its grid has points times ``--tune-seeds`` (equal budget when the grids are equally long).
2. Tuning runs use the seeds :data:`TUNING_SEED` and up, never the seeds scored afterwards: the lr is chosen on
   runs that the final numbers do not include.
3. Each run is scored on the recipe's validation split (``data.validation_split`` or ``data.validation_file``:
   rows held out of training, never the eval set) by the ``--select`` metric; an lr's score is its mean over the
   tuning seeds; a diverged run or a missing score makes the lr unchoosable.
4. The best lr of each arm is chosen (lower is better for losses and perplexity, higher for the rest). With
   ``auto``, a choice at the grid's edge is followed: one more lr x GRID_STEP beyond it is tried (same tuning
   seeds), up to :data:`MAX_EXTENSIONS` per side, until the choice is inside the grid (an arm whose lr sits at
   the edge would be compared under-tuned; the extra runs are reported). Then ``--seeds`` fresh runs at the
   chosen lr are scored on the eval set, and the report compares those.

A choice still at the grid's edge (an explicit grid, or the extensions used up) is flagged: the best lr may lie
beyond it.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tam_hf.finetune.continual import higher_is_better

__all__ = ["GRID_POINTS", "GRID_STEP", "MAX_EXTENSIONS", "TUNING_SEED", "parse_tune_lr", "auto_grid",
           "default_metric", "Choice", "choose", "beyond_edge", "write_tuning", "chosen_section"]

GRID_POINTS = 5
GRID_STEP = 3.0
MAX_EXTENSIONS = 2  # lrs added beyond an auto grid's edge, per side
# Tuning seeds start here: far from the 0, 1, 2... of --seeds N, so no scored run is a run the lr was chosen on.
TUNING_SEED = 1000


def parse_tune_lr(text: Optional[str]):
    """``None`` (no tuning), ``"auto"``, or the sorted list of learning rates of ``1e-5,3e-5,...``."""
    if text is None:
        return None
    if text.strip() == "auto":
        return "auto"
    return parse_lrs(text, "--tune-lr", ",", hint="write auto, or ")


def parse_lrs(text: str, where: str, sep: str, hint: str = "") -> list[float]:
    """Learning rates separated by ``sep``: positive, finite, each once, at least two (one lr is not a grid).
    Raises one ValueError that names every bad entry."""
    words = [w.strip() for w in text.split(sep) if w.strip()]
    lrs, problems = [], []
    for word in words:
        try:
            lr = float(word)
        except ValueError:
            problems.append(f"{word!r} is not a number")
            continue
        if not (math.isfinite(lr) and lr > 0):
            problems.append(f"{word} is not a positive finite learning rate")
        elif lr in lrs:
            problems.append(f"{word} is given twice")
        else:
            lrs.append(lr)
    if problems:
        example = sep.join(("1e-5", "3e-5", "1e-4"))
        raise ValueError(f"{where} {text!r}: {'; '.join(problems)} ({hint}lrs such as {example})")
    if len(lrs) < 2:
        raise ValueError(f"{where} {text!r}: a grid needs at least two learning rates")
    return sorted(lrs)


def auto_grid(centre: float) -> list[float]:
    """GRID_POINTS learning rates spaced x GRID_STEP, ``centre`` in the middle (rounded to 3 significant digits,
    so the run folders and tables read 1.33e-05 rather than 1.3333333333e-05)."""
    half = GRID_POINTS // 2
    return [float(f"{centre * GRID_STEP ** k:.3g}") for k in range(-half, GRID_POINTS - half)]


def default_metric(recipe) -> str:
    """What ``--select`` chooses by when not given: the recipe's first eval metric, else the loss."""
    names = [m for m in (recipe.eval.metrics or []) if ":" not in m and "/" not in m]
    return names[0] if names else "loss"


@dataclass
class Choice:
    """One arm's tuning: the grid, each lr's mean validation score, and the lr chosen."""

    label: str
    grid: list[float]
    metric: str
    scores: dict[float, Optional[float]] = field(default_factory=dict)  # lr -> mean over tuning seeds, None: unusable
    lr: Optional[float] = None
    extended: dict[str, int] = field(default_factory=dict)  # 'low'/'high' -> lrs added beyond the first grid

    @property
    def edge(self) -> Optional[str]:
        """'low' or 'high' when the chosen lr is the grid's smallest or largest, else None."""
        if self.lr is None or len(self.grid) < 2:
            return None
        return "low" if self.lr == min(self.grid) else "high" if self.lr == max(self.grid) else None


def beyond_edge(choice: Choice) -> Optional[float]:
    """The next lr to try past the edge ``choice`` sits at (x GRID_STEP further), or None: inside the grid, nothing
    choosable, or :data:`MAX_EXTENSIONS` already added on that side."""
    if choice.edge is None or choice.extended.get(choice.edge, 0) >= MAX_EXTENSIONS:
        return None
    lr = min(choice.grid) / GRID_STEP if choice.edge == "low" else max(choice.grid) * GRID_STEP
    return float(f"{lr:.3g}")


def _score(result: dict, metric: str) -> Optional[float]:
    if result.get("status") == "diverged":
        return None
    value = (result.get("summary", {}).get("validation") or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def choose(label: str, grid: list[float], metric: str, results: dict[float, list[dict]],
           extended: Optional[dict[str, int]] = None) -> Choice:
    """The lr of ``grid`` whose tuning runs (``results``: lr -> the finished runs' result.json contents) score best
    on the validation split by ``metric``; ties go to the smaller lr. An lr with a diverged run or a missing
    score cannot be chosen; with none choosable, ``lr`` stays None."""
    choice = Choice(label, sorted(grid), metric, extended=dict(extended or {}))
    for lr in grid:
        runs = results.get(lr) or []
        values = [_score(r, metric) for r in runs]
        choice.scores[lr] = None if not values or None in values else sum(values) / len(values)
    usable = [(v, lr) for lr, v in choice.scores.items() if v is not None]
    if usable:
        sign = -1.0 if higher_is_better(metric) else 1.0
        choice.lr = min(usable, key=lambda pair: (sign * pair[0], pair[1]))[1]
    return choice


def write_tuning(out: Path, choices: list[Choice], results: list[dict]) -> dict[str, Path]:
    """tuning.csv (one row per tuning run: arm, lr, seed, the selection metric on the validation split, status,
    chosen) and tuning.png (the mean selection metric against lr per arm, log x, seeds as dots, the choice
    ringed) in ``out``."""
    paths = {"tuning.csv": out / "tuning.csv", "tuning.png": out / "tuning.png"}
    chosen = {c.label: c.lr for c in choices}
    metric = choices[0].metric if choices else "loss"
    with paths["tuning.csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "lr", "seed", f"validation_{metric}", "status", "chosen"])
        for r in sorted(results, key=lambda r: (r["label"], r["lr"], r["seed"])):
            value = _score(r, metric)
            w.writerow([r["label"], repr(r["lr"]), r["seed"], "" if value is None else repr(value),
                        r.get("status", "completed"), r["lr"] == chosen.get(r["label"])])
    _plot(choices, results, metric, paths["tuning.png"])
    return paths


def _plot(choices: list[Choice], results: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, choice in enumerate(choices):
        points = [(lr, v) for lr, v in sorted(choice.scores.items()) if v is not None]
        if points:
            ax.plot(*zip(*points), marker="o", color=f"C{i}", label=choice.label)
        seeds = [(r["lr"], _score(r, metric)) for r in results if r["label"] == choice.label]
        dots = [(lr, v) for lr, v in seeds if v is not None]
        if dots:
            ax.scatter(*zip(*dots), s=10, color=f"C{i}", alpha=0.5)
        failed = [lr for lr, v in choice.scores.items() if v is None]
        if failed:  # diverged or unscored: drawn at the bottom edge, so that a gap in a line is explained
            ax.scatter(failed, [0] * len(failed), marker="x", color=f"C{i}", transform=ax.get_xaxis_transform(),
                       clip_on=False)
        if choice.lr is not None:
            ax.scatter([choice.lr], [choice.scores[choice.lr]], s=160, facecolors="none", edgecolors=f"C{i}",
                       linewidths=2)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"validation {metric} ({'higher' if higher_is_better(metric) else 'lower'} is better)")
    ax.set_title("lr tuning on the validation split: mean over tuning seeds\n(ring: chosen; x: diverged)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if choices:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def chosen_section(choices: list[Choice], tune_seeds: list[int], source: str) -> list[str]:
    """report.md's "Learning rates chosen": per arm the grid, each lr's validation score, the choice, and a flag
    when the choice sits at the grid's edge."""
    metric = choices[0].metric if choices else "loss"
    better = "higher" if higher_is_better(metric) else "lower"
    text = ["## Learning rates chosen", "",
            f"Each arm's lr was chosen on the validation split ({source}; never the eval set) by validation "
            f"{metric} ({better} is better), mean over {len(tune_seeds)} tuning seed(s) "
            f"({', '.join(map(str, tune_seeds))}; not among the scored seeds). The table above scores fresh seeds "
            "at the chosen lr on the eval set. tuning.csv has every tuning run; tuning.png the curves.", "",
            "| arm | grid | validation " + metric + " per lr | chosen lr | note |", "|---|---|---|---|---|"]
    for c in choices:
        scores = ", ".join(f"{lr:.3g}: {'–' if v is None else f'{v:.4g}'}" for lr, v in sorted(c.scores.items()))
        if c.lr is None:
            note = "**no lr finished with a validation score** (all diverged?): the arm is left out"
        elif c.edge:
            side = "smallest" if c.edge == "low" else "largest"
            note = f"**at the grid's {c.edge} edge** (the {side} lr tried): the best lr may lie beyond; widen the grid"
        else:
            note = ""
        added = [f"{n} lr(s) {'below' if side == 'low' else 'above'}" for side, n in c.extended.items() if n]
        if added:
            note = (note + "; " if note else "") + f"grid extended by {' and '.join(added)} (the choice was at its edge)"
        lr = "–" if c.lr is None else f"{c.lr:.3g}"
        text.append(f"| {c.label} | {len(c.grid)} points, {min(c.grid):.3g}..{max(c.grid):.3g} | {scores} | {lr} | "
                    f"{note} |")
    return text
