"""The comparison report: per-run results in, one folder of tables and plots out.

Input is a list of finished runs, each ``{"label", "seed", "summary", "log_history"}`` (what
:mod:`tam_hf.compare.study` stores as ``result.json``). Output, all in one folder:

* ``report.md``  every metric as mean ± its 95% confidence interval over seeds, with the difference to the first
  arm paired by seed, its 95% interval and the paired t-test's p-value (:mod:`tam_hf.compare.stats`);
* ``report.csv`` the same numbers in long form (arm, metric, n, mean, std, ci95_low/high, delta, delta_se,
  delta_ci95_low/high, delta_n, p_value, seeds, per-seed values);
* ``runs.csv``   one row per run;
* ``loss.png``   training and evaluation loss over steps (mean over seeds, band = min..max);
* ``damping.png`` TAM's mean damping over steps (arms without damping, e.g. AdamW, are absent).

Staged runs (a recipe's ``stages:``) add ``continual_final_average``, ``continual_forgetting`` and
``continual_backward_transfer`` to the metrics, and a Stages section to report.md (each stage's eval set right
after that stage and after the last one).

report.md ends with Notes: what the study changed in the recipe (e.g. a logging interval) and every plot panel
left empty, with the reason, so that an empty plot is never silent.

Standard deviations are sample standard deviations (ddof 1). With one seed there is no interval ("n/a"); a
difference is over the seeds both arms finished (a diverged seed leaves its pair out, and the cell says how many
pairs remain).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from tam_hf.compare.stats import mean_ci, paired

__all__ = ["run_metrics", "aggregate", "write_report", "curves"]

# log_history key -> curve name; train losses are logged under "loss", evaluations under "eval_loss".
# The continual-learning numbers of a staged run's summary that compare reports like any metric.
CONTINUAL = ("final_average", "forgetting", "backward_transfer")
CURVES = {"loss": "train loss", "eval_loss": "eval loss", "damping/mean": "damping (mean over tensors)"}


def run_metrics(result: dict) -> dict[str, float]:
    """The scalar metrics of one run, in a stable order: train loss, eval metrics, final damping, wall time."""
    s = result["summary"]
    out = {"train_loss": s["train_loss"]}
    for key, value in (s.get("eval") or {}).items():
        out[f"eval_{key}"] = value
    for key in CONTINUAL:  # a staged run (recipe stages:): tam_hf.finetune.continual
        out[f"continual_{key}"] = (s.get("continual") or {}).get(key)
    if s.get("damping"):
        out["damping_mean"] = s["damping"]["mean"]
    out["wall_s"] = s.get("wall_s")
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _metric_rank(name: str) -> int:
    """Column order whatever arm comes first: losses and task metrics, then damping, then time."""
    return {"train_loss": 0, "damping_mean": 2, "wall_s": 3}.get(name, 1)


def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, std


def aggregate(results: list[dict], arms: list[str]) -> tuple[list[str], list[dict]]:
    """(metric names, rows): one row per (arm, metric) with n, mean, std, the 95% interval of the mean
    (``ci_low``, ``ci_high``), the seeds and their values, and the difference to ``arms[0]`` paired by seed
    (:func:`tam_hf.compare.stats.paired`: ``delta``, ``delta_se``, ``delta_low``, ``delta_high``, ``delta_n``,
    ``p_value``; NaN for the first arm itself)."""
    per_arm: dict[str, dict[str, dict[int, float]]] = {arm: {} for arm in arms}
    metrics: list[str] = []
    for result in sorted(results, key=lambda r: r["seed"]):
        for key, value in run_metrics(result).items():
            per_arm[result["label"]].setdefault(key, {})[result["seed"]] = value
            if key not in metrics:
                metrics.append(key)
    metrics.sort(key=_metric_rank)
    rows = []
    base = per_arm[arms[0]]
    for arm in arms:
        for metric in metrics:
            by_seed = per_arm[arm].get(metric)
            if not by_seed:
                continue
            values = list(by_seed.values())
            mean, low, high = mean_ci(values)
            row = {"arm": arm, "metric": metric, "n": len(values), "mean": mean, "std": _mean_std(values)[1],
                   "ci_low": low, "ci_high": high, "seeds": list(by_seed), "values": values}
            row.update(paired(by_seed, base[metric]) if arm != arms[0] and base.get(metric) else paired({}, {}))
            rows.append(row)
    return metrics, rows


def _fmt(x: float, scale: float) -> str:
    """4 decimals for metrics around 1 (losses, accuracies), 1 for large ones (seconds); one scale per cell."""
    if math.isnan(x):
        return "n/a"
    return f"{x:.4f}" if abs(scale) < 10 else f"{x:.1f}"


def _signed(x: float, scale: float) -> str:
    return "n/a" if math.isnan(x) else ("+" if x >= 0 else "−") + _fmt(abs(x), scale)


def _cell(row: dict) -> str:
    """``mean ± half-width of its 95% interval (Δ mean paired difference [its interval], p of the paired test)``,
    with the number of pairs when fewer seeds than the row's were paired."""
    scale = row["mean"]
    text = f"{_fmt(row['mean'], scale)} ± {_fmt(row['ci_high'] - row['mean'], scale)}"
    if not math.isnan(row["delta"]):
        bounds = "" if math.isnan(row["delta_low"]) else \
            f" [{_signed(row['delta_low'], scale)}, {_signed(row['delta_high'], scale)}]"
        p = "" if math.isnan(row["p_value"]) else f", p {row['p_value']:.2g}"
        pairs = "" if row["delta_n"] == row["n"] else f", {row['delta_n']} pairs"
        text += f" (Δ {_signed(row['delta'], scale)}{bounds}{p}{pairs})"
    return text


def markdown_table(metrics: list[str], rows: list[dict], arms: list[str]) -> str:
    by = {(r["arm"], r["metric"]): r for r in rows}
    lines = ["| arm | seeds | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
    for arm in arms:
        n = max((by[(arm, m)]["n"] for m in metrics if (arm, m) in by), default=0)
        cells = [_cell(by[(arm, m)]) if (arm, m) in by else "–" for m in metrics]
        lines.append(f"| {arm} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curves(results: list[dict], key: str) -> dict[str, tuple[list[int], list[float], list[float], list[float]]]:
    """arm -> (steps, mean, min, max) of log_history ``key`` over seeds, at the steps every seed logged."""
    per_arm: dict[str, list[dict[int, float]]] = {}
    for result in results:
        points = {e["step"]: float(e[key]) for e in result["log_history"] if key in e and "step" in e}
        if points:
            per_arm.setdefault(result["label"], []).append(points)
    out = {}
    for arm, seeds in per_arm.items():
        steps = sorted(set.intersection(*(set(p) for p in seeds)))
        vals = [[p[s] for p in seeds] for s in steps]
        out[arm] = (steps, [sum(v) / len(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals])
    return out


def _plot(results: list[dict], arms: list[str], keys: list[str], path: Path, title: str) -> list[str]:
    """Draw one panel per log_history key into ``path``; returns the keys no run logged (empty panels)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display (CI, ssh)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    empty = []
    fig, axes = plt.subplots(1, len(keys), figsize=(max(5.5 * len(keys), 8), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        data = curves(results, key)
        for i, arm in enumerate(arms):
            if arm in data:
                steps, mean, lo, hi = data[arm]
                if len(steps) == 1:  # a band of one point is invisible: show min..max as an error bar
                    ax.errorbar(steps, mean, yerr=[[mean[0] - lo[0]], [hi[0] - mean[0]]], label=arm,
                                color=f"C{i}", marker="o", capsize=4)
                    continue
                ax.plot(steps, mean, label=arm, color=f"C{i}", marker="o" if len(steps) < 12 else None)
                ax.fill_between(steps, lo, hi, color=f"C{i}", alpha=0.2)
        if not data:
            empty.append(key)
            ax.text(0.5, 0.5, f"no '{key}' logged by any arm", ha="center", va="center", transform=ax.transAxes)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole steps, also for one point
        ax.set_xlabel("step")
        ax.set_title(CURVES[key])
        ax.grid(alpha=0.3)
        if data:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return empty


def _empty_panel_note(key: str, png: str) -> str:
    why = {"loss": "no run logged a training step (a run shorter than training.logging_steps logs none)",
           "eval_loss": "no run evaluated (eval.metrics / eval_strategy, or no eval_file)",
           "damping/mean": "no arm has a damping to log (only TAM optimizers do)"}[key]
    return f"{png}: the {CURVES[key]} panel is empty: {why}"


def _stages_section(results: list[dict], arms: list[str]) -> list[str]:
    """report.md's per-stage table of staged runs: each stage's eval set right after that stage was trained and
    after the last stage (mean ± the half-width of its 95% interval over seeds), on the continual metric."""
    staged = [r for r in results if (r["summary"].get("continual") or {}).get("matrix")]
    if not staged:
        return []
    metric = staged[0]["summary"]["continual"]["metric"]
    names = [s["name"] for s in staged[0]["summary"]["stages"]]
    text = ["", "## Stages", "", f"{metric} on each stage's eval set, right after that stage and after the last "
            f"stage ({names[-1]}); forgetting and backward transfer are in the table above (continual_*).", "",
            "| arm | stage | seeds | after its stage | after the last stage |", "|---|---|---|---|---|"]
    for arm in arms:
        matrices = [r["summary"]["continual"]["matrix"] for r in staged if r["label"] == arm]
        for j, name in enumerate(names):
            cells = []
            for row in (j, -1):
                values = [m[row][j] for m in matrices if len(m) == len(names) and isinstance(m[row][j], (int, float))]
                mean, _, high = mean_ci(values) if values else (math.nan, math.nan, math.nan)
                cells.append(f"{_fmt(mean, mean)} ± {_fmt(high - mean, mean)}" if values else "–")
            text.append(f"| {arm} | {j + 1}. {name} | {len(matrices)} | {cells[0]} | {cells[1]} |")
    return text + [""]


def _diverged_section(bad: list[dict], results: list[dict], arms: list[str]) -> list[str]:
    """report.md's account of diverged runs: per arm how many seeds and which, with the step and reason."""
    text = ["", "## Diverged runs", "",
            f"{len(bad)} of {len(results)} runs diverged (non-finite loss, gradients or weights). They are left out of the "
            "means above (the seeds column counts finished runs only):", "",
            "| arm | diverged | seed | step | reason |", "|---|---|---|---|---|"]
    for arm in arms:
        mine = [r for r in bad if r["label"] == arm]
        of = len([r for r in results if r["label"] == arm])
        for r in mine:
            reason = r.get("diverged", "").split(". ")[0].replace("|", "/")
            text.append(f"| {arm} | {len(mine)} of {of} | {r['seed']} | {r.get('diverged_at_step')} | {reason} |")
    return text


def write_report(results: list[dict], arms: list[str], out: Path, title: str, command: str = "",
                 notes: list[str] = (), sections: list[str] = ()) -> tuple[dict[str, Path], list[str]]:
    """Write report.md, report.csv, runs.csv, loss.png and damping.png into ``out`` (``sections``: markdown lines
    placed after the table, e.g. the learning rates chosen by tuning); returns their paths and the
    notes a reader must see (``notes``, what the study changed in the recipe, plus every empty plot panel and
    why; report.md lists them too). Runs whose result says ``status: diverged`` stay out of every mean and plot:
    runs.csv marks their cells 'diverged' and report.md lists them."""
    out.mkdir(parents=True, exist_ok=True)
    order = lambda r: (arms.index(r["label"]), r["seed"])  # noqa: E731
    bad = sorted((r for r in results if r.get("status") == "diverged"), key=order)
    every, results = results, [r for r in results if r.get("status") != "diverged"]
    metrics, rows = aggregate(results, arms)
    seeds = sorted({r["seed"] for r in results})
    paths = {name: out / name for name in ("report.md", "report.csv", "runs.csv", "loss.png", "damping.png")}

    with paths["report.csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "metric", "n", "mean", "std", "ci95_low", "ci95_high", f"delta_vs_{arms[0]}", "delta_se",
                    "delta_ci95_low", "delta_ci95_high", "delta_n", "p_value", "seeds", "values"])
        for r in rows:
            w.writerow([r["arm"], r["metric"], r["n"], r["mean"], r["std"], r["ci_low"], r["ci_high"], r["delta"],
                        r["delta_se"], r["delta_low"], r["delta_high"], r["delta_n"], r["p_value"],
                        " ".join(map(str, r["seeds"])), " ".join(repr(v) for v in r["values"])])
    with paths["runs.csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "seed", *metrics])
        for r in sorted(results, key=order):
            m = run_metrics(r)
            w.writerow([r["label"], r["seed"], *(m.get(k, "") for k in metrics)])
        for r in bad:
            w.writerow([r["label"], r["seed"], *["diverged"] * len(metrics)])

    notes = list(notes)
    for png, keys in (("loss.png", ["loss", "eval_loss"]), ("damping.png", ["damping/mean"])):
        notes += [_empty_panel_note(key, png) for key in _plot(results, arms, keys, paths[png], title)]

    text = [f"# {title}", ""]
    if command:
        text += ["```", command, "```", ""]
    text += [f"Seeds: {', '.join(map(str, seeds))}. Cells: mean over seeds ± the half-width of its 95% confidence "
             "interval (Student t, n − 1 degrees of freedom; the seeds column is n); (Δ the difference to "
             f"**{arms[0]}** paired by seed, [its 95% CI], p of the paired t-test). An interval that contains 0 "
             "does not tell the arms apart at these seeds; n/a: one seed, no interval.",
             "", markdown_table(metrics, rows, arms), "", *sections, *([""] if sections else []),
             "![loss](loss.png)", "", "![damping](damping.png)", ""]
    text += _stages_section(results, arms)
    if notes:
        text += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    if bad:
        text += _diverged_section(bad, every, arms) + [""]
    paths["report.md"].write_text("\n".join(text))
    return paths, notes
