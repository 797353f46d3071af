"""Writes the paper-study recipes under recipes/paper/: `python recipes/paper/generate.py`.

The YAML files are committed (they are the documentation); this script is how they stay consistent: one table
of GLUE tasks, one of encoders, one of decoder setups. tests/test_paper_recipes.py checks the committed files
equal what this script renders, so edit here and rerun rather than editing a YAML by hand.

Learning rates: every recipe runs AdaTAMW at the AdamW lr of the usual fine-tuning setting times
(1 - beta1) / E[d] = 0.1 / 0.5 = 0.2 (the transfer rule: README.md, "The algorithm, and the learning rate to
use"); every header points there in one line (LR_RULE) and gives the AdamW command with the AdamW lr,
and the `compare` command that runs both (plus the constant-damping control) over seeds.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import yaml

HERE = Path(__file__).parent
TRANSFER = 0.2  # lr_AdaTAMW / lr_AdamW at beta1 = 0.9, E[d] = 0.5
LR_RULE = 'Why 0.2x: the lr-transfer rule, README.md section "The algorithm, and the learning rate to use".'


def _lr(x: float) -> str:
    return f"{x:.1e}".replace("e-0", "e-")


# ---------------------------------------------------------------------------------------- encoder (GLUE)

# task -> (columns, eval split, metrics, target, large): "large" tasks (>60k rows) get fewer epochs.
GLUE = {
    "cola": ({"text": "sentence"}, "validation", ["mcc", "accuracy"], "label", False),
    "sst2": ({"text": "sentence"}, "validation", ["accuracy"], "label", True),
    "mrpc": ({"text": "sentence1", "text_pair": "sentence2"}, "validation", ["accuracy", "f1"], "label", False),
    "stsb": ({"text": "sentence1", "text_pair": "sentence2"}, "validation", ["pearson", "spearman"], "score", False),
    "qqp": ({"text": "question1", "text_pair": "question2"}, "validation", ["accuracy", "f1"], "label", True),
    "mnli": ({"text": "premise", "text_pair": "hypothesis"}, "validation_matched", ["accuracy"], "label", True),
    "qnli": ({"text": "question", "text_pair": "sentence"}, "validation", ["accuracy"], "label", True),
    "rte": ({"text": "sentence1", "text_pair": "sentence2"}, "validation", ["accuracy"], "label", False),
}

# Usual settings: BERT paper (Devlin et al. 2019: lr 2e-5..5e-5, batch 32, 3 epochs) and RoBERTa paper
# (Liu et al. 2019, Table 10: lr 1e-5..3e-5, batch 16/32, 10 epochs, 6% warm-up, weight decay 0.1). The
# RoBERTa epochs are cut to 3 on the large tasks, as most reproductions do.
ENCODERS = {
    "bert-base-uncased": dict(hub="google-bert/bert-base-uncased", lr=2e-5, batch=32, small_batch=32,
                              epochs=3, large_epochs=3, warmup=0.1, weight_decay=0.01),
    "roberta-base": dict(hub="FacebookAI/roberta-base", lr=2e-5, batch=32, small_batch=16,
                         epochs=10, large_epochs=3, warmup=0.06, weight_decay=0.1),
    "roberta-large": dict(hub="FacebookAI/roberta-large", lr=1e-5, batch=32, small_batch=16,
                          epochs=10, large_epochs=3, warmup=0.06, weight_decay=0.1),
}


def glue_recipe(model: str, task: str) -> tuple[str, str, dict]:
    columns, eval_split, metrics, target, large = GLUE[task]
    m = ENCODERS[model]
    path = f"recipes/paper/glue/{model}/{task}.yaml"
    header = f"""tam-finetune {path}
  AdamW baseline:  tam-finetune {path} optimizer.name=adamw optimizer.lr={_lr(m['lr'])}
  Both + control, 3 seeds, report with mean ± std:
    tam-finetune compare {path} --optimizers adamw,adatamw,adatamw-const --seeds 3 --out runs/{model}-{task}

Reproduces the paper's encoder study (arXiv 2412.18790, LM fine-tuning): {model} fine-tuned in full on GLUE
{task.upper()} ({', '.join(metrics)} on {eval_split}), AdamW vs AdaTAMW. Usual GLUE settings for {model}; AdaTAMW at
{TRANSFER}x the AdamW lr {_lr(m['lr'])}. Needs the Hub (model + nyu-mll/glue).
On a GPU add training.bf16=true (mixed precision; left out so the recipe also validates on a CPU).
{LR_RULE}"""
    if task == "mnli":
        header += "\nMismatched validation: add data.eval_split=validation_mismatched."
    recipe = {
        "model": {"name": m["hub"]},
        "task": "sequence_classification",
        "data": {"dataset": "nyu-mll/glue", "config_name": task, "eval_split": eval_split,
                 "format": "classification", "columns": {**columns, "label": "label"}, "max_length": 128,
                 **({"target": "score"} if target == "score" else {})},
        "finetune": {"method": "full"},
        "optimizer": {"name": "adatamw", "lr": float(_lr(m["lr"] * TRANSFER)), "weight_decay": m["weight_decay"]},
        "training": {
            "num_train_epochs": m["large_epochs"] if large else m["epochs"],
            "per_device_train_batch_size": m["batch"] if large else m["small_batch"],
            "per_device_eval_batch_size": 128,
            "warmup_steps": m["warmup"],  # a float < 1 is a ratio of the total steps
            "lr_scheduler_type": "linear",
            "logging_steps": 50,
            "eval_strategy": "epoch",
            "save_strategy": "epoch",
            "save_total_limit": 1,
        },
        "eval": {"metrics": metrics},
    }
    return path, header, recipe


# ------------------------------------------------------------------------------------------------ decoders

DECODERS = {
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
}
# method -> (AdamW lr, extra recipe sections). LoRA lr 2e-4 and full 1e-5 are the common AdamW choices.
METHODS = {
    "lora": (2e-4, {"finetune": {"method": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.05,
                                                            "target_modules": "all-linear"}}}),
    "full": (1e-5, {"finetune": {"method": "full"}}),
}
DATASETS = {
    "alpaca": dict(
        data={"dataset": "yahma/alpaca-cleaned", "format": "instruction", "eval_fraction": 0.01, "max_length": 512},
        training={"num_train_epochs": 1, "eval_strategy": "steps", "eval_steps": 500, "save_steps": 500},
        eval={"metrics": ["perplexity"]},
        what="instruction following (Alpaca-cleaned, 52k instruction/input/output rows; loss on the response)",
    ),
    "gsm8k": dict(
        data={"dataset": "openai/gsm8k", "config_name": "main", "eval_split": "test", "format": "prompt_completion",
              "columns": {"prompt": "question", "completion": "answer"}, "max_length": 512},
        training={"num_train_epochs": 3, "eval_strategy": "epoch", "save_strategy": "epoch"},
        eval={"metrics": ["perplexity", "exact_match"], "answer_pattern": r"####\s*(-?[\d,.]+)",
              "max_new_tokens": 256, "max_generate_samples": 500,
              "lm_eval": {"tasks": ["gsm8k"], "num_fewshot": 5, "batch_size": 16}},
        what="math word problems (GSM8K main, question -> worked solution ending in '#### <number>'; loss on "
             "the solution)",
    ),
}


def decoder_recipe(model: str, method: str, dataset: str) -> tuple[str, str, dict]:
    adamw_lr, sections = METHODS[method]
    d = DATASETS[dataset]
    path = f"recipes/paper/decoder/{model}-{method}-{dataset}.yaml"
    about = (f"Extends the paper's LM study to decoder LLMs (asked for by its reviewers): "
             f"{'LoRA' if method == 'lora' else 'full'} fine-tuning of {DECODERS[model]} on {d['what']}. AdaTAMW at "
             f"{TRANSFER}x the AdamW lr {_lr(adamw_lr)}. Needs a GPU and the Hub"
             f"{' (Llama 3.2 is gated: accept its licence first)' if 'llama' in model else ''}; add training.bf16=true "
             "on a GPU that has it (left out so the recipe also validates on a CPU).")
    if dataset == "gsm8k":
        about += (" Answer accuracy: exact_match of the number after '####' in the generated and the reference "
                  "solution (eval.answer_pattern), on the first 500 test problems; then lm-evaluation-harness "
                  "gsm8k, 5-shot, on the whole test set (the [eval] extra; results in <output_dir>/lm_eval/).")
    header = f"""tam-finetune {path}
  AdamW baseline:  tam-finetune {path} optimizer.name=adamw optimizer.lr={_lr(adamw_lr)}
  Both + control, 3 seeds: tam-finetune compare {path} --optimizers adamw,adatamw,adatamw-const --seeds 3 \\
    --out runs/{model}-{method}-{dataset}

""" + textwrap.fill(about, 112, break_on_hyphens=False) + "\n" + LR_RULE
    recipe = {
        "model": {"name": DECODERS[model], "dtype": "bfloat16" if method == "lora" else "float32"},
        "task": "causal_lm",
        "data": d["data"],
        **sections,
        "optimizer": {"name": "adatamw", "lr": float(_lr(adamw_lr * TRANSFER)), "weight_decay": 0.0},
        "training": {
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 2,
            "per_device_eval_batch_size": 16,
            "warmup_steps": 0.03,
            "lr_scheduler_type": "cosine",
            **({"activation_checkpointing": True} if method == "full" else {}),
            "logging_steps": 10,
            "save_total_limit": 1,
            **d["training"],
        },
        "eval": d["eval"],
    }
    return path, header, recipe


def render(header: str, recipe: dict) -> str:
    comment = "\n".join(("# " + line).rstrip() for line in header.splitlines())
    return comment + "\n" + yaml.safe_dump(recipe, sort_keys=False, width=120)


def all_recipes() -> dict[str, str]:
    """repo-relative path -> file text."""
    out = {}
    for model in ENCODERS:
        for task in GLUE:
            path, header, recipe = glue_recipe(model, task)
            out[path] = render(header, recipe)
    for model in DECODERS:
        for method in METHODS:
            for dataset in DATASETS:
                path, header, recipe = decoder_recipe(model, method, dataset)
                out[path] = render(header, recipe)
    return out


def main() -> None:
    root = HERE.parents[1]
    for path, text in all_recipes().items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    print(f"wrote {len(all_recipes())} recipes under {HERE}")


if __name__ == "__main__":
    main()
