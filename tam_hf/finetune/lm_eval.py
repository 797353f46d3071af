"""lm-evaluation-harness on a fine-tuned model: after training (recipe section ``eval.lm_eval``) and on a finished
run (``tam-finetune eval RUN_DIR``).

lm-eval is an optional extra: recipe validation asks :func:`~tam_hf.finetune.config.checks.check_available`, so
a recipe that wants it without the extra fails before anything is loaded, with the install command, and checks
the task list the same way (:func:`~tam_hf.finetune.config.checks.task_problems`: unknown names with close
matches, missing YAML files). The tasks this module is given are resolved (a task file is a path to open).

Tasks are lm-eval task, group or tag names (``gsm8k``) or paths to task YAML files. In a task YAML, relative
``dataset_kwargs.data_files`` are read next to the YAML file (lm-eval alone reads them from the current
directory), so a task and its data can travel together; ``embedded:lm_eval/tiny_arith_choice.yaml`` is a tiny
one shipped with the package.

Results: ``<output_dir>/lm_eval/results.json`` holds lm-eval's results keyed by task (``{"gsm8k":
{"exact_match,strict-match": 0.41, ...}}``), ``results_full.json`` the rest of lm-eval's report (n-shot,
versions, configuration) and ``table.md`` lm-eval's table, which the run's summary prints.

After training the model in memory is evaluated as it is (a peft model keeps its adapter: nothing is merged into
the weights a Hub push may still need). ``tam-finetune eval RUN_DIR`` loads the base the run's recipe names, the
saved adapter on top (or the saved full model), and evaluates that.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from tam_hf.finetune.config.checks import check_available, task_manager, task_problems
from tam_hf.finetune.config.resolve import is_task_path
from tam_hf.finetune.errors import LMEvalError, RecipeError

__all__ = ["run_lm_eval", "evaluate_saved_run", "load_run_model", "summary_table"]


def _absolute_files(value, base: Path):
    if isinstance(value, str):
        candidate = base / value
        return str(candidate) if not Path(value).is_absolute() and candidate.exists() else value
    if isinstance(value, list):
        return [_absolute_files(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _absolute_files(v, base) for k, v in value.items()}
    return value


def _task_spec(task: str) -> Union[str, dict]:
    """What lm-eval's TaskManager.load takes for one recipe task: the name, the path, or (a YAML whose data
    files are relative) the YAML's config with those files made absolute next to it."""
    if not is_task_path(task):
        return task
    path = Path(task).resolve()
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's loader: `include:` and `!function` work

    config = load_yaml(path)
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is None or "task" not in config:
        return str(path)
    config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": _absolute_files(files, path.parent)}
    return config


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def summary_table(results: dict) -> dict[str, dict[str, float]]:
    """task -> {metric[,filter]: value} without standard errors, aliases and sample counts: what a summary prints."""
    return {task: {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and "_stderr" not in k and k not in ("sample_len", "sample_count")}
            for task, metrics in results.items()}


def run_lm_eval(model, tokenizer, tasks: list[str], output_dir: Union[str, Path], *, num_fewshot: Optional[int] = None,
                limit: Optional[Union[int, float]] = None, batch_size: int = 1, saved_at: Optional[str] = None) -> dict:
    """Run lm-eval on ``model`` (a transformers or peft model, evaluated in place) and write
    ``<output_dir>/lm_eval/``. Returns ``{"tasks": summary_table, "results_file": ..., "table": markdown}``.

    Any failure is raised as :class:`LMEvalError`; with ``saved_at`` (the run's output directory) its message
    says the trained model is saved there and how to evaluate it again."""
    after = (f" The trained model is saved at {saved_at}; evaluate it again with: tam-finetune eval {saved_at}"
             if saved_at else "")
    limit = limit if limit is None or limit < 1 else int(limit)  # a row count, or a fraction of each task
    problem = check_available()
    if problem:
        raise LMEvalError(problem + "." + after, exit_code=2)
    problems = task_problems(tasks)
    if problems:
        raise LMEvalError("; ".join(problems) + "." + after, exit_code=2)
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.utils import make_table

        specs = [_task_spec(t) for t in tasks]
        was_training = model.training
        model.eval()
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            out = simple_evaluate(model=lm, tasks=specs, num_fewshot=num_fewshot, limit=limit,
                                  task_manager=task_manager(tasks), log_samples=False)
        finally:
            model.train(was_training)
    except Exception as exc:  # lm-eval raises many kinds; the message and the saved model are what matter
        raise LMEvalError(f"lm-eval failed: {type(exc).__name__}: {exc}.{after}") from exc
    folder = Path(output_dir) / "lm_eval"
    folder.mkdir(parents=True, exist_ok=True)
    results = _jsonable(out["results"])
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    rest = {k: _jsonable(v) for k, v in out.items() if k not in ("results", "samples")}
    (folder / "results_full.json").write_text(json.dumps(rest, indent=2))
    table = make_table(out)
    (folder / "table.md").write_text(table)
    return {"tasks": summary_table(results), "results_file": str(folder / "results.json"), "table": table}


# ------------------------------------------------------------------------------------------- finished runs


def load_run_model(run_dir: Union[str, Path]):
    """(model, tokenizer, recipe) of a finished run: the base its recipe names with the saved adapter on top, or
    the saved full model; on the GPU when there is one (a bitsandbytes base stays where it was loaded)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tam_hf.finetune.config.load import load_recipe
    from tam_hf.finetune.model import DTYPES, load_base_model

    run_dir = Path(run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml")
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    if (run_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        # The base exactly as training loaded it (dtype, GGUF, 4/8-bit, attention), without a fresh adapter.
        model = PeftModel.from_pretrained(load_base_model(recipe, tokenizer), run_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(run_dir, dtype=DTYPES[recipe.model.dtype])
    if torch.cuda.is_available() and recipe.model.quantization == "none":
        model = model.to("cuda")
    return model, tokenizer, recipe


def _recipe_settings(run_dir: Path) -> dict:
    from tam_hf.finetune.config.load import read_recipe_file

    try:
        raw = read_recipe_file(run_dir / "recipe.yaml")
    except RecipeError as exc:
        raise LMEvalError(str(exc), exit_code=2) from None
    return dict(((raw.get("eval") or {}).get("lm_eval")) or {})


def evaluate_saved_run(run_dir: Union[str, Path], tasks: Optional[list[str]] = None, **overrides) -> dict:
    """lm-eval on a finished run; settings from its recipe's ``eval.lm_eval``, ``tasks`` / ``overrides``
    (num_fewshot, limit, batch_size) replacing them."""
    from tam_hf.finetune.config.load import lm_eval_section

    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise LMEvalError(f"{run_dir} is not a finished tam-finetune run (no recipe.yaml in it)", exit_code=2)
    settings = _recipe_settings(run_dir)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    settings["tasks"] = tasks or settings.get("tasks")
    if not settings["tasks"]:
        raise LMEvalError("no lm-eval tasks: the run's recipe has no eval.lm_eval.tasks; give --tasks", exit_code=2)
    problem = check_available()
    problems = [problem] if problem else task_problems(settings["tasks"])
    if problems:
        raise LMEvalError("; ".join(problems), exit_code=2)
    try:
        cfg = lm_eval_section(settings, f"lm-eval settings of {run_dir}")
    except RecipeError as exc:
        raise LMEvalError(str(exc), exit_code=2) from None
    try:
        model, tokenizer, _ = load_run_model(run_dir)
    except Exception as exc:
        raise LMEvalError(f"could not load the model of {run_dir}: {type(exc).__name__}: {exc}") from exc
    return run_lm_eval(model, tokenizer, cfg.tasks, run_dir, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                       batch_size=cfg.batch_size)
