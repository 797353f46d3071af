"""The evaluate phase: the Trainer's eval loss and metrics, perplexity from the loss, and the metrics computed on
generated answers (``exact_match`` and ``evaluate:`` text metrics, causal LM only)."""

from __future__ import annotations

from tam_hf.finetune.config.schema import Recipe

__all__ = ["evaluate"]


def _generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    import torch

    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues at the right edge
    answers = []
    try:
        model.eval()
        for start in range(0, len(prompts), 16):
            batch = tokenizer(prompts[start:start + 16], return_tensors="pt", padding=True).to(model.device)
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def _generated(recipe, model, tokenizer, raw_eval) -> tuple[list[str], list[str]]:
    """(answers generated greedily for the first eval.max_generate_samples evaluation prompts, their references)."""
    from tam_hf.finetune.data import prompt_and_answer

    rows = raw_eval.select(range(min(len(raw_eval), recipe.eval.max_generate_samples)))
    pairs = [prompt_and_answer(row, recipe.data) for row in rows]
    answers = _generate_answers(model, tokenizer, [p for p, _ in pairs], recipe.eval.max_new_tokens)
    return answers, [ref for _, ref in pairs]


def _answer_texts(recipe, answers: list[str]) -> list[str]:
    """The part of each generation that is the answer: all of it with an answer_pattern (the pattern finds the
    answer in it), else the first line (a model that learned to stop emits EOS; what follows is not the answer)."""
    return answers if recipe.eval.answer_pattern is not None else [a.split("\n")[0] for a in answers]


def _exact_match(recipe, answers: list[str], references: list[str]) -> float:
    from tam_hf.finetune.metrics import exact_match

    # With a pattern (GSM8K: the number after '####' in a worked solution) both sides are reduced to it.
    return exact_match(_answer_texts(recipe, answers), references, recipe.eval.answer_pattern)


def evaluate(recipe: Recipe, trainer, tokenizer, raw_eval, split: str = "eval") -> tuple[dict, list[str]]:
    """(metrics, notes) on the eval set, or with ``split="validation"`` on ``trainer.validation_dataset`` (whose
    raw rows are ``raw_eval`` then): the trainer's loss and metrics, perplexity from the loss, and the generated
    metrics (exact_match, evaluate metrics on causal LM). A perplexity beyond float range is null, with a note.
    The trainer logs the validation scores as ``validation_*``: they never mix with the eval curve."""
    from tam_hf.finetune.config.schema import BUILTIN_METRICS
    from tam_hf.finetune.evaluate_metrics import is_metric_key, text_metrics
    from tam_hf.finetune.metrics import perplexity

    names = recipe.eval.metrics
    dataset = trainer.validation_dataset if split == "validation" else None  # None: the trainer's eval set
    scores = trainer.evaluate(eval_dataset=dataset, metric_key_prefix=split)
    metrics = {k.removeprefix(split + "_"): v for k, v in scores.items()
               if k.removeprefix(split + "_") == "loss" or is_metric_key(k.removeprefix(split + "_"), names)}
    notes = []
    if "perplexity" in names:
        metrics["perplexity"] = perplexity(metrics["loss"])
        if metrics["perplexity"] is None:
            notes.append(f"{split} perplexity is null: exp({split} loss {metrics['loss']:.4g}) is beyond float range")
    generated = [n for n in names if n == "exact_match" or n not in BUILTIN_METRICS]
    if recipe.task == "causal_lm" and generated:
        answers, references = _generated(recipe, trainer.model, tokenizer, raw_eval)
        if "exact_match" in names:
            metrics["exact_match"] = _exact_match(recipe, answers, references)
        metrics.update(text_metrics(names, _answer_texts(recipe, answers), references))
    return metrics, notes
