"""Hub push: an upload folder (adapter or merged model, tokenizer, model card, recipe) is written first,
then uploaded. An upload failure (offline, no login, no rights) never touches the local outputs: the run ends
with exit code 1 and the command that retries the push alone, `tam-finetune push RUN_DIR` (:mod:`tam_hf.commands.push`),
which uploads `RUN_DIR/hub_upload/` to the recipe's `hub.repo_id`.

Authentication is huggingface_hub's own (`hf auth login` or HF_TOKEN); tam_hf never reads, prints or
writes a token.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import tam_hf
from tam_hf.finetune.config.load import rerun_yaml
from tam_hf.finetune.config.resolve import portable
from tam_hf.finetune.config.schema import HUB_ID, Recipe

__all__ = ["prepare_upload", "model_card", "push"]

CITATION = """@article{malviya2024torque,
  title   = {Torque-Aware Momentum},
  author  = {Malviya, Pranshu and Mordido, Gon{\\c{c}}alo and Baratin, Aristide and Harikandeh, Reza Babanezhad
             and Dziugaite, Gintare Karolina and Pascanu, Razvan and Chandar, Sarath},
  journal = {arXiv preprint arXiv:2412.18790},
  year    = {2024}
}"""


def _shown(path: str) -> str:
    """A data file as a public card names it: ``embedded:NAME`` for the package's own, else the file name alone
    (a local path says nothing to a reader and tells the world about the trainer's disk)."""
    embedded = portable(path)
    return embedded if embedded != path else Path(path).name


def _files(value) -> list[str]:
    return [_shown(f) for f in ([value] if isinstance(value, str) else value)]


def _dataset_name(recipe: Recipe) -> str:
    d = recipe.data
    return d.dataset if _hub_dataset(recipe) else ", ".join(_files(d.dataset or d.train_file))


# recipe task -> the Hub's pipeline task that model-index files its results under
_HUB_TASK = {"causal_lm": "text-generation", "sequence_classification": "text-classification"}
LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"


def _hub_dataset(recipe: Recipe) -> str | None:
    name = recipe.data.dataset
    return name if name and HUB_ID.match(name) and not Path(name).exists() else None


def _eval_results(recipe: Recipe, summary: dict) -> list:
    """model-index entries: the recipe's eval metrics on its eval data, then lm-eval's (task, metric) pairs."""
    from huggingface_hub import EvalResult

    d = recipe.data
    task_type = _HUB_TASK[recipe.task]
    hub_dataset = _hub_dataset(recipe)
    if d.eval_file:
        files = [d.eval_file] if isinstance(d.eval_file, str) else d.eval_file
        where = dict(dataset_type="local", dataset_name=", ".join(_files(files)))
    else:
        split = f"{d.train_split} (held-out {d.eval_fraction:g})" if d.eval_fraction else d.eval_split
        where = dict(dataset_type=hub_dataset or "local", dataset_name=hub_dataset or _dataset_name(recipe),
                     dataset_config=d.config_name, dataset_split=split)
    results = [EvalResult(task_type=task_type, metric_type=k, metric_name=k, metric_value=v, **where)
               for k, v in (summary.get("eval") or {}).items() if _number(v)]
    for task, metrics in (summary.get("lm_eval") or {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if _number(value):
                results.append(EvalResult(
                    task_type="text-generation", task_name=task, dataset_type=task, dataset_name=task,
                    metric_type=metric, metric_name=f"{metric} ({filt})" if filt and filt != "none" else metric,
                    metric_value=value, source_name="lm-evaluation-harness", source_url=LM_EVAL_URL))
    return results


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def model_card(recipe: Recipe, summary: dict) -> str:
    """README.md for the Hub, built with huggingface_hub's ModelCard (which validates the metadata): base model,
    datasets, tags, library and a model-index of the eval metrics and lm-eval results, so the Hub shows them;
    then what was trained how, final metrics, the recipe, a citation."""
    from huggingface_hub import ModelCard, ModelCardData

    artifact = recipe.hub.artifact or "model"
    name = recipe.hub.repo_id or Path(summary.get("output_dir", "model")).name
    hub_dataset = _hub_dataset(recipe)
    data = ModelCardData(
        # Hub metadata links only to Hub ids, never local paths
        base_model=recipe.model.name if HUB_ID.match(recipe.model.name) and not Path(recipe.model.name).exists()
        else None,
        library_name="peft" if artifact == "adapter" else "transformers",
        tags=["tam_hf", "torque-aware-momentum", recipe.optimizer.name, recipe.finetune.method],
        datasets=[hub_dataset] if hub_dataset else None,
        pipeline_tag=_HUB_TASK[recipe.task],
        model_name=name,
        eval_results=_eval_results(recipe, summary) or None,
    )
    hyper = "\n".join(f"| {k} | {v} |" for k, v in recipe.optimizer.kwargs().items())
    evals = summary.get("eval") or {}
    metrics = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in evals.items())
    lm_eval = f"\nlm-evaluation-harness:\n\n{summary['lm_eval_table'].strip()}\n" if summary.get("lm_eval_table") else ""
    damping = summary.get("damping")
    damping_line = (f"Final mean damping {damping['mean']:.3f} (share of tensors below 0.5: "
                    f"{damping['frac_below_half']:.2f}).\n" if damping else "")
    return str(ModelCard(f"""---
{data.to_yaml()}
---

# {name}

{recipe.finetune.method} fine-tune of `{recipe.model.name}` ({recipe.task}) on `{_dataset_name(recipe)}`
({recipe.data.format} data), trained with **{recipe.optimizer.name}** (Torque-Aware Momentum family,
[arXiv:2412.18790](https://arxiv.org/abs/2412.18790)) using tam_hf {tam_hf.__version__}.
This repository holds the {"LoRA adapter" if artifact == "adapter" else "merged model" if artifact == "merged" else "full model"}.

## Optimizer

| hyperparameter | value |
|---|---|
{hyper}

{damping_line}Training: {summary.get('steps', '?')} steps, final train loss {summary.get('train_loss', float('nan')):.4g}.

## Evaluation

| metric | value |
|---|---|
{metrics or "| (none) | |"}
{lm_eval}
## Recipe

Reproduce with `tam-finetune recipe.yaml` (the file is in this repository).

```yaml
{rerun_yaml(recipe).strip()}
```

## Citation

```bibtex
{CITATION}
```
"""))


def prepare_upload(model, tokenizer, recipe: Recipe, summary: dict, output_dir: Path) -> Path:
    """Write `output_dir/hub_upload/` with everything the push sends; returns the folder."""
    folder = Path(output_dir) / "hub_upload"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if recipe.hub.artifact == "merged":
        # merge_and_unload mutates the wrapped model in place; it happens last, after save and eval.
        model.merge_and_unload().save_pretrained(folder)
    else:
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "recipe.yaml").write_text(rerun_yaml(recipe))
    (folder / "README.md").write_text(model_card(recipe, summary))
    return folder


def push(folder: Path, repo_id: str, private: bool) -> tuple[bool, str]:
    """Create the repo if needed and upload the folder: (succeeded, a one-line outcome); never raises."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                                 commit_message=f"tam_hf {tam_hf.__version__}: upload fine-tuned model")
        return True, f"pushed to https://huggingface.co/{repo_id} ({getattr(info, 'oid', 'ok')})"
    except Exception as exc:  # offline, not logged in, no rights: the local save already happened
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return False, (f"push to {repo_id} failed ({type(exc).__name__}: {reason}). Nothing is lost: everything "
                       f"is in {folder}")
