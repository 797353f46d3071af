"""compare --tune-lr: per-arm grids, the choice on the validation split (never the eval set), the edge flag, and
the tuned study end to end on the tiny model."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from tam_hf.commands import compare as command
from tam_hf.compare import runner, study
from tam_hf.compare.tuning import (MAX_EXTENSIONS, TUNING_SEED, auto_grid, beyond_edge, choose, chosen_section,
                                   default_metric, parse_tune_lr)
from tam_hf.finetune.errors import RecipeError

DEMO = Path(__file__).parents[1] / "recipes" / "examples" / "demo_tiny.yaml"
FAST = ["training.max_steps=4", "training.logging_steps=2", 'training.save_strategy="no"',
        "training.disable_tqdm=true", "eval.metrics=[perplexity]", "data.validation_split=0.25"]


def _sets(extra=()):
    return [a for s in (*FAST, *extra) for a in ("--set", s)]


def _result(validation: dict | None, eval_: dict, status="completed"):
    return {"status": status, "summary": {"validation": validation, "eval": eval_}}


# ------------------------------------------------------------------------------------------------ choosing


def test_auto_grid_is_five_points_spaced_by_three_around_the_arms_lr():
    grid = auto_grid(4e-5)
    assert len(grid) == 5 and grid[2] == 4e-5
    assert all(math.isclose(b / a, 3.0, rel_tol=0.01) for a, b in zip(grid, grid[1:]))


def test_tune_lr_values():
    assert parse_tune_lr(None) is None and parse_tune_lr("auto") == "auto"
    assert parse_tune_lr("3e-5,1e-5") == [1e-5, 3e-5]
    for bad, words in (("1e-5", "at least two"), ("1e-5,x", "not a number"), ("1e-5,-1", "positive"),
                       ("1e-5,1e-5", "twice"), ("1e-5,inf", "finite")):
        with pytest.raises(ValueError, match=words):
            parse_tune_lr(bad)
    with pytest.raises(ValueError) as err:  # every bad entry in one message, not the first alone
        parse_tune_lr("1e-3,abc,-1,1e-3,nan")
    assert all(w in str(err.value) for w in ("'abc' is not a number", "-1 is not a positive", "1e-3 is given twice",
                                             "nan is not a positive"))


def test_the_choice_follows_validation_even_where_the_eval_set_disagrees():
    # lr 1e-4 is best on validation, 3e-4 on the eval set: the eval set must not decide.
    results = {1e-4: [_result({"loss": 1.0, "accuracy": 0.9}, {"loss": 2.0, "accuracy": 0.5})],
               3e-4: [_result({"loss": 1.5, "accuracy": 0.7}, {"loss": 0.5, "accuracy": 0.99})],
               1e-3: [_result({"loss": 1.2, "accuracy": 0.8}, {"loss": 0.1, "accuracy": 1.0})]}
    assert choose("adamw", [1e-4, 3e-4, 1e-3], "loss", results).lr == 1e-4
    assert choose("adamw", [1e-4, 3e-4, 1e-3], "accuracy", results).lr == 1e-4  # higher is better


def test_means_over_tuning_seeds_ties_and_diverged_lrs():
    results = {1e-4: [_result({"loss": 1.0}, {}), _result({"loss": 3.0}, {})],   # mean 2.0
               3e-4: [_result({"loss": 1.5}, {}), _result({"loss": 1.9}, {})],   # mean 1.7: best
               1e-3: [_result({"loss": 0.1}, {}), _result(None, {}, status="diverged")]}
    choice = choose("adatamw", [1e-4, 3e-4, 1e-3], "loss", results)
    assert choice.lr == 3e-4 and choice.scores[1e-4] == 2.0 and choice.scores[1e-3] is None and choice.edge is None
    tie = choose("x", [1e-4, 3e-4], "loss", {1e-4: [_result({"loss": 1.0}, {})], 3e-4: [_result({"loss": 1.0}, {})]})
    assert tie.lr == 1e-4  # the smaller lr on a tie
    nothing = choose("x", [1e-4, 3e-4], "loss", {1e-4: [_result(None, {}, "diverged")]})
    assert nothing.lr is None and "no lr finished" in "\n".join(chosen_section([nothing], [TUNING_SEED], "v"))


def test_a_choice_at_the_edge_of_the_grid_is_flagged():
    results = {lr: [_result({"loss": lr}, {})] for lr in (1e-4, 3e-4, 1e-3)}  # smallest lr is best
    low = choose("adamw", sorted(results), "loss", results)
    high = choose("adatamw", sorted(results), "accuracy", {lr: [_result({"accuracy": lr}, {})] for lr in results})
    assert (low.lr, low.edge, high.lr, high.edge) == (1e-4, "low", 1e-3, "high")
    text = "\n".join(chosen_section([low, high], [TUNING_SEED], "data.validation_split 0.1"))
    assert "at the grid's low edge" in text and "at the grid's high edge" in text and "never the eval set" in text


# ------------------------------------------------------------------------------------------------ planning


def test_plan_tuned_grids_folders_and_seeds(tmp_path):
    tuned = study.plan_tuned(DEMO, ["adamw", "adatamw@1e-4|3e-4"], "auto", [TUNING_SEED], None, FAST, out=tmp_path)
    assert tuned.labels == ["adamw", "adatamw"] and tuned.metric == "perplexity"
    centre = 2e-3 / 0.2  # the recipe's adatamw lr, back through the transfer rule to AdamW
    assert tuned.grids["adamw"] == auto_grid(centre) and tuned.grids["adatamw"] == [1e-4, 3e-4]
    assert len(tuned.runs) == 7 and {r.seed for r in tuned.runs} == {TUNING_SEED}
    assert tuned.runs[0].directory == tmp_path / "tuning" / "adamw" / f"lr{auto_grid(centre)[0]:.3g}" / f"seed{TUNING_SEED}"
    final = study.final_runs(tuned, {"adamw": 1e-2, "adatamw": None}, [0, 1])
    assert [(r.label, r.seed, r.recipe.optimizer.lr) for r in final] == [("adamw", 0, 1e-2), ("adamw", 1, 1e-2)]
    assert final[0].directory == tmp_path / "runs" / "adamw" / "seed0"
    with pytest.raises(ValueError, match="share seed"):
        study.final_runs(tuned, {"adamw": 1e-2}, [TUNING_SEED])


def test_tuning_refuses_what_would_make_it_unfair(tmp_path):
    no_validation = [s for s in FAST if "validation" not in s]
    with pytest.raises(RecipeError) as info:
        study.plan_tuned(DEMO, ["adamw", "adatamw"], "auto", [TUNING_SEED], "accuracy", no_validation, out=tmp_path)
    assert "never on the eval set" in str(info.value) and "--select accuracy" in str(info.value)
    with pytest.raises(ValueError, match="no untuned arm"):
        study.plan(DEMO, ["adamw", "adatamw@1e-4|3e-4"], [0], FAST, out=tmp_path)
    with pytest.raises(ValueError, match="is the same arm"):  # tuned, the lr is chosen: one arm, not two
        study.plan_tuned(DEMO, ["adatamw@1e-4", "adatamw"], "auto", [TUNING_SEED], None, FAST, out=tmp_path)


def test_default_selection_metric():
    from tam_hf.finetune.config.load import load_recipe

    assert default_metric(load_recipe(DEMO)) == "perplexity"
    assert default_metric(load_recipe(DEMO, ["eval.metrics=[]"])) == "loss"


# ------------------------------------------------------------------------------------------------ end to end


def test_a_tuned_study_chooses_on_validation_then_scores_fresh_seeds(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cmp"
    argv = [str(DEMO), "--optimizers", "adamw@3e-3|1e-2,adatamw@1e-3|3e-3", "--tune-lr", "auto", "--seeds", "2",
            "--select", "loss", "--out", str(out), *_sets()]
    assert command.main(argv) == 0
    tuning = list(csv.DictReader((out / "tuning.csv").open()))
    assert [(r["arm"], float(r["lr"]), r["seed"]) for r in tuning] == [
        ("adamw", 3e-3, "1000"), ("adamw", 1e-2, "1000"), ("adatamw", 1e-3, "1000"), ("adatamw", 3e-3, "1000")]
    chosen = {}
    for arm in ("adamw", "adatamw"):
        rows = [r for r in tuning if r["arm"] == arm]
        best = min(rows, key=lambda r: float(r["validation_loss"]))
        assert [r["chosen"] for r in rows] == [str(r is best) for r in rows]
        chosen[arm] = float(best["lr"])
    runs = list(csv.DictReader((out / "runs.csv").open()))
    assert [(r["arm"], r["seed"]) for r in runs] == [("adamw", "0"), ("adamw", "1"), ("adatamw", "0"), ("adatamw", "1")]
    for arm in chosen:
        result = runner.read_result(out / "runs" / arm / "seed0" / "result.json")
        assert result["lr"] == chosen[arm] and "validation" in result["summary"]
    report = (out / "report.md").read_text()
    assert "## Learning rates chosen" in report and "edge" in report  # a grid of two: the choice is at an edge
    assert (out / "tuning.png").read_bytes()[:4] == b"\x89PNG"

    calls = []  # a rerun trains nothing
    monkeypatch.setattr(runner, "execute", lambda run, keep_models=False: calls.append(run) or {})
    assert command.main(argv) == 0 and calls == []


def test_an_auto_grid_follows_a_choice_at_its_edge_a_few_points_at_most(tmp_path):
    tuned = study.plan_tuned(DEMO, ["adamw", "adatamw@1e-4|3e-4"], "auto", [TUNING_SEED], None, FAST, out=tmp_path)
    grid = list(tuned.grids["adamw"])
    low = choose("adamw", grid, "loss", {lr: [_result({"loss": lr}, {})] for lr in grid})  # smallest lr best
    edge = choose("adatamw", [1e-4, 3e-4], "loss", {lr: [_result({"loss": lr}, {})] for lr in (1e-4, 3e-4)})
    runs = study.extend_tuned(tuned, [low, edge])
    below = float(f"{grid[0] / 3:.3g}")
    # adatamw's own grid is the user's: flagged, not extended
    assert [(r.label, r.recipe.optimizer.lr, r.seed) for r in runs] == [("adamw", below, TUNING_SEED)]
    assert runs[0].directory == tmp_path / "tuning" / "adamw" / f"lr{below:.3g}" / f"seed{TUNING_SEED}"
    assert tuned.grids["adamw"] == [below, *grid] and tuned.extended == {"adamw": {"low": 1}}
    assert runs[0] in tuned.runs and tuned.grids["adatamw"] == [1e-4, 3e-4]
    inside = choose("adamw", tuned.grids["adamw"], "loss", {lr: [_result({"loss": abs(lr - grid[0])}, {})]
                                                             for lr in tuned.grids["adamw"]}, tuned.extended["adamw"])
    assert inside.lr == grid[0] and inside.edge is None and study.extend_tuned(tuned, [inside]) == []
    assert "grid extended by 1 lr(s) below" in "\n".join(chosen_section([inside], [TUNING_SEED], "v"))
    spent = choose("adamw", tuned.grids["adamw"], "loss", {}, {"low": MAX_EXTENSIONS})
    spent.lr = min(spent.grid)
    assert spent.edge == "low" and beyond_edge(spent) is None  # the extensions are used up: flagged instead
