"""The study's four tasks: the shipped files are exactly what the generators make (twice in a row, under another
hash seed too), their labels are right by an independent reading of each row, and the study recipes validate
and start with their compare command."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tam_hf.finetune.config.load import load_recipe, read_recipe_file
from tam_hf.finetune.config.resolve import resolve_path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tam_hf" / "assets" / "study"
STUDY = sorted((ROOT / "recipes" / "study").glob("*.yaml"))


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _module("generate_study_data")


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def test_shipped_files_are_what_the_generators_make():
    files = GEN.all_files()
    assert set(files) == {p.name for p in DATA.glob("*.jsonl")}  # no stale or unlisted file
    for name, text in files.items():
        assert (DATA / name).read_text() == text, f"{name}: rerun python scripts/generate_study_data.py"
    assert GEN.all_files() == files
    assert sum(len(t.encode()) for t in files.values()) < 1_500_000  # the wheel carries them


def test_generation_does_not_depend_on_the_hash_seed():
    """Set iteration order changes with PYTHONHASHSEED; a generator that iterated a set would differ here."""
    code = ("import importlib.util, hashlib, sys; s = importlib.util.spec_from_file_location('g', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print(hashlib.sha256(repr(sorted(m.all_files().items())).encode()).hexdigest())")
    script = str(ROOT / "scripts" / "generate_study_data.py")
    digests = {subprocess.run([sys.executable, "-c", code, script], env={**os.environ, "PYTHONHASHSEED": seed},
                              capture_output=True, text=True, check=True).stdout for seed in ("1", "2")}
    assert len(digests) == 1


@pytest.mark.parametrize("stem", ["preference", "shift_movies", "shift_restaurants", "shift_gadgets", "rules"])
def test_splits_are_disjoint_and_balanced(stem):
    train, evaluation = _rows(f"{stem}_train.jsonl"), _rows(f"{stem}_eval.jsonl")
    key = (lambda r: r["prompt"]) if stem == "rules" else (lambda r: (r["text"], r.get("text_pair")))
    assert len({key(r) for r in train}) == len(train) and not {key(r) for r in train} & {key(r) for r in evaluation}
    if stem != "rules":
        for rows in (train, evaluation):
            counts = Counter(r["label"] for r in rows).values()
            assert max(counts) - min(counts) <= 1


_CLAUSE = re.compile(r"the \w+ was (not )?(\w+)")


def _review_class(text: str, words: dict) -> int:
    """An independent reading: +1 per positive clause, -1 per negative one, a negation flipping it."""
    return sum((1 if words[w] else -1) * (-1 if neg else 1) for neg, w in _CLAUSE.findall(text.lower()))


def test_preference_labels_compare_the_two_reviews():
    pairs = _module("study_pairs")
    words = {**{w: True for w in pairs.POSITIVE}, **{w: False for w in pairs.NEGATIVE}}
    rows = _rows("preference_train.jsonl") + _rows("preference_eval.jsonl")
    for r in rows:
        first, second = _review_class(r["text"], words), _review_class(r["text_pair"], words)
        assert r["label"] == ("first" if first > second else "second" if second > first else "tie"), r
    # composition is needed: the same word decides opposite ways (negated or not) and ties mix classes
    negated = sum(" was not " in r["text"] for r in rows)
    assert 0.5 < negated / len(rows) < 0.8


def test_rule_completions_apply_the_named_operations_in_order():
    rules = _module("study_rules")
    meaning = {"zorp": lambda w: w[::-1], "flim": lambda w: w[1:] + w[:1], "mip": lambda w: w[-1:] + w[:-1],
               "blick": lambda w: [w[-1]] + w[1:-1] + [w[0]], "trell": sorted, "quax": lambda w: w[1:]}
    assert set(rules.OPERATIONS) == set(meaning)
    for r in _rows("rules_train.jsonl") + _rows("rules_eval.jsonl"):
        names, words = re.fullmatch(r"Apply (.+) to: (.+)\nResult:", r["prompt"]).groups()
        out = words.split()
        for name in names.split(" then "):
            out = list(meaning[name](out))
        assert r["completion"] == " " + " ".join(out)


def test_shift_domains_keep_their_words_and_some_words_flip():
    shift = _module("study_shift")
    for domain, spec in shift.DOMAINS.items():
        others = {a for d, s in shift.DOMAINS.items() if d != domain for a in s["aspects"]}
        for r in _rows(f"shift_{domain}_train.jsonl"):
            assert not any(f"the {a} was" in r["text"].lower() for a in others - set(spec["aspects"]))
    flips = [w for w, by in shift.SHIFTING.items() if len(set(by.values())) == 2]
    assert len(flips) == len(shift.SHIFTING)
    text = " ".join(r["text"] for d in shift.DOMAINS for r in _rows(f"shift_{d}_train.jsonl"))
    assert all(f" {w}" in text for w in flips)


def _header(path: Path) -> str:
    """The recipe's compare command: its first line (after a one-off preparation command, for task C)."""
    return next(line for line in path.read_text().splitlines() if "tam-finetune compare" in line)


@pytest.mark.parametrize("path", STUDY, ids=lambda p: p.stem)
def test_study_recipe_validates_and_starts_with_its_command(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    first = _header(path)
    assert first.replace("'", "").startswith(f"# OMP_NUM_THREADS=1 tam-finetune compare recipes/study/{path.name} "
                                             "--optimizers adamw,adatamw,adatamw-const"), first
    assert f"--tune-lr auto --seeds 5 --out runs/study/{path.stem} --set model.name=" in first, first
    assert path.read_text().splitlines().index(first) <= 1
    assert "Budget (one core, measured" in path.read_text()
    raw = read_recipe_file(path)
    assert raw["data"]["validation_split"] == 0.1 and raw["optimizer"]["name"] == "adamw"
    for stage in raw.get("stages", []):
        for key in ("train_file", "eval_file"):
            assert resolve_path(stage["data"][key]).is_file()
    recipe = load_recipe(path)
    assert recipe.training["max_steps"] > 0


def test_the_study_summary_takes_every_number_from_the_reports(tmp_path, monkeypatch):
    from scipy import stats

    from tam_hf.compare.report import write_report

    collect = _module("collect_study")
    monkeypatch.setattr(collect, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(collect, "DOCS", tmp_path / "docs")
    accuracy = {"adamw": [0.90, 0.92, 0.94], "adatamw": [0.85, 0.90, 0.89], "adatamw-const": [0.84, 0.86, 0.88]}
    results = [{"label": arm, "seed": seed, "log_history": [],
                "summary": {"train_loss": 0.1, "eval": {"accuracy": a, "loss": 1 - a}}}
               for arm, values in accuracy.items() for seed, a in enumerate(values)]
    source = tmp_path / "runs" / "sentiment"
    write_report(results, list(accuracy), source, "A")
    (source / "tuning.csv").write_text("arm,lr,seed,validation_accuracy,status,chosen\n"
                                       "adamw,0.0001,1000,0.9,completed,True\nadatamw,2e-06,1000,0.8,completed,True\n")
    assert collect.main() == 0
    assert (tmp_path / "docs" / "sentiment" / "runs.csv").is_file()  # the report is copied whole
    table = (tmp_path / "docs" / "summary.md").read_text().splitlines()
    row = next(line for line in table if line.startswith("| A: sentiment") and "eval_accuracy |" in line)
    tam = stats.ttest_rel(accuracy["adatamw"], accuracy["adamw"])
    angle = stats.ttest_rel(accuracy["adatamw"], accuracy["adatamw-const"])
    assert "adamw (lr 0.0001, n 3): 0.920 [0.870, 0.970]" in row  # 0.92 ± t(0.975, 2) * 0.02 / sqrt(3)
    assert "adatamw (lr 2e-06, n 3): 0.880" in row and "Δ -0.040 [" in row and f"p {tam.pvalue:.2g}" in row
    assert "adatamw-const (lr ?, n 3): 0.860" in row  # no tuning row chose it: said, not guessed
    half = stats.t.ppf(0.975, 2) * 0.01  # the differences 0.01, 0.04, 0.01: sd 0.01 * sqrt(3), se 0.01
    assert row.endswith(f"| Δ +0.020 [{0.02 - half:+.3f}, {0.02 + half:+.3f}], p {angle.pvalue:.2g} (3 pairs) |")
    assert any(line.startswith("| B: review preference") and "not run yet" in line for line in table)
