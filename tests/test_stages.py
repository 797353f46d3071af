"""Staged runs (``stages:``, continual fine-tuning): the recipe's rules, the continual numbers on fixed matrices,
and two-stage classification runs on the tiny Llama whose summaries are checked against evaluations done here by
hand, whose optimizer state carries over (or not), and which resume to the same result after a signal."""

import copy
import csv
import json
import signal
from pathlib import Path

import pytest
import torch
from hf_tiny import read_summary
from safetensors.torch import load_file
from transformers import TrainerCallback

from tam_hf.commands.run import format_summary
from tam_hf.finetune.config.load import validate_recipe
from tam_hf.finetune.continual import continual_metrics
from tam_hf.finetune.errors import OutputDirError, RecipeError
from tam_hf.finetune.pipeline import finetune

# Two domains with the same labels and no word in common: a shift of vocabulary.
DOMAINS = {"words": (["good", "great", "fine"], ["bad", "awful", "poor"]),
           "weather": (["sunny", "warm", "bright"], ["rainy", "cold", "dark"])}


def _write(path: Path, domain: str, n: int, offset: int = 0) -> str:
    pos, neg = DOMAINS[domain]
    rows = [{"text": f"it was {(pos if i % 2 else neg)[(i + offset) % 3]} today", "label": "pos" if i % 2 else "neg"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {name: {"train_file": _write(d / f"{name}_train.jsonl", name, 16),
                   "eval_file": _write(d / f"{name}_eval.jsonl", name, 8, offset=1)} for name in DOMAINS}


def _raw(files, out, method="full", **stage2) -> dict:
    return {
        "model": {"name": "embedded:tiny-llama"}, "task": "sequence_classification",
        "data": {"format": "classification", "max_length": 16},
        "finetune": {"method": method}, "optimizer": {"name": "adamw", "lr": 3e-3}, "eval": {"metrics": ["accuracy"]},
        "training": {"max_steps": 4, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
                     "logging_steps": 1, "save_steps": 2, "output_dir": str(out), "disable_tqdm": True},
        "stages": [{"name": "words", "data": files["words"]},
                   {"name": "weather", "data": files["weather"], "training": {"max_steps": 3}, **stage2}],
    }


class _OptimizerAt(TrainerCallback):
    """The optimizer's per-parameter state as each stage starts (after the carried state is loaded) and ends."""

    def __init__(self):
        self.seen = {}

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.seen[(Path(args.output_dir).name, "begin")] = copy.deepcopy(optimizer.state_dict()["state"])

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        self.seen[(Path(args.output_dir).name, "end")] = copy.deepcopy(optimizer.state_dict()["state"])


@pytest.fixture(scope="module")
def carried(files, tmp_path_factory):
    """One uninterrupted two-stage run (optimizer state carried over), shared by the tests that read it."""
    out = tmp_path_factory.mktemp("carried") / "out"
    recorder = _OptimizerAt()
    summary = finetune(validate_recipe(_raw(files, out)), callbacks=[recorder])
    return out, summary, recorder.seen


def _weights(directory) -> dict:
    return load_file(str(Path(directory) / "model.safetensors"))


# ------------------------------------------------------------------------------------------------- recipe


def test_every_stage_problem_is_named_at_once_before_anything_loads(files, tmp_path):
    raw = _raw(files, tmp_path / "out")
    raw["stages"][0]["data"] = {"train_file": str(tmp_path / "missing.jsonl")}  # no file, no eval data
    raw["stages"][0]["optimizer"] = {"name": "sgd"}
    raw["stages"][1].update(name="a/b", training={"max_steps": -2, "output_dir": "x"},
                            data={**files["weather"], "format": "text"})
    # A stage with a type error is still checked for the rest: its training, its data and its name
    raw["stages"].append({"name": "words", "data": {**files["weather"], "train_fil": "x"}, "reset_optimizer": "no",
                          "training": {"max_steps": 0}})
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw)
    problems = info.value.problems
    expected = ["stages[0].optimizer: a stage cannot set optimizer", "stages[1].name: 'a/b' cannot name a folder",
                "stages[2].reset_optimizer: expected bool", "stages[1].training.max_steps: -2 must be",
                "stages[2].training.max_steps: 0 must be", "stages[2].data.train_fil: unknown key",
                "stages: the name 'words' is used by stages[0], stages[2]",
                "stages[1].training.output_dir: a stage cannot set output_dir",
                "stages[1].data.format: a stage cannot change format",
                "stages[0].data.train_file: file not found", "stages[0].data: every stage is evaluated"]
    for start in expected:
        assert sum(p.startswith(start) for p in problems) == 1, (start, problems)
    assert len(problems) == len(expected), problems


def test_a_problem_of_the_shared_data_section_is_named_once(files, tmp_path):
    raw = _raw(files, tmp_path / "out")
    raw["data"]["columns"] = {"sentence": "text"}
    for stage in raw["stages"]:
        stage["data"] = {"train_file": stage["data"]["train_file"]}
    raw["stages"].append({"name": "again", "data": files["words"]})
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw)
    problems = info.value.problems
    assert [p for p in problems if p.startswith("data.columns.sentence")] and len(problems) == 3, problems
    assert [p.split(":")[0] for p in problems if "every stage is evaluated" in p] == ["stages[0].data",
                                                                                    "stages[1].data"]


def test_what_applies_to_a_single_run_is_refused_with_stages(files, tmp_path):
    raw = _raw(files, tmp_path / "out")
    raw["optimizer"] = {"name": "adatamw", "lr": 1e-3, "switch": {"to": "adamw", "at_step": 2}}
    raw.update(hub={"push": True, "repo_id": "me/model"}, resume=str(tmp_path))
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw)
    assert sorted(p.split(" ")[0] for p in info.value.problems) == ["hub:", "optimizer.switch", "resume:"]


def test_stage_paths_are_resolved_and_the_recipe_reruns(files, tmp_path):
    from tam_hf.finetune.config.load import rerun_yaml
    from tam_hf.finetune.config.yaml_io import read_yaml

    raw = _raw(files, tmp_path / "out")
    raw["stages"][0]["data"]["train_file"] = "embedded:study/sentiment_train.jsonl"
    recipe = validate_recipe(raw)
    assert Path(recipe.stages[0].data["train_file"]).is_file()
    again = read_yaml(rerun_yaml(recipe))
    assert again["stages"][0]["data"]["train_file"] == "embedded:study/sentiment_train.jsonl"
    assert validate_recipe(again).stages == recipe.stages


# ----------------------------------------------------------------------------------------------- metrics


def test_continual_metrics_on_fixed_numbers():
    # a[i][j]: accuracy on stage j's eval set after stage i
    a = [[0.9, 0.2, 0.1],
         [0.6, 0.8, 0.3],
         [0.5, 0.7, 0.9]]
    m = continual_metrics(a, higher_better=True)
    assert m["final_average"] == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)  # best before the last stage
    assert m["backward_transfer"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    # a loss: lower is better, the signs follow (positive forgetting = worse, positive transfer = better)
    loss = [[0.3, 2.0], [0.5, 0.4]]
    m = continual_metrics(loss, higher_better=False)
    assert m == pytest.approx({"final_average": 0.45, "forgetting": 0.2, "backward_transfer": -0.2})
    improved = continual_metrics([[0.3, 2.0], [0.2, 0.4]], higher_better=False)
    assert improved["forgetting"] == pytest.approx(-0.1) and improved["backward_transfer"] == pytest.approx(0.1)
    assert continual_metrics([[0.7]], True) == {"final_average": 0.7, "forgetting": None, "backward_transfer": None}
    assert continual_metrics([[0.3, None], [None, 0.4]], True)["forgetting"] is None


# ---------------------------------------------------------------------------------------------- running


def _by_hand(model_dir, tokenizer, eval_file, label2id) -> dict:
    """Eval loss and accuracy of the model saved in ``model_dir`` on ``eval_file``, computed here."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    rows = [json.loads(line) for line in Path(eval_file).read_text().splitlines()]
    batch = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([label2id[r["label"]] for r in rows])
    with torch.no_grad():
        logits = model(**batch).logits
    return {"loss": torch.nn.functional.cross_entropy(logits, labels).item(),
            "accuracy": (logits.argmax(-1) == labels).double().mean().item()}


def test_stages_and_continual_match_evaluations_done_by_hand(carried, files):
    from transformers import AutoConfig, AutoTokenizer

    out, summary, _ = carried
    assert summary["status"] == "completed" and [s["name"] for s in summary["stages"]] == ["words", "weather"]
    assert [s["steps"] for s in summary["stages"]] == [4, 3] and summary["steps"] == 7
    tokenizer = AutoTokenizer.from_pretrained(out)
    label2id = AutoConfig.from_pretrained(out).label2id
    after = [out / "stage-1-words", out]  # the model after stage 1, the final model
    a = [[_by_hand(d, tokenizer, files[n]["eval_file"], label2id) for n in DOMAINS] for d in after]
    for i, stage in enumerate(summary["stages"]):
        for j, name in enumerate(DOMAINS):
            assert stage["eval"][name] == pytest.approx(a[i][j], abs=1e-5), (i, name)
    accuracy = [[cell["accuracy"] for cell in row] for row in a]
    c = summary["continual"]
    assert c["metric"] == "accuracy" and c["higher_is_better"] is True
    assert c["final_average"] == pytest.approx(sum(accuracy[1]) / 2)
    assert c["forgetting"] == pytest.approx(accuracy[0][0] - accuracy[1][0])
    assert c["backward_transfer"] == pytest.approx(accuracy[1][0] - accuracy[0][0])
    for key in ("loss", "accuracy"):
        assert summary["eval"][key] == pytest.approx((a[1][0][key] + a[1][1][key]) / 2, abs=1e-5)
    assert read_summary(out)["continual"] == c
    marker = json.loads((out / "stage-1-words" / "tam_hf_stage.json").read_text())
    assert marker["record"] == summary["stages"][0]
    assert (f"stages: words, weather; on accuracy: final average {c['final_average']:.4f}, forgetting "
            f"{c['forgetting']:+.4f}, backward transfer {c['backward_transfer']:+.4f}") in format_summary(summary)


def test_the_optimizer_state_carries_over_unless_reset(carried, files, tmp_path):
    out, _, seen = carried
    saved = torch.load(out / "stage-1-words" / "optimizer.pt", weights_only=True)["state"]
    start = seen[("stage-2-weather", "begin")]
    assert start.keys() == saved.keys() == seen[("stage-1-words", "end")].keys() and saved
    for index, state in saved.items():
        assert torch.equal(start[index]["exp_avg"], state["exp_avg"])
        assert torch.equal(start[index]["exp_avg_sq"], state["exp_avg_sq"])
        assert float(start[index]["step"]) == 4.0  # AdamW's bias correction goes on from stage 1's steps
    recorder = _OptimizerAt()
    reset = finetune(validate_recipe(_raw(files, tmp_path / "reset", reset_optimizer=True)), callbacks=[recorder])
    assert recorder.seen[("stage-2-weather", "begin")] == {}
    assert torch.equal(_weights(tmp_path / "reset" / "stage-1-words")["score.weight"],
                       _weights(out / "stage-1-words")["score.weight"])  # the same stage 1
    assert not torch.equal(_weights(tmp_path / "reset")["score.weight"], _weights(out)["score.weight"])
    assert reset["stages"][1]["eval"] != read_summary(out)["stages"][1]["eval"]


class _SignalAt(TrainerCallback):
    """SIGINT once, in the folder of one stage: at a training step, or while it is evaluated after training."""

    def __init__(self, folder: str, step: int | None = None):
        self.folder, self.step, self.sent = folder, step, False

    def _send(self, args, hit: bool):
        if hit and not self.sent and Path(args.output_dir).name == self.folder:
            self.sent = True
            signal.raise_signal(signal.SIGINT)

    def on_step_end(self, args, state, control, **kwargs):
        self._send(args, self.step is not None and state.global_step == self.step)

    def on_evaluate(self, args, state, control, **kwargs):
        self._send(args, self.step is None)


def _same_result(resumed: dict, whole: dict) -> None:
    for key in ("stages", "continual", "eval", "steps", "train_loss"):
        value = resumed[key]
        if key == "stages":
            value = [{k: v for k, v in s.items() if k != "mean_train_loss"} for s in value]
            expected = [{k: v for k, v in s.items() if k != "mean_train_loss"} for s in whole[key]]
        else:
            expected = whole[key]
        assert value == expected, key  # bit-exact: the same weights give the same numbers


def test_a_signal_in_stage_2_stops_naming_it_and_resume_finishes_the_same_run(carried, files, tmp_path):
    whole_out, whole, _ = carried
    out = tmp_path / "out"
    recipe = validate_recipe(_raw(files, out))
    # Sent after step 1 (the stop callback, first in the list, has looked already): the run stops after step 2.
    first = finetune(recipe, callbacks=[_SignalAt("stage-2-weather", step=1)])
    assert first["status"] == "interrupted" and first["stage"] == "weather" and first["phase"] == "train"
    assert first["steps"] == 4 + 2 and "in stage 2 of 2 (weather)" in first["kept"]
    assert first["checkpoint"] == str(out / "stage-2-weather" / "checkpoint-2")
    assert [s["name"] for s in read_summary(out)["stages"]] == ["words"]  # written as stage 1 finished
    recipe.resume = True
    second = finetune(recipe)
    assert second["status"] == "completed" and second["resumed_from"] == first["checkpoint"]
    _same_result(second, whole)
    for name in ("", "stage-1-words", "stage-2-weather"):
        mine, theirs = _weights(out / name), _weights(whole_out / name)
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), name
    # Every stage finished: a resume trains nothing, loads the last stage's model and gives the same summary.
    (out / "model.safetensors").unlink()
    third = finetune(recipe)
    _same_result(third, whole)
    assert torch.equal(_weights(out)["score.weight"], _weights(whole_out)["score.weight"])
    recipe.resume = False
    with pytest.raises(OutputDirError, match="holds another run's outputs"):
        finetune(recipe)


def test_compare_continues_a_staged_run_from_its_stage_checkpoint_with_the_whole_history(files, tmp_path,
                                                                                          monkeypatch):
    import yaml

    import tam_hf.finetune.pipeline as pipeline
    from tam_hf.compare import runner, study
    from tam_hf.finetune.stages import resume_point

    recipe = tmp_path / "staged.yaml"
    recipe.write_text(yaml.safe_dump(_raw(files, tmp_path / "unused")))
    whole = runner.execute(study.plan(recipe, ["adamw"], [0], out=tmp_path / "whole").runs[0])
    real, attempts = pipeline.finetune, []

    def finetune(recipe, callbacks=()):  # the first attempt is stopped in stage 2, after its checkpoint-2
        stop = [] if attempts else [_SignalAt("stage-2-weather", step=1)]
        attempts.append(recipe.resume)
        return real(recipe, callbacks=[*callbacks, *stop])

    monkeypatch.setattr(pipeline, "finetune", finetune)
    run = study.plan(recipe, ["adamw"], [0], out=tmp_path / "cut").runs[0]
    with pytest.raises(KeyboardInterrupt):
        runner.execute(run)
    assert resume_point(run.directory, run.recipe) == "stage-2-weather/checkpoint-2"
    assert "stage-2-weather/checkpoint-2" in json.loads((run.directory / "study.json").read_text())["elapsed_s"]
    run = study.plan(recipe, ["adamw"], [0], out=tmp_path / "cut").runs[0]  # the rerun of the same command
    resumed = runner.execute(run)
    assert attempts == [False, True] and resumed["resumed_from"] == "stage-2-weather/checkpoint-2"
    assert study.plan(recipe, ["adamw"], [0], out=tmp_path / "cut").runs[0].done  # and finished for the next command
    assert resumed["summary"]["wall_s"] == pytest.approx(sum(resumed["wall_s_parts"]))  # both attempts' time
    _same_result(resumed["summary"], whole["summary"])
    # Timings aside, and the Trainer's closing train_loss (its mean over the steps of the last attempt only):
    skip = ("runtime", "per_second", "wall_s", "train_loss")
    same = [[{k: v for k, v in e.items() if not any(t in k for t in skip)} for e in r["log_history"]]
            for r in (resumed, whole)]
    assert same[0] == same[1]  # stage 1 read back from its folder, with its evaluations; stage 2 from the checkpoint
    assert sum("eval_accuracy" in e and e["step"] == 4 for e in same[0]) == 2  # after stage 1, on both eval sets


def test_lora_resumed_between_stages_carries_the_adapter_and_the_optimizer_state(files, tmp_path):
    whole = finetune(validate_recipe(_raw(files, tmp_path / "whole", method="lora")))
    out = tmp_path / "out"
    recipe = validate_recipe(_raw(files, out, method="lora"))
    first = finetune(recipe, callbacks=[_SignalAt("stage-1-words")])  # while stage 1 is being evaluated
    assert first["status"] == "interrupted" and "stage" not in first
    assert not (out / "stage-2-weather").exists() and (out / "stage-1-words" / "tam_hf_stage.json").is_file()
    recipe.resume = True
    second = finetune(recipe)
    assert second["status"] == "completed" and "resumed_from" not in second
    _same_result(second, whole)
    mine = load_file(str(out / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_compare_reports_the_continual_numbers_across_seeds_and_a_stage_table(tmp_path):
    from tam_hf.compare.report import run_metrics, write_report

    def result(arm, seed, matrix):
        c = {"metric": "accuracy", "higher_is_better": True, **continual_metrics(matrix, True), "matrix": matrix}
        stages = [{"name": n, "steps": 2} for n in ("words", "weather")]
        return {"label": arm, "seed": seed, "log_history": [],
                "summary": {"train_loss": 1.0, "eval": {"accuracy": sum(matrix[-1]) / 2}, "stages": stages,
                            "continual": c}}

    results = [result("adamw", 0, [[0.9, 0.5], [0.7, 0.8]]), result("adamw", 1, [[0.8, 0.5], [0.8, 0.9]]),
               result("adatamw", 0, [[0.9, 0.5], [0.9, 0.9]]), result("adatamw", 1, [[0.9, 0.5], [0.8, 0.9]])]
    assert run_metrics(results[0]) == pytest.approx({"train_loss": 1.0, "eval_accuracy": 0.75,
                                                     "continual_final_average": 0.75, "continual_forgetting": 0.2,
                                                     "continual_backward_transfer": -0.2})
    paths, _ = write_report(results, ["adamw", "adatamw"], tmp_path, "t")
    rows = {(r["arm"], r["metric"]): r for r in csv.DictReader(paths["report.csv"].open())}
    row = rows["adatamw", "continual_forgetting"]
    assert float(row["mean"]) == pytest.approx(0.05) and float(row["delta_vs_adamw"]) == pytest.approx(-0.05)
    report = paths["report.md"].read_text()
    assert "## Stages" in report
    assert "| adamw | 1. words | 2 | 0.8500 ± 0.6353 | 0.7500 ± 0.6353 |" in report  # t(0.975, 1) * 0.05


def test_a_causal_lm_runs_in_stages_scored_on_perplexity_with_validation_sets(tmp_path):
    def write(name, op):
        rows = [{"prompt": f"{a} {op} {b} =", "completion": f" {a + b if op == '+' else a * b}"}
                for a in range(4) for b in range(3)]
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    raw = {"model": {"name": "embedded:tiny-llama"}, "finetune": {"method": "lora"},
           "data": {"format": "prompt_completion", "max_length": 32, "eval_fraction": 0.25, "validation_split": 0.25},
           "optimizer": {"name": "adatamw", "lr": 1e-3},
           "training": {"max_steps": 2, "per_device_train_batch_size": 4, "save_strategy": "no",
                        "output_dir": str(tmp_path / "out"), "disable_tqdm": True},
           "stages": [{"name": "plus", "data": {"train_file": write("plus.jsonl", "+")}},
                      {"name": "times", "data": {"train_file": write("times.jsonl", "*")}}]}
    summary = finetune(validate_recipe(raw))
    c = summary["continual"]
    assert c["metric"] == "perplexity" and c["higher_is_better"] is False
    matrix = [[s["eval"][n]["perplexity"] for n in ("plus", "times")] for s in summary["stages"]]
    assert c["matrix"] == matrix and c["forgetting"] == pytest.approx(matrix[1][0] - matrix[0][0])
    assert summary["eval"]["perplexity"] == pytest.approx((matrix[1][0] + matrix[1][1]) / 2)
    validation = [summary["stages"][1]["validation"][n] for n in ("plus", "times")]
    assert summary["validation"] == pytest.approx({k: (validation[0][k] + validation[1][k]) / 2
                                                   for k in ("loss", "perplexity")})
    assert validation[0] != summary["stages"][1]["eval"]["plus"]  # another set of rows
    assert summary["damping"] is not None and summary["stages"][0]["damping"] is not None  # AdaTAMW's


def test_a_failure_in_a_stage_is_recorded_with_the_stage(files, tmp_path):
    from tam_hf.finetune.errors import NonFiniteError

    class PoisonStage2(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if Path(args.output_dir).name == "stage-2-weather" and state.global_step == 1:
                next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))

    out = tmp_path / "out"
    with pytest.raises(NonFiniteError):
        finetune(validate_recipe(_raw(files, out)), callbacks=[PoisonStage2()])
    summary = read_summary(out)
    assert summary["status"] == "failed" and summary["phase"] == "train" and summary["stage"] == "weather"
    assert summary["diverged_at_step"] == 2 and summary["steps"] == 4 + 2
    assert [s["name"] for s in summary["stages"]] == ["words"]


def test_compare_keeps_every_stages_log_history_on_one_step_axis():
    from transformers import TrainerControl, TrainerState

    from tam_hf.compare.runner import _history_callback

    history = _history_callback()
    stages = [TrainerState(global_step=4, log_history=[{"loss": 1.0, "step": 2}, {"loss": 0.8, "step": 4}]),
              TrainerState(global_step=3, log_history=[{"loss": 0.9, "step": 3}, {"eval_loss": 0.7, "step": 3}])]
    for state in [stages[0], stages[0], stages[1]]:  # a Trainer may begin twice on one state (resume)
        history.on_train_begin(None, state, TrainerControl())
    assert [(e.get("loss", e.get("eval_loss")), e["step"]) for e in history.log_history] == [
        (1.0, 2), (0.8, 4), (0.9, 7), (0.7, 7)]
