"""data.validation_split / data.validation_file: a held-out set for choosing among runs, never the eval set."""

import json

import pytest

from hf_tiny import read_summary, run_raw
from tam_hf.finetune.config.load import validate_recipe
from tam_hf.finetune.config.schema import DataConfig
from tam_hf.finetune.data import load_raw
from tam_hf.finetune.errors import RecipeError


def _rows(path, n):
    path.write_text("".join(json.dumps({"prompt": f"q{i} ", "completion": f"a{i}"}) + "\n" for i in range(n)))
    return str(path)


def test_validation_is_carved_from_train_apart_from_eval_the_same_every_time(tmp_path):
    cfg = DataConfig(format="prompt_completion", train_file=_rows(tmp_path / "t.jsonl", 100), eval_fraction=0.2,
                     validation_split=0.1)
    raw = load_raw(cfg)
    assert (len(raw["train"]), len(raw["eval"]), len(raw["validation"])) == (72, 20, 8)
    prompts = {split: set(raw[split]["prompt"]) for split in raw}
    assert not prompts["validation"] & prompts["train"] and not prompts["validation"] & prompts["eval"]
    assert set().union(*prompts.values()) == {f"q{i} " for i in range(100)}
    assert load_raw(cfg)["validation"]["prompt"] == raw["validation"]["prompt"]  # every run selects on the same rows


@pytest.mark.parametrize("settings, message", [
    (dict(validation_split=0.95), "data.validation_split 0.95 of the 10 training rows leaves none to train on"),
    (dict(eval_fraction=0.5, validation_split=0.9), "data.validation_split 0.9 of the 5 training rows left after "
                                                     "data.eval_fraction leaves none to train on"),
])
def test_a_split_that_leaves_no_training_row_is_a_data_error(tmp_path, settings, message):
    from tam_hf.finetune.errors import DataError

    cfg = DataConfig(format="prompt_completion", train_file=_rows(tmp_path / "t.jsonl", 10), **settings)
    with pytest.raises(DataError, match=message):
        load_raw(cfg)


def test_the_cli_names_the_split_that_leaves_nothing_and_prints_a_true_summary(tmp_path, capsys):
    from pathlib import Path

    from tam_hf.commands.run import main

    demo = Path(__file__).parents[1] / "recipes" / "examples" / "demo_tiny.yaml"
    assert main([str(demo), "data.validation_split=0.999", f"training.output_dir={tmp_path / 'out'}"]) == 1
    out = capsys.readouterr()
    assert "data.validation_split 0.999 of the 168 training rows leaves none to train on" in out.err
    assert "optimizer: adatamw" in out.out and "None" not in out.out and "Traceback" not in out.err
    assert f"outputs: {tmp_path / 'out'} (summary.json; the run failed in its build phase)" in out.out


def test_validation_file_is_its_own_split(tmp_path):
    cfg = DataConfig(format="prompt_completion", train_file=_rows(tmp_path / "t.jsonl", 10),
                     validation_file=_rows(tmp_path / "v.jsonl", 3))
    raw = load_raw(cfg)
    assert len(raw["train"]) == 10 and raw["validation"]["prompt"] == ["q0 ", "q1 ", "q2 "]


def test_validation_settings_are_checked_together(tmp_path):
    raw = run_raw(tmp_path / "out")
    raw["data"].update(validation_split=0.5, validation_file=str(tmp_path / "missing.jsonl"), eval_fraction=0.45)
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw)
    text = str(info.value)
    assert "validation_split and data.validation_file exclude each other" in text
    assert "data.validation_file: file not found" in text
    assert "leave 5% of the rows to train on" in text


def test_a_run_scores_the_validation_set_after_training_and_logs_it_apart(tmp_path):
    from tam_hf.finetune.pipeline import finetune

    raw = run_raw(tmp_path / "out", eval_strategy="steps", eval_steps=2)
    raw["data"].update(eval_fraction=0.2, validation_split=0.2)
    summary = finetune(validate_recipe(raw))
    assert summary == read_summary(tmp_path / "out")
    assert set(summary["validation"]) == {"loss"} and set(summary["eval"]) == {"loss"}
    assert summary["validation"]["loss"] != summary["eval"]["loss"]
    history = json.loads(sorted((tmp_path / "out").glob("checkpoint-*"))[-1].joinpath("trainer_state.json")
                         .read_text())["log_history"]
    assert [h["step"] for h in history if "eval_loss" in h] == [2, 4]  # training's evaluations: the eval set only
