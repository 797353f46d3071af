"""The Hub model card, read back with huggingface_hub: base model, datasets, tags, library and a model-index of
the eval metrics and lm-eval results (task, dataset, metric, value); the prose and citation stay."""

from __future__ import annotations

import math

from huggingface_hub import ModelCard

from tam_hf.finetune.hub import CITATION, LM_EVAL_URL, model_card
from tam_hf.finetune.config.load import validate_recipe

SUMMARY = {
    "steps": 30, "train_loss": 1.25, "output_dir": "/runs/alpaca",
    "eval": {"loss": 1.5, "perplexity": 4.4817, "exact_match": 0.25},
    "lm_eval": {"gsm8k": {"exact_match,strict-match": 0.41, "exact_match,flexible-extract": 0.43},
                "arc_easy": {"acc,none": 0.6, "acc_norm,none": 0.58}},
    "lm_eval_table": "|Tasks|Value|\n|gsm8k|0.41|",
    "damping": {"mean": 0.61, "min": 0.4, "max": 0.8, "frac_below_half": 0.12},
}


def _recipe(tmp_path, **sections):
    raw = {
        "model": {"name": "embedded:tiny-llama"},
        "data": {"format": "prompt_completion", "train_file": "embedded:demo_train.jsonl",
                 "eval_file": "embedded:demo_eval.jsonl", "max_length": 32},
        "optimizer": {"name": "adatamw", "lr": 1e-3},
        "finetune": {"method": "lora"},
        "training": {"max_steps": 4, "output_dir": str(tmp_path / "out")},
        **sections,
    }
    return validate_recipe(raw)


def _read_back(tmp_path, text: str) -> ModelCard:
    path = tmp_path / "README.md"
    path.write_text(text)
    return ModelCard.load(path)


def _results(card: ModelCard) -> dict[tuple, tuple]:
    """(task_type, dataset_type, metric_name) -> (task_name, dataset_name, dataset_split, metric_type, value,
    source_name, source_url)"""
    return {(r.task_type, r.dataset_type, r.metric_name): (r.task_name, r.dataset_name, r.dataset_split,
                                                           r.metric_type, r.metric_value, r.source_name, r.source_url)
            for r in card.data.eval_results}


def test_hub_ids_metrics_and_lm_eval_results_parse_back(tmp_path):
    recipe = _recipe(tmp_path, hub={"repo_id": "someone/smollm2-alpaca-adatamw"})
    recipe.model.name, recipe.data.dataset = "HuggingFaceTB/SmolLM2-135M-Instruct", "tatsu-lab/alpaca"
    recipe.data.train_file, recipe.data.eval_file, recipe.data.eval_split = None, None, "test"
    card = _read_back(tmp_path, model_card(recipe, SUMMARY))

    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.datasets == ["tatsu-lab/alpaca"]
    assert card.data.library_name == "peft"
    assert card.data.tags == ["tam_hf", "torque-aware-momentum", "adatamw", "lora"]
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.model_name == "someone/smollm2-alpaca-adatamw"
    gen = "text-generation"
    assert _results(card) == {
        (gen, "tatsu-lab/alpaca", "loss"): (None, "tatsu-lab/alpaca", "test", "loss", 1.5, None, None),
        (gen, "tatsu-lab/alpaca", "perplexity"): (None, "tatsu-lab/alpaca", "test", "perplexity", 4.4817, None, None),
        (gen, "tatsu-lab/alpaca", "exact_match"): (None, "tatsu-lab/alpaca", "test", "exact_match", 0.25, None, None),
        (gen, "gsm8k", "exact_match (strict-match)"):
            ("gsm8k", "gsm8k", None, "exact_match", 0.41, "lm-evaluation-harness", LM_EVAL_URL),
        (gen, "gsm8k", "exact_match (flexible-extract)"):
            ("gsm8k", "gsm8k", None, "exact_match", 0.43, "lm-evaluation-harness", LM_EVAL_URL),
        (gen, "arc_easy", "acc"): ("arc_easy", "arc_easy", None, "acc", 0.6, "lm-evaluation-harness", LM_EVAL_URL),
        (gen, "arc_easy", "acc_norm"):
            ("arc_easy", "arc_easy", None, "acc_norm", 0.58, "lm-evaluation-harness", LM_EVAL_URL),
    }
    # the prose is the same as before the card moved onto huggingface_hub
    body = card.text
    assert body.lstrip().startswith("# someone/smollm2-alpaca-adatamw")
    assert "trained with **adatamw**" in body and "This repository holds the LoRA adapter." in body
    assert "Final mean damping 0.610 (share of tensors below 0.5: 0.12)." in body
    assert "Training: 30 steps, final train loss 1.25." in body
    assert "| exact_match | 0.25 |" in body and "lm-evaluation-harness:\n\n|Tasks|Value|\n|gsm8k|0.41|" in body
    assert "tam-finetune recipe.yaml" in body and CITATION in body


def test_local_model_and_files_stay_out_of_hub_links(tmp_path):
    recipe = _recipe(tmp_path, finetune={"method": "full"})
    summary = {"steps": 4, "train_loss": 2.0, "output_dir": str(tmp_path / "out"),
               "eval": {"loss": 2.5, "perplexity": None, "overflow": math.inf, "flag": True}}
    card = _read_back(tmp_path, model_card(recipe, summary))
    assert card.data.base_model is None and card.data.datasets is None
    assert card.data.library_name == "transformers" and card.data.model_name == "out"
    # only finite numbers are results; the eval file's name says where they were measured
    assert _results(card) == {
        ("text-generation", "local", "loss"): (None, "embedded:demo_eval.jsonl", None, "loss", 2.5, None, None)}
    assert "This repository holds the full model." in card.text


def test_held_out_split_and_classification_task(tmp_path):
    recipe = _recipe(tmp_path, finetune={"method": "full"})
    recipe.task, recipe.data.eval_file, recipe.data.eval_fraction = "sequence_classification", None, 0.1
    card = _read_back(tmp_path, model_card(recipe, {"steps": 4, "train_loss": 0.5, "eval": {"accuracy": 0.75}}))
    [result] = card.data.eval_results
    assert (result.task_type, result.dataset_type, result.dataset_name, result.dataset_split) == (
        "text-classification", "local", "embedded:demo_train.jsonl", "train (held-out 0.1)")
    assert card.data.pipeline_tag == "text-classification"


def test_no_metrics_means_no_model_index(tmp_path):
    card = _read_back(tmp_path, model_card(_recipe(tmp_path), {"steps": 0, "train_loss": 1.0}))
    assert card.data.eval_results is None
    assert "model-index" not in card.content and "| (none) | |" in card.text
