"""The recipe schema: shipped recipes validate; bad recipes fail with every problem named, before any loading."""

from pathlib import Path

import pytest
import yaml

from tam_hf.finetune.recipe import RecipeError, load_recipe, to_yaml, validate_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
GOOD = {
    "model": {"name": "embedded:tiny-llama"},
    "data": {"format": "prompt_completion", "train_file": "embedded:demo_train.jsonl",
             "eval_file": "embedded:demo_eval.jsonl"},
    "optimizer": {"name": "adatamw", "lr": 1e-3},
}


def _recipe(**changes) -> dict:
    """GOOD with dotted-path changes; a value of ... deletes the key."""
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


EXAMPLES = sorted((ROOT / "recipes" / "examples").glob("*.yaml"))


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


def test_good_recipe_gets_defaults():
    recipe = validate_recipe(_recipe())
    assert recipe.finetune.method == "lora" and recipe.finetune.lora.r == 16
    assert recipe.hub.artifact == "adapter" and recipe.eval.metrics == ["perplexity"]
    assert recipe.training["report_to"] == "none"
    assert validate_recipe(yaml.safe_load(to_yaml(recipe))) == recipe  # the saved resolved recipe reloads as is


BAD = {
    "unknown key with did-you-mean": (dict(model__nmae="x"), ["model.nmae: unknown key (did you mean 'name'?)"]),
    "unknown section": (dict(optimiser={"name": "tam"}), ["optimiser: unknown key (did you mean 'optimizer'?)"]),
    "missing required": (dict(optimizer__lr=...), ["optimizer.lr: required key is missing"]),
    "wrong type": (dict(data__max_length="long"), ["data.max_length: expected int, got str 'long'"]),
    "bool is not int": (dict(finetune={"method": "lora", "lora": {"r": True}}), ["finetune.lora.r: expected int"]),
    "bias_correction on tam": (dict(optimizer__name="tam", optimizer__bias_correction=True),
                               ["optimizer.bias_correction does not apply to tam"]),
    "answer_pattern not a regex": (dict(eval={"metrics": ["exact_match"], "answer_pattern": "(#"}),
                                   ["eval.answer_pattern: '(#' is not a regular expression"]),
    "answer_pattern without a group": (dict(eval={"metrics": ["exact_match"], "answer_pattern": "####"}),
                                       ["eval.answer_pattern: '####' needs a group"]),
    "fixed_damping out of range": (dict(optimizer__fixed_damping=1.5),
                                   ["optimizer.fixed_damping: 1.5 must be in [0, 1]"]),
    "bad enum": (dict(optimizer__name="adamtam"), ["optimizer.name: 'adamtam' is not one of", "did you mean 'adatam'?"]),
    "bad quantization": (dict(model__quantization="3bit"), ["model.quantization: '3bit' is not one of"]),
    "missing data file": (dict(data__train_file="nope/train.jsonl"), ["data.train_file: file not found: nope/train.jsonl"]),
    "bad file type": (dict(data__train_file="x.xlsx"), ["unsupported file type '.xlsx'"]),
    "missing model dir": (dict(model__name="./no/such/model"), ["model.name: local model directory not found"]),
    "unknown embedded": (dict(model__name="embedded:tiny-lama"), ["no embedded model 'tiny-lama'", "'tiny-llama'"]),
    "dataset and file": (dict(data__dataset="org/ds"), ["set exactly one of data.dataset"]),
    "two eval sources": (dict(data__eval_fraction=0.1), ["data.eval_file and data.eval_fraction exclude each other"]),
    "full with lora section": (dict(finetune={"method": "full", "lora": {"r": 8}}), ["finetune.lora is set but"]),
    "full on quantized": (dict(finetune={"method": "full"}, model__quantization="4bit"), ["quantized weights"]),
    "qlora on 8bit": (dict(finetune={"method": "qlora"}, model__quantization="8bit"), ["qlora needs a 4-bit base"]),
    "lora on 4bit": (dict(model__quantization="4bit"), ["lora on a 4-bit base is qlora: set finetune.method: qlora"]),
    "param of other optimizer": (dict(optimizer__momentum=0.9), ["optimizer.momentum does not apply to adatamw"]),
    "bad betas": (dict(optimizer__betas=[0.9, 1.5]), ["optimizer.betas: [0.9, 1.5] must be two values in [0, 1)"]),
    "unknown training arg": (dict(training={"num_train_epoch": 1}),
                             ["training.num_train_epoch: not a TrainingArguments field (did you mean 'num_train_epochs'?)"]),
    "training key owned elsewhere": (dict(training={"learning_rate": 1e-4}), ["training.learning_rate: set optimizer.lr"]),
    "training wrong type": (dict(training={"max_steps": "ten"}), ["training.max_steps: expected int"]),
    "metric for other task": (dict(eval={"metrics": ["accuracy"]}), ["accuracy does not apply to task causal_lm"]),
    "unknown metric": (dict(eval={"metrics": ["perplexty"]}), ["unknown metric 'perplexty' (did you mean 'perplexity'?)"]),
    "push without repo": (dict(hub={"push": True}), ["hub.push is true but hub.repo_id is not set"]),
    "format vs task": (dict(task="sequence_classification"), ["needs data.format classification"]),
    "column not read by format": (dict(data__columns={"question": "q"}), ["data.columns.question: format prompt_completion reads"]),
    "completion loss on text": (dict(data__format="text", data__completion_only_loss=True), ["format text has no completion"]),
    "missing distributed file": (dict(distributed={"deepspeed": "ds.json"}), ["distributed.deepspeed: file not found"]),
    "missing resume checkpoint": (dict(resume="outputs/none/checkpoint-9"), ["resume: checkpoint directory not found"]),
    "resume with nothing to resume": (dict(resume=True, training={"output_dir": "outputs/never-ran"}),
                                      ["resume: true but outputs/never-ran holds no checkpoint"]),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_recipe_names_the_problem(case):
    changes, expected = BAD[case]
    text = "\n".join(_problems(_recipe(**changes)))
    for fragment in expected:
        assert fragment in text, text


def test_every_problem_is_collected_at_once():
    raw = _recipe(model__nmae="x", data__max_length="long", optimizer__name="sgdd", training={"bogus": 1},
                  hub={"push": True})
    problems = _problems(raw)
    assert len(problems) == 5, problems
    assert {p.split(":")[0].split(" ")[0] for p in problems} == {
        "model.nmae", "data.max_length", "optimizer.name", "training.bogus", "hub.push"}


def test_python_tag_is_refused_not_executed(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.yaml"
    path.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(RecipeError, match="could not determine a constructor"):
        load_recipe(path)
    assert not marker.exists()


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


def test_lr_written_as_yaml_1_1_string_is_a_float():
    # YAML 1.1 reads `1e-4` (no dot) as a string; accepting it spares users a classic silent trap.
    assert validate_recipe(_recipe(optimizer__lr="1e-4")).optimizer.lr == 1e-4


def test_qlora_fills_in_4bit():
    assert validate_recipe(_recipe(finetune={"method": "qlora"})).model.quantization == "4bit"
