"""`compare`: planning (lrs by the transfer rule, the constant-damping control, sweeps), the report's numbers,
and real runs on the embedded tiny Llama: 2 optimizers x 2 seeds produce the tables and plots, a rerun skips
finished runs, a missing result is redone, a changed recipe replaces finished runs only with --overwrite."""

from __future__ import annotations

import csv
import json
import math
import shlex
from pathlib import Path

import pytest

import yaml

from tam_hf.commands import compare as command
from tam_hf.compare import runner, study
from tam_hf.compare.report import aggregate, curves
from tam_hf.finetune.config.load import load_recipe, validate_recipe
from tam_hf.finetune.errors import RecipeError
from tam_hf.finetune.training_args import build_training_arguments
from tam_hf.optim import AdaTAMW, registry
from tam_hf.optim.registry import OptimizerSpec
from hf_tiny import PoisonGradient

DEMO = Path(__file__).parents[1] / "recipes" / "examples" / "demo_tiny.yaml"
# Short runs with a mid-run evaluation, so the eval-loss curve has two points; no checkpoints, no generation.
FAST = ["training.max_steps=6", "training.logging_steps=2", "training.eval_strategy=steps", "training.eval_steps=3",
        'training.save_strategy="no"', "training.disable_tqdm=true", "eval.metrics=[perplexity]"]


def _sets(extra=()):
    return [a for s in (*FAST, *extra) for a in ("--set", s)]


# ------------------------------------------------------------------------------------------------ planning


def test_plan_lrs_follow_the_transfer_rule_and_control_gets_fixed_damping(tmp_path):
    labels, runs, _ = study.plan(DEMO, ["adamw", "adatamw", "constant-damping"], [0, 1], out=tmp_path)
    assert labels == ["adamw", "adatamw", "adatamw-const"]
    lr = {r.label: r.recipe.optimizer.lr for r in runs}
    # demo_tiny is adatamw at 2e-3 -> AdamW reference 2e-3 * 0.5 / (1 - 0.9) = 1e-2
    assert lr["adamw"] == pytest.approx(1e-2)
    assert lr["adatamw"] == pytest.approx(2e-3) and lr["adatamw-const"] == pytest.approx(2e-3)
    assert [r.seed for r in runs] == [0, 1, 0, 1, 0, 1]
    assert {r.recipe.training["seed"] for r in runs} == {0, 1}
    assert len({r.directory for r in runs}) == 6
    args = {r.label: build_training_arguments(r.recipe).to_dict() for r in runs if r.seed == 0}
    assert args["adamw"]["optim"] == "adamw_torch" and "decay_rate" not in (args["adamw"]["optim_args"] or "")
    assert "fixed_damping=0.5" in args["adatamw-const"]["optim_args"]
    assert "fixed_damping" not in (args["adatamw"]["optim_args"] or "")


def test_plan_sweep_multiplies_only_arms_it_applies_to(tmp_path):
    labels, runs, _ = study.plan(DEMO, ["adamw", "adatamw", "adatamw-const"], [0],
                                sweeps=["optimizer.decay_rate=0.5,0.99"], out=tmp_path)
    assert labels == ["adamw", "adatamw decay_rate=0.5", "adatamw decay_rate=0.99", "adatamw-const"]
    rate = {r.label: r.recipe.optimizer.kwargs().get("decay_rate") for r in runs}
    assert rate["adatamw decay_rate=0.5"] == 0.5 and rate["adatamw decay_rate=0.99"] == 0.99
    assert rate["adamw"] is None and rate["adatamw-const"] is None  # adamw has no decay_rate; d is held
    # A sweep no arm takes would be silently ignored (a typo of a key, or arms without it): refused, naming why
    with pytest.raises(RecipeError) as info:
        study.plan(DEMO, ["adamw", "adatamw-const"], [0], sweeps=["optimizer.decay_rate=0.5,0.99",
                                                              "optimizer.decy_rate=0.5,0.9"], out=tmp_path)
    assert "--sweep optimizer.decay_rate: no arm takes it (adamw, adatamw-const;" in str(info.value)
    assert "--sweep optimizer.decy_rate: no arm takes it" in str(info.value)
    with pytest.raises(RecipeError, match="decay_rate=nan: optimizer.decay_rate: nan is not a finite number"):
        study.plan(DEMO, ["adatamw"], [0], sweeps=["optimizer.decay_rate=.nan,0.5"], out=tmp_path)  # not str 'nan'


def test_plan_errors_are_collected(tmp_path):
    with pytest.raises(RecipeError, match="decay_rate.*1.5"):  # the recipe after --set is checked first
        study.plan(DEMO, ["adamw"], [0], sets=["optimizer.decay_rate=1.5"], out=tmp_path)
    with pytest.raises(RecipeError) as err:  # then every arm's problems, all at once
        study.plan(DEMO, ["tam", "adamw", "sgd"], [0], out=tmp_path)
    assert "tam@LR" in str(err.value) and "sgd@LR" in str(err.value) and len(err.value.problems) == 2
    labels, runs, _ = study.plan(DEMO, ["adamw", "tam@0.05", "adatamw", "adatamw@4e-4"], [0], out=tmp_path)
    assert labels == ["adamw", "tam@0.05", "adatamw", "adatamw@0.0004"]  # one optimizer at two lrs: two arms
    assert runs[1].recipe.optimizer.name == "tam" and runs[1].recipe.optimizer.lr == 0.05
    assert runs[3].recipe.optimizer.lr == 4e-4 and runs[2].recipe.optimizer.lr == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="unknown optimizer 'adamx'"):
        study.plan(DEMO, ["adamx"], [0], out=tmp_path)


def test_the_recipe_file_is_read_by_the_recipe_loader(tmp_path, capsys):
    twice = tmp_path / "twice.yaml"
    twice.write_text(DEMO.read_text() + "optimizer:\n  name: adamw\n  lr: 1.0e-2\n")  # YAML keeps the last silently
    with pytest.raises(RecipeError, match="duplicate key 'optimizer'"):
        study.plan(twice, ["adamw"], [0], out=tmp_path)
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("model: !!python/object/apply:os.getcwd []\n")
    assert command.main([str(tagged), "--out", str(tmp_path / "out")]) == 2
    assert "could not determine a constructor" in capsys.readouterr().err


def test_a_run_too_short_for_the_recipes_logging_is_logged_often_enough_to_draw(tmp_path, capsys):
    # demo_tiny logs every 25 steps: a 10-step run would log nothing and draw empty loss/damping plots
    _, runs, notes = study.plan(DEMO, ["adamw", "adatamw"], [0], sets=["training.max_steps=10"], out=tmp_path)
    assert {r.recipe.training["logging_steps"] for r in runs} == {1}
    assert len(notes) == 1 and "training.logging_steps=1" in notes[0] and "10-step run" in notes[0]
    _, runs, notes = study.plan(DEMO, ["adamw"], [0], sets=["training.max_steps=300"], out=tmp_path)
    assert runs[0].recipe.training["logging_steps"] == 25 and notes == []  # 12 points: the recipe's own
    _, runs, notes = study.plan(DEMO, ["adamw"], [0], sets=["training.max_steps=10", "training.logging_steps=5"],
                                out=tmp_path)
    assert runs[0].recipe.training["logging_steps"] == 5 and notes == []  # the user's own choice is kept
    # overrides may also be written as for the run command, after the recipe
    assert command.main([str(DEMO), "--optimizers", "adamw", "--seeds", "1", "--out", str(tmp_path / "o"),
                         "training.max_steps=10", "--dry-run"]) == 0
    assert "note: compare logs every 1 step(s)" in capsys.readouterr().out


class _HalfStep(OptimizerSpec):
    """A made-up entry whose transfer rule differs from AdaTAMW's, so its lr can only come from the registry."""

    def lr_factor(self, kwargs=None):
        return 0.5 * super().lr_factor(kwargs)


@pytest.fixture
def added_optimizer():
    spec = registry.add(_HalfStep("adatamw-half", AdaTAMW, "adam", torque=True, help="AdaTAMW at half the rule's lr"))
    yield spec
    registry.OPTIMIZERS.pop(spec.name)  # leave the registry as the other tests expect it


def test_every_registry_entry_is_an_arm_and_every_torque_entry_has_a_control():
    table = study.arms()
    for name, spec in registry.OPTIMIZERS.items():
        assert table[name].spec is spec and table[name].fixed_damping is None
        assert (name + "-const" in table) == (spec.torque and "fixed_damping" in spec.accepted_keys())
        if spec.torque:
            assert table[name + "-const"].spec is spec and table[name + "-const"].fixed_damping == 0.5
    assert {"tam-const", "adatam-const", "adatamw-const"} <= set(table)
    assert study.find_arm("constant-damping") == table["adatamw-const"]


def test_an_optimizer_added_to_the_registry_is_planned_with_no_other_edit(added_optimizer, tmp_path):
    assert {"adatamw-half", "adatamw-half-const"} <= set(study.arms())
    raw = yaml.safe_load(DEMO.read_text())
    base = validate_recipe(yaml.safe_load(DEMO.read_text()))
    arms, problems = study.expand(raw, base, ["adamw", "adatamw-half", "adatamw-half-const"])
    assert problems == []
    sections = {label: section["optimizer"] for label, _, section in arms}
    # demo_tiny: adatamw at 2e-3 -> AdamW 1e-2; the new entry's own rule gives half of adatamw's 2e-3
    assert sections["adamw"]["lr"] == pytest.approx(1e-2)
    assert sections["adatamw-half"] == {"name": "adatamw-half", "lr": pytest.approx(1e-3), "weight_decay": 0.01}
    assert sections["adatamw-half-const"]["fixed_damping"] == 0.5
    assert sections["adatamw-half-const"]["lr"] == pytest.approx(1e-3)
    # the whole plan: the recipe schema and the Trainer mapping read the registry too
    labels, runs, _ = study.plan(DEMO, ["adamw", "adatamw-half-const"], [0], out=tmp_path)
    assert labels == ["adamw", "adatamw-half-const"]
    assert runs[1].recipe.optimizer.name == "adatamw-half" and runs[1].recipe.optimizer.lr == pytest.approx(1e-3)
    assert "fixed_damping=0.5" in build_training_arguments(runs[1].recipe).to_dict()["optim_args"]


def test_seeds_argument():
    assert command.parse_seeds("3") == [0, 1, 2]
    assert command.parse_seeds("13,42") == [13, 42]
    assert command.parse_seeds("7,") == [7]
    with pytest.raises(ValueError, match="count >= 1"):
        command.parse_seeds("0")


@pytest.mark.parametrize("args, fragment", [
    (["--seeds", "3,3"], "--seeds: seed 3 is given twice"),  # one seed shown as two would shrink every interval
    (["--seeds", ","], "--seeds ',': no seed"),
    (["--seeds", "a,1"], "--seeds 'a,1': 'a' is not a whole number"),
    (["--optimizers", ","], "--optimizers ',': no optimizer"),
    (["--optimizers", "adamw,adatamw,adamw"], "--optimizers: 'adamw' is given twice"),
    (["--optimizers", "adatamw-const,constant-damping"], "'constant-damping' is the same arm as 'adatamw-const'"),
    (["--sweep", "optimizer.decay_rate=0.5,0.5"], "--sweep 'optimizer.decay_rate=0.5,0.5': 0.5 is given twice"),
])
def test_duplicate_or_empty_lists_exit_2_with_one_line(tmp_path, capsys, args, fragment):
    assert command.main([str(DEMO), "--out", str(tmp_path), "--dry-run", *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and "Traceback" not in err


def test_aggregate_mean_std_delta():
    def result(label, seed, loss, acc):
        return {"label": label, "seed": seed, "log_history": [],
                "summary": {"train_loss": loss, "eval": {"accuracy": acc}, "wall_s": 1.0}}

    results = [result("a", 0, 1.0, 0.5), result("a", 1, 3.0, 0.7), result("b", 0, 2.0, 0.9), result("b", 1, 2.0, 0.9)]
    metrics, rows = aggregate(results, ["a", "b"])
    assert metrics == ["train_loss", "eval_accuracy", "wall_s"]
    by = {(r["arm"], r["metric"]): r for r in rows}
    assert by["a", "train_loss"]["mean"] == 2.0 and by["a", "train_loss"]["std"] == pytest.approx(math.sqrt(2))
    assert math.isnan(by["a", "train_loss"]["delta"])  # the baseline has no delta to itself
    assert by["b", "eval_accuracy"]["delta"] == pytest.approx(0.3)
    assert by["b", "eval_accuracy"]["delta_se"] == pytest.approx(math.sqrt(0.02 / 2))


def test_confidence_intervals_and_paired_differences_match_scipy_on_fixed_numbers():
    from scipy import stats as scipy_stats

    from tam_hf.compare.stats import mean_ci, paired

    # t(0.975, 2 degrees of freedom) = 4.302652729911275: the interval is mean ± t * s / sqrt(n)
    mean, low, high = mean_ci([0.9, 0.85, 0.8])
    assert mean == pytest.approx(0.85) and high - mean == pytest.approx(4.302652729911275 * 0.05 / math.sqrt(3))
    assert (low, high) == pytest.approx(scipy_stats.t.interval(0.95, 2, loc=0.85, scale=scipy_stats.sem([0.9, 0.85, 0.8])))
    assert math.isnan(mean_ci([1.0])[1]) and mean_ci([2.0, 2.0]) == (2.0, 2.0, 2.0)

    base = {0: 0.50, 1: 0.70, 2: 0.60}
    arm = {2: 0.80, 0: 0.90, 1: 0.85, 5: 0.1}  # paired by seed, not by order; seed 5 has no partner
    d = paired(arm, base)
    assert d["delta_n"] == 3 and d["delta"] == pytest.approx(0.25)  # differences 0.40, 0.15, 0.20
    assert d["delta_se"] == pytest.approx(math.sqrt(0.0175 / 3))
    assert (d["delta_low"], d["delta_high"]) == pytest.approx(
        (0.25 - 4.302652729911275 * math.sqrt(0.0175 / 3), 0.25 + 4.302652729911275 * math.sqrt(0.0175 / 3)))
    assert d["p_value"] == pytest.approx(scipy_stats.ttest_rel([0.9, 0.85, 0.8], [0.5, 0.7, 0.6]).pvalue)
    assert d["p_value"] == pytest.approx(0.0820, abs=1e-4)  # t = 3.273 on 2 degrees of freedom
    one = paired({0: 1.0}, {0: 0.5})
    assert one["delta"] == 0.5 and math.isnan(one["delta_low"]) and math.isnan(one["p_value"])


def test_the_report_gives_intervals_paired_differences_and_n_in_every_row(tmp_path):
    from tam_hf.compare.report import write_report

    def result(label, seed, acc):
        return {"label": label, "seed": seed, "log_history": [], "summary": {"train_loss": 1.0, "eval": {"accuracy": acc}}}

    results = [result("adamw", s, a) for s, a in ((0, 0.5), (1, 0.7), (2, 0.6))]
    results += [result("adatamw", s, a) for s, a in ((0, 0.9), (1, 0.85), (2, 0.8))]
    paths, _ = write_report(results, ["adamw", "adatamw"], tmp_path, "t")
    rows = {(r["arm"], r["metric"]): r for r in _csv(paths["report.csv"])}
    row = rows["adatamw", "eval_accuracy"]
    assert float(row["ci95_low"]) == pytest.approx(0.85 - 4.302652729911275 * 0.05 / math.sqrt(3))
    assert float(row["delta_vs_adamw"]) == pytest.approx(0.25) and row["delta_n"] == "3"
    assert float(row["delta_ci95_high"]) == pytest.approx(0.25 + 4.302652729911275 * math.sqrt(0.0175 / 3))
    assert float(row["p_value"]) == pytest.approx(0.0820, abs=1e-4) and row["seeds"] == "0 1 2"
    assert rows["adamw", "eval_accuracy"]["p_value"] == "nan"  # the baseline has no difference to itself
    report = paths["report.md"].read_text()
    assert "| adatamw | 3 |" in report and "95% CI" in report and "paired by seed" in report
    assert "0.8500 ± 0.1242 (Δ +0.2500 [−0.0786, +0.5786], p 0.082)" in report


def test_an_empty_plot_panel_is_named_with_its_reason(tmp_path):
    from tam_hf.compare.report import write_report

    results = [{"label": "adamw", "seed": seed, "summary": {"train_loss": 1.0, "eval": {"loss": 2.0}},
                "log_history": [{"eval_loss": 2.0 + seed, "step": 10}]} for seed in (0, 1)]
    paths, notes = write_report(results, ["adamw"], tmp_path, "t", "tam-finetune compare r.yaml", ["planned note"])
    assert notes[0] == "planned note"
    assert any(n.startswith("loss.png: the train loss panel is empty") for n in notes)
    assert any(n.startswith("damping.png:") and "only TAM optimizers" in n for n in notes)
    assert not any("eval loss" in n for n in notes)  # one point is drawn
    report = paths["report.md"].read_text()
    assert "## Notes" in report and all(n in report for n in notes)


def _fake_finetune(monkeypatch, wall_s=2.0, seen=None):
    """The pipeline replaced by a run that trains nothing and returns a summary at once."""
    import tam_hf.finetune.pipeline as pipeline

    def finetune(recipe, callbacks=()):
        if seen is not None:
            seen.append(recipe.resume)
        return {"status": "completed", "optimizer": recipe.optimizer.name, "train_loss": 1.0, "wall_s": wall_s}

    monkeypatch.setattr(pipeline, "finetune", finetune)


def test_result_json_is_written_atomically(tmp_path, monkeypatch):
    import os

    _fake_finetune(monkeypatch)
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: replaced.append(Path(dst).name) or real_replace(src, dst))
    _, runs, _ = study.plan(DEMO, ["adamw"], [0], out=tmp_path)
    runner.execute(runs[0])
    assert {"result.json", "study.json"} <= set(replaced)  # a reader finds the old file or the whole new one
    assert runs[0].done


def test_a_truncated_result_means_not_finished_the_run_is_redone_with_a_note(tmp_path, monkeypatch, capsys):
    _fake_finetune(monkeypatch)
    argv = [str(DEMO), "--optimizers", "adamw", "--seeds", "2", "--out", str(tmp_path), "training.max_steps=4"]
    assert command.main(argv) == 0
    result = tmp_path / "runs" / "adamw" / "seed1" / "result.json"
    result.write_text(result.read_text()[:40])  # a full disk or a power cut in the middle of the write
    capsys.readouterr()
    assert command.main(argv) == 0
    out = capsys.readouterr()
    assert "1 finished, 1 to do" in out.out and "Traceback" not in out.err
    assert f"note: {result} is unreadable" in out.err and "the run is counted as not finished and redone" in out.err
    assert json.loads(result.read_text())["seed"] == 1


def test_the_wall_time_of_a_resumed_run_adds_up_its_parts(tmp_path, monkeypatch):
    from tam_hf.finetune.outputs import write_marker

    seen = []
    _fake_finetune(monkeypatch, wall_s=2.0, seen=seen)
    _, runs, _ = study.plan(DEMO, ["adamw"], [0], out=tmp_path)
    run = runs[0]
    run.directory.mkdir(parents=True)
    for step in (2, 4):
        (run.directory / f"checkpoint-{step}").mkdir()
        write_marker(run.directory / f"checkpoint-{step}", step)
    # the first attempt reached checkpoint-4 after 7.5 s, then was killed
    (run.directory / "study.json").write_text(json.dumps({"fingerprint": run.fingerprint,
                                                          "elapsed_s": {"2": 3.0, "4": 7.5}}))
    result = runner.execute(run)
    assert seen == [True]  # continued from the checkpoint
    assert result["summary"]["wall_s"] == pytest.approx(9.5)
    assert result["resumed_from"] == "checkpoint-4" and result["wall_s_parts"] == [7.5, 2.0]
    assert study.plan(DEMO, ["adamw"], [0], out=tmp_path).runs[0].done  # the next command finds it finished


_HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, f"{os.getpid()} elsewhere\\n".encode(), 0)
print("locked", flush=True)
time.sleep(120)
"""


def test_a_run_that_another_process_is_training_is_left_alone(tmp_path, monkeypatch):
    """Two compare commands into one folder: the second must not clear the run the first is training."""
    import subprocess
    import sys

    from tam_hf.finetune.errors import OutputDirError

    _fake_finetune(monkeypatch)
    run = study.plan(DEMO, ["adamw"], [0], out=tmp_path).runs[0]
    run.directory.mkdir(parents=True)
    (run.directory / "study.json").write_text(json.dumps({"fingerprint": run.fingerprint, "elapsed_s": {}}))
    (run.directory / "model.safetensors").write_text("the other process's weights")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run.directory / ".tam_hf.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirError, match=f"in use by another run \\(pid {holder.pid} on elsewhere"):
            runner.execute(run)
    finally:
        holder.kill()
        holder.wait()
    assert (run.directory / "model.safetensors").read_text() == "the other process's weights"
    assert not run.result_path.exists()
    result = runner.execute(run)  # the holder is gone (its lock with it): the run is done here
    assert result["status"] == "completed" and not (run.directory / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------ real runs


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_compare_two_optimizers_two_seeds_then_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    argv = [str(DEMO), "--optimizers", "adamw,adatamw", "--seeds", "2", "--out", str(out), *_sets()]
    assert command.main(argv) == 0

    rows = _csv(out / "report.csv")
    assert {(r["arm"], r["metric"]) for r in rows} >= {
        (a, m) for a in ("adamw", "adatamw") for m in ("train_loss", "eval_loss", "eval_perplexity")}
    assert {r["metric"] for r in rows if r["arm"] == "adatamw"} >= {"damping_mean"}
    assert "damping_mean" not in {r["metric"] for r in rows if r["arm"] == "adamw"}
    assert all(r["n"] == "2" for r in rows)
    loss = {r["arm"]: r for r in rows if r["metric"] == "train_loss"}
    assert loss["adamw"]["delta_vs_adamw"] == "nan" and loss["adatamw"]["delta_vs_adamw"] != "nan"
    runs = _csv(out / "runs.csv")
    assert [(r["arm"], r["seed"]) for r in runs] == [("adamw", "0"), ("adamw", "1"), ("adatamw", "0"), ("adatamw", "1")]
    assert runs[0]["train_loss"] != runs[1]["train_loss"]  # the seeds really differ

    table = (out / "report.md").read_text()
    assert "tam-finetune compare " + shlex.join(argv) in table  # the command as typed, to be pasted again
    assert "| adamw | 2 |" in table and "| adatamw | 2 |" in table and "(Δ " in table and " ± " in table
    for png in ("loss.png", "damping.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000

    result = json.loads((out / "runs" / "adatamw" / "seed0" / "result.json").read_text())
    assert curves([result], "eval_loss")["adatamw"][0][:2] == [3, 6]
    assert len(curves([result], "damping/mean")["adatamw"][0]) == 3  # steps 2, 4, 6
    assert not list((out / "runs" / "adatamw" / "seed0").glob("*.safetensors"))  # weights pruned

    # Rerun: nothing trains.
    calls = []
    monkeypatch.setattr(runner, "execute", lambda run, keep_models=False: calls.append(run) or {})
    capsys.readouterr()
    assert command.main(argv) == 0
    assert calls == [] and "4 finished, 0 to do" in capsys.readouterr().out

    # A run without its result, and every run of a changed recipe, are redone.
    (out / "runs" / "adamw" / "seed1" / "result.json").unlink()
    command.main(argv + ["--report-only"])  # report-only trains nothing either
    assert calls == []
    command.main(argv + ["--dry-run"])
    assert "3 finished, 1 to do" in capsys.readouterr().out
    command.main(argv + ["--dry-run", "--set", "training.disable_tqdm=false"])  # cosmetic: still finished
    assert "3 finished, 1 to do" in capsys.readouterr().out

    # A changed recipe would replace the 3 finished runs: compare stops before training, names what changed and
    # leaves them as they are; --report-only says they are left out; --overwrite replaces them.
    kept = (out / "runs" / "adamw" / "seed0" / "result.json").read_bytes()
    changed = argv + ["--set", "training.max_steps=7", "--set", "optimizer.weight_decay=0.1"]
    for extra in ([], ["--dry-run"]):
        assert command.main(changed + extra) == 2
        err = capsys.readouterr().err
        assert "holds 3 finished run(s) of another recipe" in err and "(adamw seed 0, adatamw seed 0, adatamw seed 1)" in err
        assert "  - optimizer.weight_decay: 0.01 -> 0.1\n  - training.max_steps: 6 -> 7\n" in err
        assert "--overwrite" in err and calls == []
    assert (out / "runs" / "adamw" / "seed0" / "result.json").read_bytes() == kept
    command.main(changed + ["--report-only"])
    assert "3 run folder(s) hold finished runs of another recipe: not in this report" in capsys.readouterr().err
    command.main(changed + ["--overwrite"])
    assert len(calls) == 4 and "0 finished, 4 to do" in capsys.readouterr().out
    (out / "runs" / "adamw" / "seed0" / "recipe.yaml").unlink()  # still refused, with what cannot be shown
    assert command.main(changed) == 2 and "recipe.yaml is missing or unreadable" in capsys.readouterr().err


def test_constant_damping_control_holds_half(tmp_path):
    out = tmp_path / "ctl"
    argv = [str(DEMO), "--optimizers", "adatamw-const", "--seeds", "1", "--out", str(out),
            *_sets(["training.max_steps=4"])]
    assert command.main(argv) == 0
    result = json.loads((out / "runs" / "adatamw-const" / "seed0" / "result.json").read_text())
    assert result["summary"]["damping"]["mean"] == pytest.approx(0.5)
    assert result["summary"]["damping"]["min"] == pytest.approx(0.5)
    logged = [e["damping/mean"] for e in result["log_history"] if "damping/mean" in e]
    assert logged and all(d == pytest.approx(0.5) for d in logged)
    # the control's resolved recipe is a valid recipe: it can be rerun on its own
    saved = load_recipe(out / "runs" / "adatamw-const" / "seed0" / "recipe.yaml")
    assert saved.optimizer.fixed_damping == 0.5


def test_tam_finetune_compare_dispatches_to_compare(tmp_path, capsys):
    from tam_hf import cli

    argv = ["compare", str(DEMO), "--optimizers", "adamw,adatamw", "--seeds", "2", "--out", str(tmp_path),
            "--dry-run"]
    assert cli.main(argv) == 0
    assert "0 finished, 4 to do" in capsys.readouterr().out
    assert cli.main(["run", str(DEMO), "--validate"]) == 0  # `run` may be spelled out; the default without it
    assert "valid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    overview = capsys.readouterr().out
    assert all(f"  {name} " in overview for name in cli.COMMANDS)
    for name in ("eval", "push"):
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        assert f"usage: tam-finetune {name}" in capsys.readouterr().out


def test_run_errors_end_in_their_exit_code_and_bugs_keep_their_traceback(monkeypatch, capsys, tmp_path):
    """The run command (tam_hf.commands.run): a known error, or any error carrying an int ``exit_code``, is a
    message and that code (its ``summary`` printed first); anything else propagates."""
    import tam_hf.finetune.pipeline
    from tam_hf import cli
    from tam_hf.finetune.errors import DataError

    class Diverged(RuntimeError):
        exit_code = 1
        summary = {"optimizer": "adatamw", "steps": 7, "train_loss": float("nan"), "output_dir": "out"}

    def raising(exc):
        def finetune(recipe, callbacks=()):
            raise exc
        return finetune

    cases = [(DataError("row 3 has no 'completion'"), 1, "data does not fit the recipe: row 3"),
             (KeyboardInterrupt(), 130, "aborted"), (Diverged("loss is nan at step 7"), 1, "loss is nan at step 7")]
    for exc, code, message in cases:
        monkeypatch.setattr(tam_hf.finetune.pipeline, "finetune", raising(exc))
        assert cli.main([str(DEMO), f"training.output_dir={tmp_path}"]) == code
        out = capsys.readouterr()
        assert message in out.err and "Traceback" not in out.err
    assert "steps: 7" in out.out  # the Diverged run's own summary came first
    for name, code in (("SIGTERM", 143), ("SIGINT", 130)):  # stopped at a step end: summary, then 128 + signal
        summary = {"optimizer": "adatamw", "steps": 3, "train_loss": 1.0, "output_dir": "out", "interrupted": True,
                   "signal": name, "checkpoint": "out/checkpoint-3", "status": "interrupted", "phase": "train",
                   "kept": "trained to step 3, the last complete checkpoint is out/checkpoint-3"}
        monkeypatch.setattr(tam_hf.finetune.pipeline, "finetune", lambda recipe, callbacks=(), s=summary: s)
        assert cli.main([str(DEMO), f"training.output_dir={tmp_path}"]) == code
        printed = capsys.readouterr().out
        assert f"interrupted ({name}) in the train phase: trained to step 3" in printed and "resume=true" in printed
    monkeypatch.setattr(tam_hf.finetune.pipeline, "finetune", raising(ZeroDivisionError("a bug")))
    with pytest.raises(ZeroDivisionError):
        cli.main([str(DEMO), f"training.output_dir={tmp_path}"])


def test_compare_stops_on_a_run_error_with_its_exit_code(tmp_path, monkeypatch, capsys):
    from tam_hf.finetune.errors import DataError

    def execute(run, keep_models=False):
        raise DataError("row 3 has no 'completion'")

    monkeypatch.setattr(runner, "execute", execute)
    argv = [str(DEMO), "--optimizers", "adamw", "--seeds", "1", "--out", str(tmp_path)]
    assert command.main(argv) == 1
    err = capsys.readouterr().err
    assert "adamw seed 0: error: data does not fit the recipe: row 3" in err and "rerun the same command" in err


def test_a_diverged_run_is_a_result_the_study_goes_on_and_a_rerun_does_not_retry_it(tmp_path, monkeypatch, capsys):
    import tam_hf.finetune.pipeline as pipeline

    real = pipeline.finetune

    def finetune(recipe, callbacks=()):  # seed 1 diverges at step 3, for real (the run's own guard stops it)
        return real(recipe, callbacks=[*callbacks, *([PoisonGradient(3)] if recipe.training["seed"] == 1 else [])])

    monkeypatch.setattr(pipeline, "finetune", finetune)
    out = tmp_path / "cmp"
    argv = [str(DEMO), "--optimizers", "adatamw", "--seeds", "3", "--out", str(out), *_sets()]
    assert command.main(argv) == 0
    printed = capsys.readouterr().out
    assert "[2/3] diverged at step 3 (a result: recorded, not retried)" in printed and "[3/3] finished" in printed

    result = json.loads((out / "runs" / "adatamw" / "seed1" / "result.json").read_text())
    assert result["status"] == "diverged" and result["diverged_at_step"] == 3 and "step 3" in result["diverged"]
    assert result["summary"]["train_loss"] is None and result["summary"]["eval"] is None
    assert not list((out / "runs" / "adatamw" / "seed1").glob("checkpoint-*"))  # pruned like a finished run
    rows = {r["metric"]: r for r in _csv(out / "report.csv")}
    assert rows["train_loss"]["n"] == "2"  # the means are over the two finished seeds
    runs = {r["seed"]: r for r in _csv(out / "runs.csv")}
    assert runs["1"]["train_loss"] == "diverged" and runs["0"]["train_loss"] not in ("", "diverged")
    report = (out / "report.md").read_text()
    assert "## Diverged runs" in report and "1 of 3 runs diverged" in report and "| adatamw | 1 of 3 | 1 | 3 |" in report

    monkeypatch.setattr(runner, "execute", lambda run, keep_models=False: pytest.fail("nothing may be retried"))
    assert command.main(argv) == 0
    assert "3 finished, 0 to do" in capsys.readouterr().out
