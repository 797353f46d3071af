"""lm-evaluation-harness after training and on a finished run (tam_hf.finetune.lm_eval), offline: local task YAMLs
run on the embedded tiny model and write results keyed by task; unknown tasks and a missing lm-eval are refused
with the fix; a failing evaluation says where the trained model is saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from tam_hf.finetune.config import checks
from tam_hf.commands import eval as eval_command
from tam_hf.finetune.errors import LMEvalError
from tam_hf.finetune.config.checks import check_available, task_problems
from tam_hf.finetune.config.resolve import resolve_path
from tam_hf.finetune.lm_eval import load_run_model, run_lm_eval
from tam_hf.finetune.model import load_tokenizer, model_path
from tam_hf.finetune.config.schema import ModelConfig

TINY = ModelConfig(name="embedded:tiny-llama")
# lm-eval is the optional [eval] extra: without it only the test of its absence runs
needs_lm_eval = pytest.mark.skipif(check_available() is not None, reason="lm-eval (the [eval] extra) is not installed")
CHOICE, GEN = "embedded:lm_eval/tiny_arith_choice.yaml", "embedded:lm_eval/tiny_arith_gen.yaml"


def _base():
    return AutoModelForCausalLM.from_pretrained(model_path(TINY))


@needs_lm_eval
def test_local_task_yamls_run_on_the_tiny_model_and_write_results(tmp_path):
    tasks = [str(resolve_path(t)) for t in (CHOICE, GEN)]  # run_lm_eval takes tasks as the recipe resolved them
    out = run_lm_eval(_base(), load_tokenizer(TINY), tasks, tmp_path, limit=3, batch_size=4)
    results = json.loads((tmp_path / "lm_eval" / "results.json").read_text())
    assert set(results) == {"tam_tiny_arith_choice", "tam_tiny_arith_gen"}
    assert 0.0 <= results["tam_tiny_arith_choice"]["acc,none"] <= 1.0
    assert 0.0 <= results["tam_tiny_arith_gen"]["exact_match,none"] <= 1.0
    assert out["tasks"]["tam_tiny_arith_choice"] == {"acc,none": results["tam_tiny_arith_choice"]["acc,none"]}
    assert json.loads((tmp_path / "lm_eval" / "results_full.json").read_text())["n-samples"]["tam_tiny_arith_gen"]["effective"] == 3
    table = (tmp_path / "lm_eval" / "table.md").read_text()
    assert "tam_tiny_arith_gen" in table and "exact_match" in table and out["table"] == table


def _finished_lora_run(run_dir: Path):
    """What a lora run leaves: adapter + tokenizer + resolved recipe (the adapter made non-trivial)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_base(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(run_dir)
    load_tokenizer(TINY).save_pretrained(run_dir)
    recipe = {"model": {"name": "embedded:tiny-llama"},
              "data": {"format": "prompt_completion", "train_file": "embedded:demo_train.jsonl"},
              "optimizer": {"name": "adatamw", "lr": 1e-3},
              "finetune": {"method": "lora", "lora": {"r": 4, "alpha": 8}},
              "eval": {"metrics": []}, "training": {"output_dir": str(run_dir)}}
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return model


@needs_lm_eval
def test_finished_run_is_evaluated_with_its_adapter(tmp_path, capsys):
    run_dir = tmp_path / "run"
    trained = _finished_lora_run(run_dir)
    model, _, recipe = load_run_model(run_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, trained.eval()(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(model(input_ids=ids).logits, _base()(input_ids=ids).logits, atol=1e-3)
    assert eval_command.main([str(run_dir), "--tasks", CHOICE, "--limit", "2"]) == 0
    assert "tam_tiny_arith_choice" in capsys.readouterr().out
    assert "tam_tiny_arith_choice" in json.loads((run_dir / "lm_eval" / "results.json").read_text())


@needs_lm_eval
def test_unknown_tasks_are_named_with_close_matches():
    problems = task_problems(["gsm8", "no_such_benchmark_xyz", "embedded:lm_eval/missing.yaml", CHOICE])
    assert len(problems) == 3, problems
    assert "task file not found: embedded:lm_eval/missing.yaml" in problems[0]
    assert "unknown lm-eval task 'gsm8'" in problems[1] and "did you mean gsm8k" in problems[1]
    assert "'no_such_benchmark_xyz'" in problems[2] and "known tasks include gsm8k" in problems[2]


def test_missing_lm_eval_is_reported_with_the_install_command(monkeypatch, tmp_path):
    real = checks.importlib.util.find_spec
    monkeypatch.setattr(checks.importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    problem = check_available()
    assert "lm-evaluation-harness" in problem and 'pip install "tam_hf[eval]"' in problem
    with pytest.raises(LMEvalError, match=r"tam_hf\[eval\].*saved at /runs/x; evaluate it again with: tam-finetune eval /runs/x"):
        run_lm_eval(None, None, [CHOICE], tmp_path, saved_at="/runs/x")


@needs_lm_eval
def test_a_failing_evaluation_says_where_the_model_is_saved(tmp_path):
    task = tmp_path / "broken.yaml"
    task.write_text(yaml.safe_dump({"task": "tam_broken", "dataset_path": "json", "test_split": "test",
                                    "dataset_kwargs": {"data_files": {"test": "no_such_rows.jsonl"}},
                                    "output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": "{{c}}",
                                    "doc_to_target": 0}))
    with pytest.raises(LMEvalError) as err:
        run_lm_eval(_base(), load_tokenizer(TINY), [str(task)], tmp_path / "out", limit=2, saved_at=str(tmp_path / "out"))
    message = str(err.value)
    assert message.startswith("lm-eval failed:") and f"The trained model is saved at {tmp_path / 'out'}" in message
    assert f"tam-finetune eval {tmp_path / 'out'}" in message


@needs_lm_eval
def test_a_recipe_runs_lm_eval_after_training_and_the_finished_run_evaluates_again(tmp_path, capsys):
    from tam_hf.commands.run import format_summary
    from tam_hf.finetune.config.load import validate_recipe
    from tam_hf.finetune.pipeline import finetune

    out = tmp_path / "run"
    recipe = validate_recipe({
        "model": {"name": "embedded:tiny-llama"},
        "data": {"format": "prompt_completion", "train_file": "embedded:demo_train.jsonl", "max_length": 32},
        "finetune": {"method": "full"}, "optimizer": {"name": "adatamw", "lr": 1e-3},
        "eval": {"metrics": [], "lm_eval": {"tasks": [CHOICE], "limit": 4, "batch_size": 4}},
        "training": {"max_steps": 2, "per_device_train_batch_size": 8, "save_strategy": "no",
                     "output_dir": str(out), "disable_tqdm": True},
    })
    summary = finetune(recipe)
    results = json.loads((out / "lm_eval" / "results.json").read_text())
    assert summary["lm_eval"] == {"tam_tiny_arith_choice": {"acc,none": results["tam_tiny_arith_choice"]["acc,none"]}}
    assert summary["lm_eval_results"] == str(out / "lm_eval" / "results.json")
    assert json.loads((out / "summary.json").read_text())["lm_eval_table"] == (out / "lm_eval" / "table.md").read_text()
    printed = format_summary(summary)
    assert f"lm-eval ({out / 'lm_eval' / 'results.json'}):" in printed and "tam_tiny_arith_choice" in printed

    # `tam-finetune eval RUN_DIR` on the finished run: its recipe's settings, another task given on the command line
    from tam_hf import cli

    capsys.readouterr()
    assert cli.main(["eval", str(out), "--tasks", GEN, "--limit", "2"]) == 0
    assert "tam_tiny_arith_gen" in capsys.readouterr().out
    assert "tam_tiny_arith_gen" in json.loads((out / "lm_eval" / "results.json").read_text())


@needs_lm_eval
def test_a_launched_run_skips_lm_eval_with_the_command_that_runs_it():
    from types import SimpleNamespace

    from tam_hf.commands.run import format_summary
    from tam_hf.finetune.config.load import validate_recipe
    from tam_hf.finetune.pipeline import lm_eval

    recipe = validate_recipe({"model": {"name": "embedded:tiny-llama"},
                              "data": {"format": "prompt_completion", "train_file": "embedded:demo_train.jsonl"},
                              "optimizer": {"name": "adatamw", "lr": 1e-3},
                              "eval": {"metrics": [], "lm_eval": {"tasks": [CHOICE]}}})
    summary = {"optimizer": "adatamw", "steps": 2, "output_dir": "/runs/x"}
    trainer = SimpleNamespace(args=SimpleNamespace(world_size=2), model=None)  # lm-eval would fail on model None
    run = SimpleNamespace(recipe=recipe, trainer=trainer, tokenizer=None, output_dir=Path("/runs/x"), summary=summary)
    assert lm_eval(run) is None  # the lm-eval phase of a run
    assert "tam-finetune eval /runs/x" in summary["lm_eval_skipped"] and "lm_eval" not in summary
    assert "lm-eval skipped: lm-eval runs in one process, this run had 2" in format_summary(summary)


@needs_lm_eval
def test_recipe_validation_names_unknown_tasks_and_the_missing_extra(monkeypatch):
    from tam_hf.finetune.config.load import validate_recipe
    from tam_hf.finetune.errors import RecipeError

    raw = {"model": {"name": "embedded:tiny-llama"},
           "data": {"format": "prompt_completion", "train_file": "embedded:demo_train.jsonl"},
           "optimizer": {"name": "adatamw", "lr": 1e-3}, "eval": {"metrics": [], "lm_eval": {"tasks": ["gsm8", CHOICE]}}}
    with pytest.raises(RecipeError) as err:
        validate_recipe(raw)
    (problem,) = err.value.problems
    assert "unknown lm-eval task 'gsm8'" in problem and "did you mean gsm8k" in problem
    real = checks.importlib.util.find_spec
    monkeypatch.setattr(checks.importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(RecipeError, match=r"eval.lm_eval needs lm-evaluation-harness.*tam_hf\[eval\]"):
        validate_recipe(raw)
