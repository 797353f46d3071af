"""The recipe schema: shipped recipes validate; bad recipes fail with every problem named, before any loading;
hostile or careless input (non-finite numbers, duplicate keys, deep nesting, alias bombs, huge values, an
output directory that cannot be written) is a recipe error, never a crash or a silent run."""

import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from tam_hf.finetune.config.load import apply_overrides, load_recipe, to_dict, to_yaml, validate_recipe
from tam_hf.finetune.config.yaml_io import read_yaml
from tam_hf.finetune.errors import RecipeError
from tam_hf.optim import registry

ROOT = Path(__file__).resolve().parents[1]
# recipes/integrations/ holds axolotl, LLaMA-Factory and torchtune configs (tests/test_integrations.py), not recipes.
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "integrations" not in p.relative_to(ROOT).parts)
EXAMPLES = sorted((ROOT / "recipes" / "examples").glob("*.yaml"))
GOOD = {
    "model": {"name": "embedded:tiny-llama"},
    "data": {"format": "prompt_completion", "train_file": "embedded:demo_train.jsonl",
             "eval_file": "embedded:demo_eval.jsonl"},
    "optimizer": {"name": "adatamw", "lr": 1e-3},
}


def _recipe(**changes) -> dict:
    """GOOD with changes at double-underscore paths (optimizer__lr); a value of ... deletes the key."""
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    for path, value in changes.items():
        node, *keys = raw, *path.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        if value is ...:
            node.pop(keys[-1])
        else:
            node[keys[-1]] = value
    return raw


def _problems(raw: dict) -> list[str]:
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw)
    return info.value.problems


def _load_problems(tmp_path, text: str, overrides=()) -> list[str]:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    return info.value.problems


# ------------------------------------------------------------------------------------------ shipped recipes


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.training["output_dir"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_starts_with_its_exact_command(path):
    first = path.read_text().splitlines()[0]
    assert first == f"# tam-finetune {path.relative_to(ROOT)}", first
    assert load_recipe(path).training["output_dir"] == f"outputs/{path.stem}"


def test_there_is_an_example_for_each_method_and_task():
    methods = {load_recipe(p).finetune.method for p in EXAMPLES}
    tasks = {load_recipe(p).task for p in EXAMPLES}
    assert methods == {"lora", "qlora", "full"} and tasks == {"causal_lm", "sequence_classification"}


# ------------------------------------------------------------------------------------- defaults, resolution


def test_good_recipe_gets_defaults():
    recipe = validate_recipe(_recipe())
    assert recipe.finetune.method == "lora" and recipe.finetune.lora.r == 16
    assert recipe.hub.artifact == "adapter" and recipe.eval.metrics == ["perplexity"]
    assert recipe.training == {"output_dir": "outputs/recipe", "report_to": "none"}
    assert validate_recipe(yaml.safe_load(to_yaml(recipe))) == recipe  # the saved resolved recipe reloads as is


def test_validation_leaves_the_input_alone():
    raw = _recipe(finetune={"method": "qlora"})
    before = yaml.safe_dump(raw)
    validate_recipe(raw)
    assert yaml.safe_dump(raw) == before


def test_overwrite_is_a_recipe_setting():
    assert validate_recipe(_recipe()).overwrite is False
    assert validate_recipe(_recipe(overwrite=True)).overwrite is True


def test_qlora_fills_in_4bit():
    assert validate_recipe(_recipe(finetune={"method": "qlora"})).model.quantization == "4bit"


def test_default_metrics_follow_the_task():
    cls = _recipe(task="sequence_classification", model__name="embedded:tiny-llama",
                  data={"format": "classification", "train_file": "embedded:study/sentiment_train.jsonl",
                        "eval_file": "embedded:study/sentiment_eval.jsonl"})
    assert validate_recipe(cls).eval.metrics == ["accuracy", "f1"]
    cls["data"]["target"] = "score"
    assert validate_recipe(cls).eval.metrics == ["pearson", "spearman"]


def test_an_evaluate_metric_script_is_a_metric(tmp_path):
    script = tmp_path / "agree" / "agree.py"
    script.parent.mkdir()
    script.write_text("import datasets\nimport evaluate\n\n\nclass Agree(evaluate.Metric):\n"
                      "    def _info(self):\n        return evaluate.MetricInfo(description='', citation='', "
                      "inputs_description='', features=datasets.Features({'predictions': datasets.Value('int64'), "
                      "'references': datasets.Value('int64')}))\n\n"
                      "    def _compute(self, predictions, references):\n        return {'agree': 1.0}\n")
    cls = _recipe(task="sequence_classification",
                  data={"format": "classification", "train_file": "embedded:study/sentiment_train.jsonl",
                        "eval_file": "embedded:study/sentiment_eval.jsonl"}, eval={"metrics": ["accuracy", str(script)]})
    assert validate_recipe(cls).eval.metrics == ["accuracy", str(script)]
    # the same script on a causal-LM task gets generated text, not class ids: refused
    (problem,) = _problems(_recipe(eval={"metrics": [str(script)]}))
    assert "compares class ids or scores, but task causal_lm gives it text" in problem, problem


def test_lr_written_as_yaml_1_1_string_is_a_float():
    # YAML 1.1 reads `1e-4` (no dot) as a string; accepting it spares users a classic silent trap.
    assert validate_recipe(_recipe(optimizer__lr="1e-4")).optimizer.lr == 1e-4
    assert validate_recipe(_recipe(optimizer__betas=["9e-1", 0.99])).optimizer.kwargs()["betas"] == (0.9, 0.99)


def test_training_ints_stay_ints_and_numeric_strings_become_numbers():
    recipe = validate_recipe(_recipe(training={"logging_steps": 25, "warmup_steps": "1e1"}))
    assert recipe.training["logging_steps"] == 25 and type(recipe.training["logging_steps"]) is int
    assert recipe.training["warmup_steps"] == 10.0


# ------------------------------------------------------------------------------------------- bad recipes


BAD = {
    "unknown key with did-you-mean": (dict(model__nmae="x"), ["model.nmae: unknown key (did you mean 'name'?)"]),
    "unknown nested key": (dict(finetune={"lora": {"rank": 8}}), ["finetune.lora.rank: unknown key"]),
    "unknown section": (dict(optimiser={"name": "tam"}), ["optimiser: unknown key (did you mean 'optimizer'?)"]),
    "missing required": (dict(optimizer__lr=...), ["optimizer.lr: required key is missing"]),
    "missing section": (dict(model=...), ["model: required key is missing (Base model.)"]),
    "section not a mapping": (dict(data="train.jsonl"), ["data: expected a mapping, got str 'train.jsonl'"]),
    "wrong type": (dict(data__max_length="long"), ["data.max_length: expected int, got str 'long'"]),
    "float for int": (dict(data__max_length=64.0), ["data.max_length: expected int, got float 64.0"]),
    "bool is not int": (dict(finetune={"method": "lora", "lora": {"r": True}}), ["finetune.lora.r: expected int"]),
    "bool is not float": (dict(optimizer__lr=True), ["optimizer.lr: expected float, got bool True"]),
    "str or list": (dict(data__train_file=3), ["data.train_file: expected a string or a list of strings, got int 3"]),
    "key not a string": (dict(model={"name": "embedded:tiny-llama", 1: "x"}), ["model: key 1 is not a string"]),
    "list item type": (dict(eval={"metrics": ["perplexity", 3]}), ["eval.metrics[1]: expected str, got int 3"]),
    "bias_correction on tam": (dict(optimizer__name="tam", optimizer__bias_correction=True),
                               ["optimizer.bias_correction does not apply to tam (it takes lr, momentum,"]),
    "answer_pattern not a regex": (dict(eval={"metrics": ["exact_match"], "answer_pattern": "(#"}),
                                   ["eval.answer_pattern: '(#' is not a regular expression"]),
    "answer_pattern without a group": (dict(eval={"metrics": ["exact_match"], "answer_pattern": "####"}),
                                       ["eval.answer_pattern: '####' needs a group"]),
    "fixed_damping out of range": (dict(optimizer__fixed_damping=1.5),
                                   ["optimizer: Invalid fixed_damping value: 1.5 (AdaTAMW)"]),
    "bad betas": (dict(optimizer__betas=[0.9, 1.5]), ["optimizer: Invalid beta parameter at index 1: 1.5"]),
    "betas of the wrong length": (dict(optimizer__betas=[0.9]), ["optimizer.betas: expected a tuple of 2"]),
    "negative lr": (dict(optimizer__lr=-1e-3), ["optimizer: Invalid learning rate: -0.001"]),
    "optimizer setting of the wrong type": (dict(optimizer__cosine_scope=3), ["optimizer.cosine_scope: expected str"]),
    "bad enum": (dict(optimizer__name="adamtam"), ["optimizer.name: 'adamtam' is not one of", "did you mean 'adatam'?"]),
    "bad quantization": (dict(model__quantization="3bit"),
                         ["model.quantization: '3bit' is not one of 'none', '4bit', '8bit' (did you mean '"]),
    "missing data file": (dict(data__train_file="nope/train.jsonl"), ["data.train_file: file not found: nope/train.jsonl"]),
    "bad file type": (dict(data__train_file="x.xlsx"), ["unsupported file type '.xlsx'"]),
    "missing model dir": (dict(model__name="./no/such/model"), ["model.name: local model directory not found"]),
    "unknown embedded": (dict(model__name="embedded:tiny-lama"), ["no embedded model 'tiny-lama'", "'tiny-llama'"]),
    "dataset and file": (dict(data__dataset="org/ds"), ["set exactly one of data.dataset"]),
    "two eval sources": (dict(data__eval_fraction=0.1), ["data.eval_file and data.eval_fraction exclude each other"]),
    "eval_fraction out of range": (dict(data__eval_file=..., data__eval_fraction=1.0),
                                   ["data.eval_fraction: 1.0 must be < 1"]),
    "max_length too short": (dict(data__max_length=4), ["data.max_length: 4 must be >= 8"]),
    "lora rank 0": (dict(finetune={"lora": {"r": 0}}), ["finetune.lora.r: 0 must be >= 1"]),
    "lora dropout 1": (dict(finetune={"lora": {"dropout": 1}}), ["finetune.lora.dropout: 1 must be < 1"]),
    "full with lora section": (dict(finetune={"method": "full", "lora": {"r": 8}}), ["finetune.lora is set but"]),
    "full on quantized": (dict(finetune={"method": "full"}, model__quantization="4bit"), ["quantized weights"]),
    "qlora on 8bit": (dict(finetune={"method": "qlora"}, model__quantization="8bit"), ["qlora needs a 4-bit base"]),
    "lora on 4bit": (dict(model__quantization="4bit"), ["lora on a 4-bit base is qlora: set finetune.method: qlora"]),
    "param of other optimizer": (dict(optimizer__momentum=0.9), ["optimizer.momentum does not apply to adatamw"]),
    "unknown training arg": (dict(training={"num_train_epoch": 1}),
                             ["training.num_train_epoch: not a TrainingArguments field (did you mean 'num_train_epochs'?)"]),
    "training key owned elsewhere": (dict(training={"learning_rate": 1e-4}), ["training.learning_rate: set optimizer.lr"]),
    "training wrong type": (dict(training={"max_steps": "ten"}), ["training.max_steps: expected int, got str 'ten'"]),
    "metric for other task": (dict(eval={"metrics": ["accuracy"]}), ["accuracy does not apply to task causal_lm"]),
    "unknown metric": (dict(eval={"metrics": ["perplexty"]}), ["unknown metric 'perplexty' (did you mean 'perplexity'?)"]),
    "missing metric script": (dict(eval={"metrics": ["perplexity", "./no/such_metric.py"]}),
                              ["eval.metrics: metric script not found: ./no/such_metric.py"]),
    "unknown metric names the other forms": (dict(eval={"metrics": ["bleu"]}),
                                             ["unknown metric 'bleu'", "or evaluate:NAME[/CONFIG], or a metric script"]),
    "push without repo": (dict(hub={"push": True}), ["hub.push is true but hub.repo_id is not set"]),
    "format vs task": (dict(task="sequence_classification"), ["needs data.format classification"]),
    "column not read by format": (dict(data__columns={"question": "q"}), ["data.columns.question: format prompt_completion reads"]),
    "completion loss on text": (dict(data__format="text", data__completion_only_loss=True), ["format text has no completion"]),
    "missing distributed file": (dict(distributed={"deepspeed": "ds.json"}), ["distributed.deepspeed: file not found"]),
    # packing, padding-free, chat templates, lm-eval
    "packing a classifier": (dict(task="sequence_classification", data__format="classification", data__packing=True,
                                  eval={"metrics": []}),
                             ["data.packing / data.padding_free apply to causal-LM formats"]),
    "padding-free without flash-attention": (dict(data__padding_free=True),
                                             ["data.padding_free needs flash-attention", "data.packing: true"]),
    "packing under an attention it cannot mask": (dict(data__packing=True, model__attn_implementation="flex_attention"),
                                                  ["data.packing with model.attn_implementation flex_attention"]),
    "chat template for prompt/completion data": (dict(data__chat_template_path="embedded:chat_templates/chatml.jinja"),
                                                 ["data.chat_template_path applies to format chat"]),
    "chat template not a jinja file": (dict(data__format="chat", data__chat_template_path="embedded:demo_chat.jsonl"),
                                       ["data.chat_template_path: embedded:demo_chat.jsonl is not a chat template file"]),
    "missing chat template": (dict(data__format="chat", data__chat_template_path="no/such.jinja"),
                              ["data.chat_template_path: file not found: no/such.jinja"]),
    "lm-eval on a classifier": (dict(task="sequence_classification", data__format="classification",
                                     eval={"metrics": [], "lm_eval": {"tasks": ["gsm8k"]}}),
                                ["eval.lm_eval evaluates a language model: it needs task causal_lm"]),
    "lm-eval without tasks": (dict(eval={"lm_eval": {"tasks": []}}), ["eval.lm_eval.tasks: List should have at least 1"]),
    "lm-eval limit 0": (dict(eval={"lm_eval": {"tasks": ["x.yaml"], "limit": 0}}), ["eval.lm_eval.limit: 0 must be > 0"]),
    "missing resume checkpoint": (dict(resume="outputs/none/checkpoint-9"), ["resume: checkpoint directory not found"]),
    "resume not bool or path": (dict(resume=3), ["resume: expected true/false or a checkpoint path, got int 3"]),
    "resume with nothing to resume": (dict(resume=True, training={"output_dir": "outputs/never-ran"}),
                                      ["resume: true but outputs/never-ran holds no checkpoint"]),
    "overwrite and resume": (dict(resume=str(ROOT / "recipes"), overwrite=True),
                             ["overwrite: true and resume exclude each other"]),
    "overwrite not a bool": (dict(overwrite="yes"), ["overwrite: expected bool, got str 'yes'"]),
    # ranges: numbers a run cannot use are found here, not after the model is loaded (or never)
    "max_steps -5 (trained silently before)": (dict(training={"max_steps": -5}),
                                               ["training.max_steps: -5 must be -1 (no limit) or > 0"]),
    "max_steps 0": (dict(training={"max_steps": 0}), ["training.max_steps: 0 must be -1 (no limit) or > 0"]),
    "batch size 0": (dict(training={"per_device_train_batch_size": 0}),
                     ["training.per_device_train_batch_size: 0 must be >= 1"]),
    "eval batch size negative": (dict(training={"per_device_eval_batch_size": -2}),
                                 ["training.per_device_eval_batch_size: -2 must be >= 1"]),
    "accumulation 0": (dict(training={"gradient_accumulation_steps": 0}),
                       ["training.gradient_accumulation_steps: 0 must be >= 1"]),
    "epochs 0": (dict(training={"num_train_epochs": 0}), ["training.num_train_epochs: 0 must be > 0"]),
    "negative warmup": (dict(training={"warmup_steps": -1}), ["training.warmup_steps: -1 must be >= 0"]),
    "logging_steps 0": (dict(training={"logging_steps": 0}), ["training.logging_steps: 0 must be > 0"]),
    "negative seed": (dict(training={"seed": -1}), ["training.seed: -1 must be >= 0"]),
    "max_new_tokens 0": (dict(eval={"metrics": ["exact_match"], "max_new_tokens": 0}),
                         ["eval.max_new_tokens: 0 must be >= 1"]),
    # non-finite numbers, wherever they are
    "lr inf": (dict(optimizer__lr=math.inf), ["optimizer.lr: inf is not a finite number"]),
    "lr nan": (dict(optimizer__lr=math.nan), ["optimizer.lr: nan is not a finite number"]),
    "weight decay nan": (dict(optimizer__weight_decay=math.nan), ["optimizer.weight_decay: nan is not a finite number"]),
    "nan in betas": (dict(optimizer__betas=[0.9, math.nan]), ["optimizer.betas[1]: nan is not a finite number"]),
    "nan eval_fraction": (dict(data__eval_file=..., data__eval_fraction=math.nan),
                          ["data.eval_fraction: nan is not a finite number"]),
    "inf lora dropout": (dict(finetune={"lora": {"dropout": -math.inf}}),
                         ["finetune.lora.dropout: -inf is not a finite number"]),
    "nan training field": (dict(training={"max_grad_norm": math.nan}),
                           ["training.max_grad_norm: nan is not a finite number"]),
    "inf deep in a training passthrough": (dict(training={"lr_scheduler_kwargs": {"min_lr": [1e-6, math.inf]}}),
                                           ["training.lr_scheduler_kwargs.min_lr[1]: inf is not a finite number"]),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_recipe_names_the_problem(case):
    changes, expected = BAD[case]
    problems = _problems(_recipe(**changes))
    text = "\n".join(problems)
    for fragment in expected:
        assert fragment in text, text
    assert len(problems) == 1, problems  # one mistake, one message


def test_every_problem_is_collected_at_once():
    raw = _recipe(model__nmae="x", data__max_length="long", optimizer__name="sgdd", training={"bogus": 1},
                  hub={"push": True})
    problems = _problems(raw)
    assert len(problems) == 5, problems
    assert {p.split(":")[0].split(" ")[0] for p in problems} == {
        "model.nmae", "data.max_length", "optimizer.name", "training.bogus", "hub.push"}


def test_an_unknown_key_does_not_hide_the_checks_of_its_section():
    problems = _problems(_recipe(model__quantisation="4bit", model__quantization="4bit",
                                 finetune={"method": "full", "lora": {"r": 8, "dropuot": 0.1}}))
    assert sorted(problems) == [
        "finetune.lora is set but finetune.method is full; remove it or use lora/qlora",
        "finetune.lora.dropuot: unknown key (did you mean 'dropout'?)",
        "model.quantisation: unknown key (did you mean 'quantization'?)",
        "model.quantization 4bit with finetune.method full: quantized weights cannot be trained directly; "
        "use finetune.method qlora (or lora on 8bit)"], problems


def test_every_optimizer_problem_is_collected_at_once():
    problems = _problems(_recipe(optimizer={"name": "tam", "lr": "fast", "betas": [0.9, 0.9], "nesterov": True,
                                            "momentum": math.inf}))
    assert sorted(p.split(":")[0].split(" ")[0] for p in problems) == [
        "optimizer.betas", "optimizer.lr", "optimizer.momentum", "optimizer.nesterov"], problems


def test_error_message_quotes_only_a_prefix_of_a_huge_value():
    huge = "x" * 100_000
    for raw in (_recipe(model__quantization=huge), _recipe(data__max_length=huge), _recipe(optimizer__name=huge),
                _recipe(training={"max_steps": [huge] * 1000}), _recipe(**{"model__" + huge: 1})):
        (problem,) = _problems(raw)
        assert len(problem) < 260 and "xxxx" in problem, problem[:300]


# --------------------------------------------------------------------------------- the optimizer registry


@pytest.fixture
def adagrad():
    spec = registry.add(registry.OptimizerSpec("adagrad", torch.optim.Adagrad, "adam", torque=False))
    yield spec
    del registry.OPTIMIZERS["adagrad"]


def test_an_optimizer_added_to_the_registry_is_accepted_with_no_other_edit(adagrad):
    recipe = validate_recipe(_recipe(optimizer={"name": "adagrad", "lr": 0.01, "lr_decay": 1e-4,
                                                "initial_accumulator_value": 0.1}))
    assert recipe.optimizer.kwargs() == {"lr": 0.01, "lr_decay": 1e-4, "initial_accumulator_value": 0.1}
    (problem,) = _problems(_recipe(optimizer={"name": "adagrad", "lr": 0.01, "momentum": 0.9}))
    assert problem.startswith("optimizer.momentum does not apply to adagrad (it takes lr, lr_decay, weight_decay, "
                              "initial_accumulator_value, eps, maximize)"), problem
    (problem,) = _problems(_recipe(optimizer={"name": "adagrad", "lr": 0.01, "lr_decay": -1.0}))
    assert problem == "optimizer: Invalid lr_decay value: -1.0 (Adagrad)"  # the constructor's own check


def test_optimizer_keys_come_from_the_constructor():
    for name, spec in registry.OPTIMIZERS.items():
        keys = {k: v for k, v in spec.defaults().items() if k != "lr" and v is not None}
        recipe = validate_recipe(_recipe(optimizer={"name": name, "lr": 0.01, **keys}))
        assert recipe.optimizer.kwargs() == {"lr": 0.01, **keys}, name


def test_optimizer_alias_resolves_to_its_name():
    spec = registry.OPTIMIZERS["adatamw"]
    registry.add(registry.OptimizerSpec(spec.name, spec.cls, spec.family, spec.torque, aliases=("adatam-w",)))
    try:
        assert validate_recipe(_recipe(optimizer__name="adatam-w")).optimizer.name == "adatamw"
    finally:
        registry.add(spec)


def test_unset_keys_written_by_older_versions_still_load():
    # resolved recipes of earlier releases list every optimizer's keys, unset ones as null
    raw = _recipe(optimizer={"name": "adatamw", "lr": 1e-3, "momentum": None, "nesterov": None, "betas": None})
    assert validate_recipe(raw).optimizer.kwargs() == {"lr": 1e-3}
    assert "optimizer.momentun: unknown key" in "\n".join(_problems(_recipe(optimizer__momentun=None)))


def test_unset_optimizer_keys_read_as_none():
    opt = validate_recipe(_recipe(optimizer__betas=[0.8, 0.9])).optimizer
    assert opt.betas == [0.8, 0.9] and opt.weight_decay is None
    with pytest.raises(AttributeError):
        opt.momentum  # noqa: B018 - adatamw has no momentum


# ------------------------------------------------------------------------------------------------- YAML


def test_python_tag_is_refused_not_executed(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.yaml"
    path.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(RecipeError, match="could not determine a constructor"):
        load_recipe(path)
    assert not marker.exists()


def test_duplicate_keys_are_an_error_naming_key_and_lines(tmp_path):
    text = yaml.safe_dump(GOOD, sort_keys=False) + "optimizer:\n  name: tam\n  lr: 1.0\n"
    (problem,) = _load_problems(tmp_path, text)
    assert "duplicate key 'optimizer' (first at line 7)" in problem and "line 10" in problem, problem
    nested = "model:\n  name: embedded:tiny-llama\n  dtype: auto\n  dtype: float32\n"
    (problem,) = _load_problems(tmp_path, nested)
    assert "duplicate key 'dtype' (first at line 3)" in problem and "line 4" in problem, problem


def test_merge_keys_may_be_overridden():
    data = read_yaml("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n")
    assert data == {"a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 2}}


def test_yaml_errors_are_one_line_without_the_quoted_source(tmp_path):
    (problem,) = _load_problems(tmp_path, "model: {name: [" + "x" * 10_000 + "\n")
    assert problem.startswith("YAML could not be read: ") and "line 2" in problem and "xxxx" not in problem, problem
    (problem,) = _load_problems(tmp_path, "model: !" + "t" * 10_000 + " x\n")
    assert "could not determine a constructor for the tag" in problem and len(problem) < 300, problem


def test_deep_nesting_is_a_recipe_error(tmp_path):
    # 1000 levels raised RecursionError (a traceback); block style is refused at the same depth
    (problem,) = _load_problems(tmp_path, "model: " + "[" * 1000 + "]" * 1000 + "\n")
    assert "nested deeper than 32 levels" in problem and "line 1" in problem, problem
    block = "".join(" " * i + f"k{i}:\n" for i in range(40)) + " " * 40 + "v\n"
    (problem,) = _load_problems(tmp_path, block)
    assert "nested deeper than 32 levels" in problem, problem


def test_alias_bomb_is_a_recipe_error(tmp_path):
    # "billion laughs": 10**9 strings once expanded; it ran 87 s into a MemoryError
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    (problem,) = _load_problems(tmp_path, "\n".join(lines) + "\n")
    assert "more than 100000 values once aliases are expanded" in problem and "line 5" in problem, problem


def test_huge_plain_list_is_refused_as_it_is_read(tmp_path):
    (problem,) = _load_problems(tmp_path, "model: [" + "1," * 200_000 + "1]\n")
    assert "more than 100000 values" in problem, problem


def test_aliases_may_nest_deep_only_within_the_bound(tmp_path):
    lines = ["a0: &a0 " + "[" * 10 + "1" + "]" * 10] + [f"a{i}: &a{i} [[[[*a{i - 1}]]]]" for i in range(1, 8)]
    (problem,) = _load_problems(tmp_path, "\n".join(lines) + "\n")
    assert "nested deeper than 32 levels" in problem, problem


def test_recursive_alias_is_a_recipe_error(tmp_path):
    (problem,) = _load_problems(tmp_path, "model: &m [*m]\n")
    assert "refers to a node that contains it" in problem, problem


# --------------------------------------------------------------------------------------------- overrides


def test_overrides_apply_before_validation(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    recipe = load_recipe(path, ["optimizer.lr=5e-4", "finetune.lora.r=4", "training.max_steps=3"])
    assert recipe.optimizer.lr == 5e-4 and recipe.finetune.lora.r == 4 and recipe.training["max_steps"] == 3
    with pytest.raises(RecipeError, match="optimizer.lrr: unknown key"):
        load_recipe(path, ["optimizer.lrr=1"])


def test_override_no_stays_a_string(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    recipe = load_recipe(path, ["training.save_strategy=no", "training.disable_tqdm=true"])
    assert recipe.training["save_strategy"] == "no" and recipe.training["disable_tqdm"] is True


def test_override_to_inf_is_a_recipe_error(tmp_path):
    (problem,) = _load_problems(tmp_path, yaml.safe_dump(GOOD), ["optimizer.lr=.inf"])
    assert problem == "optimizer.lr: inf is not a finite number"


def test_override_into_a_section_written_as_null(tmp_path):
    # a resolved full fine-tuning recipe says `lora: null` and `distributed: null`
    text = to_yaml(validate_recipe(_recipe(finetune={"method": "full"})))
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    recipe = load_recipe(path, ["finetune.method=lora", "finetune.lora.r=8"])
    assert recipe.finetune.lora.r == 8 and recipe.finetune.lora.alpha == 32


def test_bad_overrides_are_reported_not_applied():
    raw = _recipe()
    deep = ".".join(["a"] * 40)
    problems = apply_overrides(raw, ["optimizer.lr", "=3", "model..name=x", "model.name.x=1", deep + "=1"])
    assert problems[:4] == ["override 'optimizer.lr': expected key.path=value",
                            "override '=3': expected key.path=value",
                            "override 'model..name': empty key in the path",
                            "override 'model.name.x': model.name is not a section"], problems
    assert problems[4].startswith("override 'a.a.a.a.") and problems[4].endswith(": nested deeper than 32 levels")
    assert len(problems[4]) < 120 and len(problems) == 5
    assert raw == _recipe()


def _leaves(node, prefix=""):
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


def _as_override(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_key_of_a_written_recipe_can_be_overridden(path, tmp_path):
    """`--print-config` writes a recipe; each of its keys, set back to its own value from the command line,
    gives the same recipe."""
    recipe = load_recipe(path)
    written = tmp_path / "resolved.yaml"
    written.write_text(to_yaml(recipe))
    assert load_recipe(written) == recipe
    leaves = list(_leaves(yaml.safe_load(written.read_text())))
    assert len(leaves) > 40
    overrides = [f"{key}={_as_override(value)}" for key, value in leaves]
    assert load_recipe(written, overrides) == recipe


# ----------------------------------------------------------------------------------------- output_dir


def test_output_dir_under_a_file_is_found_at_validation(tmp_path):
    (tmp_path / "afile").write_text("x")
    (problem,) = _problems(_recipe(training={"output_dir": str(tmp_path / "afile" / "run")}))
    assert problem == f"training.output_dir: {tmp_path / 'afile'} is a file, not a directory"
    (problem,) = _problems(_recipe(training={"output_dir": str(tmp_path / "afile")}))
    assert problem == f"training.output_dir: {tmp_path / 'afile'} is a file, not a directory"


def test_output_dir_under_a_read_only_directory_is_found_at_validation():
    base = Path(tempfile.mkdtemp())
    locked = base / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    base.chmod(0o755)
    data = base / "train.jsonl"  # readable by the ordinary user, wherever the repository sits
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    data.chmod(0o644)
    files = dict(data__train_file=str(data), data__eval_file=str(data))
    raw = _recipe(training={"output_dir": str(locked / "sub" / "run")}, **files)
    validate_recipe(_recipe(training={"output_dir": str(base / "run")}, **files))  # lazy imports, while readable
    try:
        if os.geteuid() == 0:  # root writes anywhere: check as an ordinary user
            os.seteuid(65534)
        try:
            (problem,) = _problems(raw)
        finally:
            if os.getuid() == 0:
                os.seteuid(0)
        assert problem == f"training.output_dir: cannot create {locked / 'sub' / 'run'}: {locked} is not writable"
    finally:
        locked.chmod(0o755)
        locked.rmdir()
        data.unlink()
        base.rmdir()


def test_a_data_file_behind_an_unsearchable_directory_is_a_problem_not_a_traceback():
    base = Path(tempfile.mkdtemp())
    hidden = base / "hidden"
    hidden.mkdir()
    (hidden / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    hidden.chmod(0o000)
    base.chmod(0o777)  # the run itself could be written there by anyone
    readable = base / "eval.jsonl"  # the recipe's other file, readable wherever the repository sits
    readable.write_text('{"prompt": "a", "completion": "b"}\n')
    readable.chmod(0o644)
    raw = _recipe(data__train_file=str(hidden / "train.jsonl"), data__eval_file=str(readable),
                  training={"output_dir": str(base / "run")})
    validate_recipe(_recipe(data__train_file=str(readable), data__eval_file=str(readable),
                            training={"output_dir": str(base / "run")}))  # lazy imports now, while readable
    try:
        if os.geteuid() == 0:  # root searches anywhere: check as an ordinary user
            os.seteuid(65534)
        try:
            (problem,) = _problems(raw)
        finally:
            if os.getuid() == 0:
                os.seteuid(0)
        assert problem == f"data.train_file: file not found: {hidden / 'train.jsonl'}"
    finally:
        hidden.chmod(0o755)
        (hidden / "train.jsonl").unlink()
        hidden.rmdir()
        readable.unlink()
        base.rmdir()


def test_validation_creates_nothing(tmp_path):
    out = tmp_path / "new" / "run"
    recipe = validate_recipe(_recipe(training={"output_dir": str(out)}))
    assert recipe.output_dir == str(out) and not (tmp_path / "new").exists()


def test_to_dict_is_plain_data():
    d = to_dict(validate_recipe(_recipe(optimizer__betas=[0.8, 0.9])))
    assert d["optimizer"] == {"name": "adatamw", "lr": 1e-3, "betas": [0.8, 0.9]}
    assert yaml.safe_load(yaml.safe_dump(d)) == d


# ------------------------------------------------------------------------------ keys in the wrong section


@pytest.mark.parametrize("changes, expected", [
    (dict(output_dir="x"), "output_dir: unknown key (did you mean 'training.output_dir'?)"),
    (dict(model__max_length=64), "model.max_length: unknown key (did you mean 'data.max_length'?)"),
    (dict(data__max_step=3), "data.max_step: unknown key (did you mean 'training.max_steps'?)"),
    (dict(training__max_lenght=64), "training.max_lenght: not a TrainingArguments field (did you mean 'data.max_length'?)"),
    (dict(learning_rate=1e-3), "learning_rate: unknown key (did you mean 'optimizer.lr'?)"),
    (dict(optimizer__seed=1), "optimizer.seed: unknown key (did you mean 'training.seed'?)"),
    (dict(modle={"name": "x"}), "modle: unknown key (did you mean 'model'?)"),
    (dict(model__nmae="x"), "model.nmae: unknown key (did you mean 'name'?)"),
])
def test_unknown_key_names_the_section_that_has_it(changes, expected):
    problems = _problems(_recipe(**changes))
    assert any(p.startswith(expected) for p in problems), problems


def test_unknown_top_level_override_names_its_section(tmp_path):
    problems = _load_problems(tmp_path, yaml.safe_dump(GOOD), ["output_dir=runs/x"])
    assert problems == ["output_dir: unknown key (did you mean 'training.output_dir'?)"]


# ------------------------------------------------------------------------- output_dir a run must not own


def test_output_dir_refuses_root_home_and_the_model_being_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cases = {"/": "is the filesystem root", "~": "is the home directory", str(tmp_path / "home"): "is the home directory",
             str(model): "is the model directory being loaded",
             str(model / "run"): "is inside the model directory being loaded",
             str(tmp_path): "contains the model directory being loaded"}
    for output_dir, fragment in cases.items():
        (problem,) = _problems(_recipe(model__name=str(model), training={"output_dir": output_dir}))
        assert problem.startswith(f"training.output_dir: {output_dir} {fragment}"), problem
    validate_recipe(_recipe(model__name=str(model), training={"output_dir": str(tmp_path / "runs" / "a")}))
    monkeypatch.chdir(tmp_path / "home")  # a relative output_dir that is the home directory
    (problem,) = _problems(_recipe(training={"output_dir": "."}))
    assert "is the home directory" in problem


# ------------------------------------------------------------------------------------ resolved once


def test_paths_are_resolved_at_load_and_written_back_portably(tmp_path, monkeypatch):
    from tam_hf.finetune.config.resolve import DATA_DIR

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    raw = _recipe(data__train_file="~/t.jsonl", data__eval_file=["embedded:demo_eval.jsonl"],
                  training={"output_dir": "~/runs/x"}, distributed={"deepspeed": "recipes/accelerate/ds_zero2.json"})
    monkeypatch.chdir(ROOT)
    recipe = validate_recipe(raw)
    assert recipe.data.train_file == str(tmp_path / "t.jsonl")
    assert recipe.data.eval_file == [str(DATA_DIR / "demo_eval.jsonl")]
    assert recipe.output_dir == str(tmp_path / "runs" / "x")
    assert recipe.distributed.deepspeed == "recipes/accelerate/ds_zero2.json"  # relative stays relative
    assert recipe.model.embedded and recipe.model.local_dir == str(DATA_DIR / "tiny-llama")
    written = yaml.safe_load(to_yaml(recipe))
    assert written["data"]["eval_file"] == ["embedded:demo_eval.jsonl"] and written["model"]["name"] == "embedded:tiny-llama"
    assert validate_recipe(written) == recipe  # reloads to the same values


def test_training_fields_read_without_transformers_match_the_class():
    import dataclasses
    import typing

    from transformers import TrainingArguments

    from tam_hf.finetune.config import training

    fields = training.training_fields()
    assert fields == training._from_class()  # the ast reading and the imported class agree, field by field
    assert set(fields) == {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    assert fields["max_steps"] is int and fields["bf16"] is bool and fields["report_to"] is typing.Any


HEAVY = ("torch", "triton", "torch._dynamo", "transformers", "peft", "bitsandbytes", "datasets", "trl", "lm_eval",
         "evaluate", "deepspeed")


def test_validating_a_recipe_imports_no_heavy_module():
    """`tam-finetune RECIPE --validate` (the command, not only the loader) stays under a second or two."""
    code = ("import contextlib, io, sys\nfrom tam_hf.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['recipes/examples/demo_tiny.yaml', '--validate']) == 0\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [], f"validating a recipe imported {proc.stdout.strip()}"
