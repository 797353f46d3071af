"""`tam-finetune` end to end: the offline demo through the console script, and bad recipes answered with
exit code 2, every problem on stderr and no traceback, before anything is loaded."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tam_hf.finetune.pipeline
from tam_hf.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "examples" / "demo_tiny.yaml"


def _run(args, cwd):
    exe = shutil.which("tam-finetune") or "tam-finetune"
    return subprocess.run([exe, *args] if args[0] != "cli.py" else [sys.executable, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})


def test_demo_runs_offline_through_the_console_script(tmp_path):
    out = tmp_path / "demo"
    proc = _run([str(DEMO), "training.max_steps=40", "training.save_steps=20", "training.logging_steps=10", f"training.output_dir={out}"], ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "== tam-finetune summary ==" in proc.stdout and "damping: mean" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 40
    assert summary["eval"]["perplexity"] == math.exp(summary["eval"]["loss"])  # perplexity of the eval loss itself
    answered = summary["eval"]["exact_match"] * 32  # all 32 embedded eval rows are generated for
    assert abs(answered - round(answered)) < 1e-9 and 0 <= round(answered) <= 32
    history = json.loads((out / "checkpoint-40" / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0]  # it learns
    assert any("damping/mean" in h for h in history)  # TAM telemetry reached the logs
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["training"]["max_steps"] == 40 and resolved["optimizer"]["name"] == "adatamw"


BAD_RECIPE = """\
model: {name: embedded:tiny-llama, quantisation: 4bit}
data: {format: prompt_completion, train_file: missing.jsonl}
optimizer: {name: adamtam, lr: 1e-3}
finetune: {method: full, lora: {r: 8}}
training: {num_train_epoch: 1}
"""


def test_bad_recipe_exits_2_with_every_problem_and_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_RECIPE)
    proc = _run(["cli.py", str(path)], ROOT)  # through the top-level shim: the same entry point
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for fragment in ("model.quantisation: unknown key (did you mean 'quantization'?)",
                     "data.train_file: file not found: missing.jsonl",
                     "optimizer.name: 'adamtam' is not one of", "finetune.lora is set but finetune.method is full",
                     "training.num_train_epoch: not a TrainingArguments field (did you mean 'num_train_epochs'?)"):
        assert fragment in proc.stderr, proc.stderr
    assert not (tmp_path / "outputs").exists() and proc.stdout == ""


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("training must not start")

    monkeypatch.setattr(tam_hf.finetune.pipeline, "finetune", refuse)


def test_validate_prints_resolved_recipe_and_loads_nothing(no_training, capsys):
    assert main([str(DEMO), "--validate", "optimizer.lr=3e-3"]) == 0
    out = capsys.readouterr()
    resolved = yaml.safe_load(out.out)
    assert resolved["optimizer"]["lr"] == 3e-3 and resolved["training"]["output_dir"] == "outputs/demo_tiny"
    assert "valid" in out.err


def test_output_dir_override_without_its_section_names_the_section(no_training, capsys):
    assert main([str(DEMO), "output_dir=outputs/other"]) == 2
    assert "output_dir: unknown key (did you mean 'training.output_dir'?)" in capsys.readouterr().err


@pytest.mark.parametrize("text, fragment", [
    ("model: !!python/object/apply:os.getcwd []\n", "could not determine a constructor"),
    ("- just\n- a list\n", "the top level must be a mapping"),
    ("model: {name: [unclosed\n", "YAML could not be read"),
])
def test_unreadable_recipes_exit_2(tmp_path, capsys, no_training, text, fragment):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert main([str(path)]) == 2
    assert fragment in capsys.readouterr().err


_BOMB = "\n".join(['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
                  + [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]) + "\n"


@pytest.mark.parametrize("text, fragment", [
    (_BOMB, "more than 100000 values once aliases are expanded"),  # ran 87 s into a MemoryError
    ("model: " + "[" * 1000 + "]" * 1000 + "\n", "nested deeper than 32 levels"),  # was a RecursionError
    ("model: {name: embedded:tiny-llama}\nmodel: {name: x}\n", "found duplicate key 'model' (first at line 1)"),
])
def test_hostile_yaml_exits_2_without_traceback(tmp_path, capsys, no_training, text, fragment):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err


@pytest.mark.parametrize("override, fragment", [
    ("optimizer.lr=.inf", "optimizer.lr: inf is not a finite number"),
    ("optimizer.weight_decay=.nan", "optimizer.weight_decay: nan is not a finite number"),
    ("training.max_steps=-5", "training.max_steps: -5 must be -1 (no limit) or > 0"),
    ("training.per_device_train_batch_size=0", "training.per_device_train_batch_size: 0 must be >= 1"),
    ("training.output_dir={tmp}/a_file/run", "training.output_dir: {tmp}/a_file is a file, not a directory"),
])
def test_out_of_range_override_exits_2(capsys, no_training, tmp_path, override, fragment):
    (tmp_path / "a_file").write_text("x")
    assert main([str(DEMO), override.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err
    assert fragment.format(tmp=tmp_path) in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # validation created nothing


def test_printed_config_takes_overrides_of_every_section(tmp_path, capsys, no_training):
    # `--print-config` writes `lora: null` for a full fine-tune; `finetune.lora.r=8` on it used to fail
    assert main([str(DEMO), "--validate"]) == 0
    written = tmp_path / "resolved.yaml"
    written.write_text(capsys.readouterr().out)
    assert main([str(written), "--validate", "finetune.method=lora", "finetune.lora.r=8",
                 "distributed.deepspeed=null", "optimizer.betas=[0.8, 0.99]"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["finetune"]["lora"]["r"] == 8 and resolved["optimizer"]["betas"] == [0.8, 0.99]
    assert resolved["distributed"] == {"accelerate_config": None, "deepspeed": None}


def test_training_arguments_own_checks_exit_2(capsys, no_training):
    assert main([str(DEMO), "training.eval_strategy=steps", "training.save_strategy=epoch",
                 "training.load_best_model_at_end=true"]) == 2
    err = capsys.readouterr().err
    assert "training: " in err and "load_best_model_at_end" in err and "Traceback" not in err


def test_bad_override_and_missing_file_exit_2(capsys, no_training, tmp_path):
    assert main([str(DEMO), "optimizer.lr"]) == 2
    assert "expected key.path=value" in capsys.readouterr().err
    assert main([str(tmp_path / "nope.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err


def test_print_config_then_summary_and_data_error_exit_1(monkeypatch, capsys):
    from tam_hf.finetune.errors import DataError

    fake = {"output_dir": "outputs/demo_tiny", "steps": 7, "train_loss": 1.25, "optimizer": "adatamw",
            "eval": {"loss": 1.5, "exact_match": 0.25}, "wall_s": 3.0,
            "damping": {"mean": 0.55, "min": 0.4, "max": 0.7, "frac_below_half": 0.25}}
    monkeypatch.setattr(tam_hf.finetune.pipeline, "finetune", lambda recipe: fake)
    assert main([str(DEMO), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out.split("\n== tam-finetune summary ==")[0])["model"]["name"] == "embedded:tiny-llama"
    for line in ("final train loss: 1.2500", "eval exact_match: 0.2500", "damping: mean 0.550", "below 0.5: 25%",
                 "outputs: outputs/demo_tiny"):
        assert line in out, out

    def bad_data(recipe):
        raise DataError("train data has no column(s) ['prompt']")

    monkeypatch.setattr(tam_hf.finetune.pipeline, "finetune", bad_data)
    assert main([str(DEMO)]) == 1
    assert "data does not fit the recipe: train data has no column(s) ['prompt']" in capsys.readouterr().err
