"""Copies the study's reports from runs/study/<task>/ into docs/study/<task>/ and writes docs/study/summary.md, the
table the README and docs/study/README.md show: `python scripts/collect_study.py`.

Only what `tam-finetune compare` wrote is copied (report.md, report.csv, runs.csv, tuning.csv and the plots); the
summary reads report.csv, so every number in it is one of the report's, with its interval and paired test. A task
whose report does not exist yet is listed as not run.
"""

from __future__ import annotations

import csv
import math
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RUNS = ROOT / "runs" / "study"
DOCS = ROOT / "docs" / "study"
FILES = ("report.md", "report.csv", "runs.csv", "tuning.csv", "loss.png", "damping.png", "tuning.png")
# task folder -> (what it is, the metrics its summary row shows: the headline first)
TASKS = {
    "sentiment": ("A: sentiment, MiniLM full", ["eval_accuracy", "eval_loss"]),
    "preference": ("B: review preference (pairs), MiniLM full", ["eval_accuracy", "eval_loss"]),
    "rules": ("C: list rules, SmolLM2-135M LoRA", ["eval_loss"]),
    "shift": ("D: 3-stage shift, MiniLM full", ["continual_final_average", "continual_forgetting"]),
    "sentiment-sgd": ("A: SGD-momentum vs TAM", ["eval_accuracy", "eval_loss"]),
}


def _num(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _cell(row: dict, baseline: str) -> str:
    mean, low, high = _num(row["mean"]), _num(row["ci95_low"]), _num(row["ci95_high"])
    text = f"{mean:.3f}" + ("" if math.isnan(low) else f" [{low:.3f}, {high:.3f}]")
    delta = _num(row[f"delta_vs_{baseline}"])
    if not math.isnan(delta):
        dl, dh, p = _num(row["delta_ci95_low"]), _num(row["delta_ci95_high"]), _num(row["p_value"])
        text += f"<br>Δ {delta:+.3f}" + ("" if math.isnan(dl) else f" [{dl:+.3f}, {dh:+.3f}]") + \
            ("" if math.isnan(p) else f", p {p:.2g}")
    return text


def _chosen(folder: Path) -> dict[str, str]:
    path = folder / "tuning.csv"
    if not path.is_file():
        return {}
    with path.open() as f:
        return {r["arm"]: f"{float(r['lr']):.3g}" for r in csv.DictReader(f) if r["chosen"] == "True"}


def _report(task: str) -> dict:
    path = DOCS / task / "report.csv"
    if not path.is_file():
        return {}
    with path.open() as f:
        return {(r["arm"], r["metric"]): r for r in csv.DictReader(f)}


def summary_rows(task: str, title: str, metrics: list[str]) -> list[str]:
    by = _report(task)
    if not by:
        return [f"| {title} | not run yet | | |"]
    first = next(iter(by.values()))
    baseline = next(k for k in first if k.startswith("delta_vs_")).removeprefix("delta_vs_")
    arms = list(dict.fromkeys(arm for arm, _ in by))
    chosen = _chosen(DOCS / task)
    out = []
    for arm in arms:
        cells = [_cell(by[(arm, m)], baseline) if (arm, m) in by else "–" for m in metrics] + [""] * (2 - len(metrics))
        n = max((by[(arm, m)]["n"] for m in metrics if (arm, m) in by), default="0")
        out.append(f"| {title} | {arm} (lr {chosen.get(arm, '?')}, n {n}) | " + " | ".join(cells) + " |")
    return out


def angle_cells(task: str, metrics: list[str]) -> tuple[list[str], int]:
    """The angle's own effect: adatamw minus its constant-damping control, paired by seed (from runs.csv): a cell
    per metric and the number of pairs; ([], 0) where the task has not both arms."""
    from tam_hf.compare.stats import paired

    path = DOCS / task / "runs.csv"
    if not path.is_file():
        return [], 0
    with path.open() as f:
        rows = list(csv.DictReader(f))
    if not {"adatamw", "adatamw-const"} <= {r["arm"] for r in rows}:
        return [], 0

    def values(arm: str, metric: str) -> dict[int, float]:
        return {int(r["seed"]): float(r[metric]) for r in rows
                if r["arm"] == arm and r.get(metric) not in ("", None, "diverged")}

    cells, n = [], 0
    for metric in metrics:
        d = paired(values("adatamw", metric), values("adatamw-const", metric))
        cells.append(f"Δ {d['delta']:+.3f} [{d['delta_low']:+.3f}, {d['delta_high']:+.3f}], p {d['p_value']:.2g}")
        n = d["delta_n"]
    return cells, n


def angle_rows(task: str, title: str, metrics: list[str]) -> list[str]:
    cells, n = angle_cells(task, metrics)
    if not cells:
        return []
    return [f"| {title} | adatamw − adatamw-const (the angle), {n} pairs | "
            + " | ".join(cells + [""] * (2 - len(cells))) + " |"]


# The table the README shows: one row per comparison, on its task's headline metric (the first of TASKS):
# (task folder, what the row compares, baseline arm, TAM arm, its control or None)
HEADLINE = [
    ("sentiment", "A: sentiment, MiniLM full (100 steps)", "adamw", "adatamw", "adatamw-const"),
    ("preference", "B: review preference, MiniLM full (120 steps)", "adamw", "adatamw", "adatamw-const"),
    ("rules", "C: list rules, SmolLM2-135M LoRA (70 steps)", "adamw", "adatamw", "adatamw-const"),
    ("shift", "D: 3-stage shift, MiniLM full (100+40+40 steps)", "adamw", "adatamw", "adatamw-const"),
    ("sentiment", "A: TAM as a 50-step warm-up, then AdamW", "adamw", "adatamw>adamw@50", None),
    ("sentiment-sgd", "A: the SGD forms (SGD-momentum vs TAM)", "sgd", "tam", None),
]


def headline_rows() -> list[str]:
    """One row per comparison: the baseline, the TAM arm and its control (Δ to the baseline, paired by seed), and
    the angle (TAM arm minus control, paired), each on the task's headline metric with its chosen lr."""
    lines = ["| task (headline metric) | baseline | TAM arm, Δ vs baseline | control (d = 0.5), Δ vs baseline | "
             "the angle: TAM arm − control |", "|---|---|---|---|---|"]
    for task, title, base, arm, control in HEADLINE:
        metric = TASKS[task][1][0]
        by, chosen = _report(task), _chosen(DOCS / task)
        if (base, metric) not in by:
            lines.append(f"| {title} | not run yet | | | |")
            continue

        def cell(name):
            if name is None or (name, metric) not in by:
                return "–"
            row = by[(name, metric)]
            return f"{name} (lr {chosen.get(name, '?')}, n {row['n']}): " + _cell(row, base).replace("<br>", ", ")

        angle, n = angle_cells(task, [metric]) if control else ([], 0)
        angle_cell = f"{angle[0]} ({n} pairs)" if angle else "–"
        lines.append(f"| {title}, {metric} | {cell(base)} | {cell(arm)} | {cell(control)} | {angle_cell} |")
    return lines


def main() -> int:
    lines = ["| task | arm (chosen lr, seeds) | first metric: mean [95% CI]<br>Δ vs the first arm [95% CI], p | "
             "second metric |", "|---|---|---|---|"]
    for task, (title, metrics) in TASKS.items():
        source = RUNS / task
        if (source / "report.md").is_file():
            (DOCS / task).mkdir(parents=True, exist_ok=True)
            for name in FILES:
                if (source / name).is_file():
                    shutil.copy2(source / name, DOCS / task / name)
        lines += summary_rows(task, title, metrics) + angle_rows(task, title, metrics)
    names = "; ".join(f"{t}: {', '.join(m)}" for t, (_, m) in TASKS.items())
    text = "\n".join(headline_rows()) + "\n\nEvery arm, both metrics of each task:\n\n" + "\n".join(lines) + \
        f"\n\nMetrics per task ({names}).\n"
    (DOCS / "summary.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
