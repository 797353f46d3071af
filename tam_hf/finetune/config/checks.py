"""Cross-checks of a parsed recipe: settings that exclude or need each other, files and directories that must
exist (or be creatable: nothing is created here), and the rules of the features a recipe switches on, kept here
as data and functions so that validation needs no feature module:

* packing: which attention implementations keep packed rows apart (:func:`packing_problems`,
  :func:`attention_kind`; the SFT trainer applies the same rule to the loaded model);
* lm-evaluation-harness tasks (:func:`check_available`, :func:`task_problems`; lm-eval is imported only for a
  recipe with ``eval.lm_eval`` that names tasks);
* metrics: :mod:`tam_hf.finetune.config.metric_rules` (which metric fits which task, ``evaluate:`` metrics).

Each check runs only when the sections it reads parsed (else their own problems are already listed). Messages
quote the recipe's own spelling of a path; probes never raise (an unreachable path is a problem in the list).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from pydantic import ValidationError

from tam_hf.finetune.config.messages import did_you_mean, explain, key_text
from tam_hf.finetune.config.metric_rules import metric_problems, parse_metric
from tam_hf.finetune.config.resolve import (EMBEDDED_PREFIX, YAML_SUFFIXES, exists, is_task_path, local_source,
                                            probe, resolve_path)
from tam_hf.finetune.config.schema import (COMPLETION_FORMATS, EMBEDDED_MODELS, FILE_SUFFIXES,
                                           FORMAT_COLUMNS, HUB_ID, METRIC_TASKS, SwitchConfig)
from tam_hf.finetune.config.stage_rules import EVAL_SOURCES, STAGE_MARKER, restage, stage_data
from tam_hf.finetune.config.yaml_io import clip, short

__all__ = ["cross_check", "switch_section_problems", "CHAT_TEMPLATE_SUFFIXES", "MASKED_ATTENTION", "attention_kind",
           "packing_problems", "LM_EVAL_INSTALL", "COMMON_TASKS", "check_available", "task_manager", "task_problems"]


def cross_check(s: dict[str, Any], problems: list[str]) -> None:
    """Append the problems of the parsed sections ``s`` (section name -> value) to ``problems``."""
    r = SimpleNamespace(**s)
    staged = s.get("stages") is not None  # a stage's merged data is checked in its place (_check_stages)
    checks = [
        (_check_model, ("model",)),
        (_check_finetune, ("finetune", "model", "hub")),
        (_check_eval, ("eval", "data", "task")),
        (_check_hub, ("hub", "finetune")),
        (_check_launch, ("distributed", "resume", "overwrite", "training")),
        (_check_output_dir, ("training",)),
        (_check_trackers, ("training",)),
        (_check_switch, ("optimizer", "training", "distributed")),
    ]
    checks += [(_check_stages, ("stages", "data", "task", "model", "eval", "hub", "resume"))] if staged else [
        (_check_data, ("data", "task")), (_check_packing, ("data", "task", "model")),
        (_check_eval_data, ("eval", "data"))]
    for check, needs in checks:
        if all(k in s for k in needs):
            check(r, problems)


def _target(task: str, data) -> str | None:
    return data.target if task == "sequence_classification" else None


def _is_file(path: Path) -> bool:
    return probe(path, Path.is_file)


def _is_dir(path: Path) -> bool:
    return probe(path, Path.is_dir)


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids)


def _is_pathlike(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~", EMBEDDED_PREFIX)) or exists(Path(value).expanduser())


# ------------------------------------------------------------------------------------------- sections


def _check_trackers(r, problems: list[str]) -> None:
    from tam_hf.integrations.trackers import tracker_problems  # find_spec only: nothing imported

    report_to = r.training.get("report_to")
    names = [report_to] if isinstance(report_to, str) else report_to if isinstance(report_to, list) else []
    problems += [f"training.{p}" for p in tracker_problems([str(n) for n in names])]


def _check_launch(r, problems: list[str]) -> None:
    if r.distributed is not None:
        for key in ("accelerate_config", "deepspeed"):
            value = getattr(r.distributed, key)
            if value is not None and not _is_file(resolve_path(value)):
                problems.append(f"distributed.{key}: file not found: {clip(value)}")
    if r.overwrite and r.resume is not False:
        problems.append("overwrite: true and resume exclude each other: continue the run (resume) or start it over "
                        "(overwrite)")
    if isinstance(r.resume, str) and not _is_dir(resolve_path(r.resume)):
        problems.append(f"resume: checkpoint directory not found: {clip(r.resume)}")
    output_dir = r.training.get("output_dir")
    staged = getattr(r, "stages", None) is not None
    found = ("checkpoint-*",) if not staged else (f"stage-*/{p}" for p in ("checkpoint-*", STAGE_MARKER))
    if (r.resume is True and isinstance(output_dir, str)
            and not any(any(Path(output_dir).expanduser().glob(p)) for p in found)):
        what = "finished stage or stage-*/checkpoint-* directory" if staged else "checkpoint-* directory"
        problems.append(f"resume: true but {output_dir} holds no {what} to continue from")


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


def _home() -> Path | None:
    try:
        return _real(Path.home())
    except (KeyError, RuntimeError):
        return None


def _check_output_dir(r, problems: list[str]) -> None:
    """The run will create ``output_dir`` (and ``overwrite`` clears it): it must be a directory of the run's own,
    not a filesystem root, the home directory or the model directory being loaded; its nearest existing ancestor
    must be a writable directory. Found now rather than after the model is loaded; nothing is created here."""
    output_dir = r.training.get("output_dir")
    if not isinstance(output_dir, str):
        return
    path = Path(output_dir).expanduser()
    real = _real(path)
    own = "a run writes its checkpoints, model and summary there (and overwrite: true removes them): choose a " \
          "directory of its own, e.g. outputs/NAME"
    if real == Path(real.anchor):
        problems.append(f"training.output_dir: {clip(output_dir)} is the filesystem root; {own}")
        return
    if real == _home():
        problems.append(f"training.output_dir: {clip(output_dir)} is the home directory; {own}")
        return
    model = getattr(r, "model", None)
    source = local_source(model.name) if model is not None and _is_pathlike(model.name) else None
    if source is not None:
        model_dir = _real(Path(source))
        where = ("is the model directory being loaded" if real == model_dir else
                 "is inside the model directory being loaded" if model_dir in real.parents else
                 "contains the model directory being loaded" if real in model_dir.parents else None)
        if where:
            problems.append(f"training.output_dir: {clip(output_dir)} {where} (model.name {clip(model.name)}); "
                            f"a run must not write over its own base model: choose another directory")
            return
    existing = path
    while not exists(existing) and existing != existing.parent:
        existing = existing.parent
    if not _is_dir(existing):
        problems.append(f"training.output_dir: {existing} is a file, not a directory")
    elif not _writable(existing):
        problems.append(f"training.output_dir: {existing} is not writable" if existing == path else
                        f"training.output_dir: cannot create {path}: {existing} is not writable")


def _check_model(r, problems: list[str]) -> None:
    m = r.model
    if m.name.startswith(EMBEDDED_PREFIX):
        embedded = m.name[len(EMBEDDED_PREFIX):]
        if embedded not in EMBEDDED_MODELS:
            problems.append(f"model.name: no embedded model {short(embedded)}{did_you_mean(embedded, EMBEDDED_MODELS)}; "
                            f"embedded: {', '.join(EMBEDDED_MODELS)}")
    elif _is_pathlike(m.name):
        if not _is_dir(resolve_path(m.name)):
            problems.append(f"model.name: local model directory not found: {clip(m.name)}")
        elif m.gguf_file and not _is_file(resolve_path(m.name) / m.gguf_file):
            problems.append(f"model.gguf_file: {short(m.gguf_file)} not found in {clip(m.name)}")
    elif not HUB_ID.match(m.name):
        problems.append(f"model.name: {short(m.name)} is neither an existing directory nor a Hub id (org/name)")
    if m.gguf_file is not None and m.quantization != "none":
        problems.append("model.gguf_file and model.quantization: a GGUF checkpoint is dequantised on load; "
                        "it cannot also be loaded through bitsandbytes")


CHAT_TEMPLATE_SUFFIXES = (".jinja", ".j2")


def _check_data(r, problems: list[str]) -> None:
    d = r.data
    if (d.dataset is None) == (d.train_file is None):
        problems.append("data: set exactly one of data.dataset (Hub id or directory) and data.train_file")
    evals = [k for k in ("eval_split", "eval_file", "eval_fraction") if getattr(d, k) is not None]
    if len(evals) > 1:
        problems.append(f"data: {' and '.join('data.' + k for k in evals)} exclude each other; pick one eval source")
    if d.validation_split is not None and d.validation_file is not None:
        problems.append("data: data.validation_split and data.validation_file exclude each other; pick one "
                        "validation source")
    if d.eval_fraction is not None and d.validation_split is not None and d.eval_fraction + d.validation_split >= 0.9:
        problems.append(f"data: data.eval_fraction {d.eval_fraction:g} and data.validation_split "
                        f"{d.validation_split:g} leave {1 - d.eval_fraction - d.validation_split:.0%} of the rows to "
                        "train on; lower them")
    if d.eval_split is not None and d.dataset is None:
        problems.append("data.eval_split needs data.dataset; with local files use data.eval_file")
    for key in ("train_file", "eval_file", "validation_file"):
        value = getattr(d, key)
        for item in [value] if isinstance(value, str) else value or []:
            path = resolve_path(item)
            if path.suffix not in FILE_SUFFIXES:
                problems.append(f"data.{key}: {clip(item)}: unsupported file type {short(path.suffix)}; "
                                f"use one of {', '.join(sorted(FILE_SUFFIXES))}")
            elif not _is_file(path):
                problems.append(f"data.{key}: file not found: {clip(item)}")
    if d.dataset is not None and _is_pathlike(d.dataset) and not exists(resolve_path(d.dataset)):
        problems.append(f"data.dataset: local dataset not found: {clip(d.dataset)}")
    allowed = FORMAT_COLUMNS[d.format]
    for key in d.columns:
        if key not in allowed:
            problems.append(f"data.columns.{key_text(key)}: format {d.format} reads {', '.join(allowed)}"
                            f"{did_you_mean(key, allowed)}")
    if d.completion_only_loss and d.format not in COMPLETION_FORMATS:
        problems.append(f"data.completion_only_loss: format {d.format} has no completion; "
                        f"it applies to {', '.join(COMPLETION_FORMATS)}")
    if d.format == "classification":
        if r.task != "sequence_classification":
            problems.append(f"data.format classification needs task: sequence_classification (got {r.task})")
        if d.target == "score" and d.num_labels not in (None, 1):
            problems.append(f"data.num_labels: {d.num_labels} with data.target score (regression has one output)")
    elif r.task == "sequence_classification":
        problems.append(f"task sequence_classification needs data.format classification (got {d.format})")
    if d.format == "instruction" and "{instruction}" not in d.instruction_template:
        problems.append("data.instruction_template must contain {instruction}")
    if d.chat_template_path is not None:
        path = resolve_path(d.chat_template_path)
        if d.format != "chat":
            problems.append(f"data.chat_template_path applies to format chat (got {d.format})")
        elif path.suffix not in CHAT_TEMPLATE_SUFFIXES:
            problems.append(f"data.chat_template_path: {clip(d.chat_template_path)} is not a chat template file "
                            f"({' or '.join(CHAT_TEMPLATE_SUFFIXES)})")
        elif not _is_file(path):
            problems.append(f"data.chat_template_path: file not found: {clip(d.chat_template_path)}")


def _check_stages(r, problems: list[str]) -> None:
    """Each stage's merged data through the data checks; a problem every stage shares is named once, as the
    recipe's own (it comes from the shared data section), the others with the stage's path."""
    per_stage = []
    for i, stage in enumerate(r.stages):
        if stage is None or stage.data is None:  # no mapping, or its data is none: its problems are listed already
            continue
        found: list[str] = []
        data = stage_data(r.data, stage, i, problems)
        if data is not None:
            merged = SimpleNamespace(**{**vars(r), "data": data})
            _check_data(merged, found)
            _check_packing(merged, found)
            if not _has_eval(data):
                found.append("data: every stage is evaluated after each stage, on every stage's eval set: set "
                             "data.eval_file, data.eval_split or data.eval_fraction (for the stage, or in the "
                             "recipe's data section)")
        per_stage.append((i, found))
    shared = set.intersection(*(set(f) for _, f in per_stage)) if len(per_stage) > 1 else set()
    problems += [p for p in per_stage[0][1] if p in shared] if per_stage else []
    problems += [restage(p, i) for i, found in per_stage for p in found if p not in shared]
    if r.hub.push or r.hub.repo_id:
        problems.append("hub: a staged run cannot be pushed yet (its model card describes one dataset); remove "
                        "hub.push and hub.repo_id and upload the saved model yourself")
    if getattr(r, "optimizer", None) is not None and r.optimizer.switch is not None:
        problems.append("optimizer.switch with stages: each stage builds its optimizer afresh (its state carried "
                        "over), so a switch at one step of one stage is not defined; train the stages with one "
                        "optimizer")
    if isinstance(r.resume, str):
        problems.append("resume: a staged run continues with resume: true (it finds the stage to continue in "
                        "training.output_dir); a checkpoint path does not say which stages came before it")


def _check_finetune(r, problems: list[str]) -> None:
    f, q = r.finetune, r.model.quantization
    if f.method == "full":
        if f.lora is not None:
            problems.append("finetune.lora is set but finetune.method is full; remove it or use lora/qlora")
        if q != "none":
            problems.append(f"model.quantization {q} with finetune.method full: quantized weights cannot be "
                            "trained directly; use finetune.method qlora (or lora on 8bit)")
        if r.hub.artifact is not None:
            problems.append("hub.artifact applies to lora/qlora; full fine-tuning pushes the whole model")
    elif f.method == "qlora" and q != "4bit":
        problems.append(f"finetune.method qlora needs a 4-bit base, but model.quantization is {q}")
    elif f.method == "lora" and q == "4bit":
        problems.append("lora on a 4-bit base is qlora: set finetune.method: qlora")


def _check_hub(r, problems: list[str]) -> None:
    h = r.hub
    if h.push and not h.repo_id:
        problems.append("hub.push is true but hub.repo_id is not set")
    if h.repo_id is not None and not re.match(r"^[\w.-]+/[\w.-]+$", h.repo_id):
        problems.append(f"hub.repo_id: {short(h.repo_id)} must look like user/name")
    if r.finetune.method == "qlora" and h.artifact == "merged":
        problems.append("hub.artifact merged with qlora: merging into a 4-bit base is lossy; push the adapter")


# ------------------------------------------------------------------------------------------- switch


def switch_section_problems(first: str, first_lr, value) -> list[str]:
    """The problems of ``optimizer.switch`` (``value`` as written) for the optimizer ``first`` at lr
    ``first_lr``: types and ranges (SwitchConfig), ``to`` a registry name and a supported pair, the first lr > 0.
    What needs another section (training.max_steps, distributed) is :func:`_check_switch`'s."""
    from tam_hf.optim.switch_rules import pair_problem  # the registry only: no torch

    if value is None:
        return []
    if not isinstance(value, dict):
        return [f"optimizer.switch: expected a mapping {{to: NAME, at_step: K, lr: optional}}, got "
                f"{type(value).__name__} {short(value)}"]
    problems = []
    try:
        SwitchConfig.model_validate(value)
    except ValidationError as exc:
        problems += explain(exc, ("optimizer", "switch"), SwitchConfig)
    if isinstance(value.get("to"), str):
        problem = pair_problem(first, value["to"])
        if problem:
            problems.append(f"optimizer.switch.to: {problem}")
    if isinstance(first_lr, (int, float)) and not isinstance(first_lr, bool) and not first_lr > 0:
        problems.append(f"optimizer.lr: {first_lr!r} with optimizer.switch: a switch needs lr > 0 (the second "
                        "optimizer's lr follows the schedule as lr_now * switch.lr / lr)")
    return problems


def _check_switch(r, problems: list[str]) -> None:
    switch = r.optimizer.switch
    if switch is None:
        return
    max_steps = r.training.get("max_steps")
    if isinstance(max_steps, int) and max_steps > 0 and switch.at_step >= max_steps:
        problems.append(f"optimizer.switch.at_step: {switch.at_step} must be below training.max_steps "
                        f"({max_steps}): the run would end before (or right at) the switch")
    sharded = [k for k, on in (("distributed.deepspeed", r.distributed is not None and r.distributed.deepspeed),
                               ("training.fsdp", r.training.get("fsdp"))) if on]
    if sharded:
        problems.append(f"optimizer.switch with {' and '.join(sharded)}: the sharded wrapper rewrites the param "
                        "groups of the optimizer it is given, which the two optimizers inside the switch would not "
                        "see; use DDP (several processes without DeepSpeed/FSDP) or no switch")


# ------------------------------------------------------------------------------------------- packing

MASKED_ATTENTION = ("sdpa", "eager")  # attention implementations that take a 4D mask as given


def attention_kind(implementation: str) -> str:
    """'flash' for any flash-attention implementation, else the implementation's name (sdpa, eager, ...)."""
    return "flash" if "flash" in implementation else implementation


def packing_problems(packing: bool, padding_free: bool, attn_implementation: Optional[str]) -> list[str]:
    """Problems with data.packing / data.padding_free for model.attn_implementation (None: transformers picks,
    which is never flash-attention)."""
    impl = attn_implementation or "sdpa"
    if attention_kind(impl) == "flash":
        return []
    problems = []
    if padding_free and not packing:
        problems.append(
            f"data.padding_free needs flash-attention (model.attn_implementation: flash_attention_2), which "
            f"reads sequence boundaries from position ids; with {impl} it would only pad. Use data.packing: true, "
            "which packs rows and masks them apart with any attention")
    if (packing or padding_free) and impl not in MASKED_ATTENTION:
        problems.append(
            f"data.packing with model.attn_implementation {impl}: packed rows are masked apart for "
            f"{', '.join(MASKED_ATTENTION)} or flash-attention only; use one of them")
    return problems


def _check_packing(r, problems: list[str]) -> None:
    d = r.data
    if not (d.packing or d.padding_free):
        return
    if d.format == "classification":
        problems.append("data.packing / data.padding_free apply to causal-LM formats "
                        "(text, prompt_completion, instruction, chat)")
        return
    problems += packing_problems(d.packing, d.padding_free, r.model.attn_implementation)


# ------------------------------------------------------------------------------------------- lm-eval

LM_EVAL_INSTALL = 'pip install "tam_hf[eval]"   (from a checkout: pip install -e ".[eval]")'
COMMON_TASKS = ("gsm8k", "hellaswag", "arc_easy", "arc_challenge", "mmlu", "truthfulqa_mc2", "winogrande", "piqa")


def check_available() -> Optional[str]:
    """None when lm-evaluation-harness can be imported, else the problem with the command that installs it."""
    if importlib.util.find_spec("lm_eval") is None:
        return f"eval.lm_eval needs lm-evaluation-harness, an optional extra: {LM_EVAL_INSTALL}"
    return None


@lru_cache(maxsize=4)
def _task_manager(include: tuple[str, ...], defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, include_defaults=defaults)


def task_manager(tasks: list[str]):
    """A TaskManager that knows the named tasks; lm-eval's own index (thousands of YAML files, seconds to build,
    once per process) only when a task is given by name."""
    return _task_manager((), any(not is_task_path(t) for t in tasks))


def task_problems(tasks: list[str]) -> list[str]:
    """Problems with ``eval.lm_eval.tasks``: missing YAML files, unknown names (with close matches, else a few of
    lm-eval's tasks). Empty when every task can be loaded by name or path."""
    problems = []
    if not tasks:
        return ["eval.lm_eval.tasks: list at least one lm-eval task name or task YAML file"]
    for task in tasks:
        if is_task_path(task):
            path = resolve_path(task)
            if not _is_file(path):
                problems.append(f"eval.lm_eval.tasks: task file not found: {task}")
            elif path.suffix not in YAML_SUFFIXES:
                problems.append(f"eval.lm_eval.tasks: {task} is not a task YAML file (.yaml/.yml)")
    names = [t for t in tasks if not is_task_path(t)]
    if names:
        known = set(task_manager(names).all_tasks)
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
                examples = [t for t in COMMON_TASKS if t in known] or sorted(known)[:8]
                hint = f"did you mean {', '.join(close)}?" if close else f"known tasks include {', '.join(examples)}"
                problems.append(f"eval.lm_eval.tasks: unknown lm-eval task {name!r}; {hint} "
                                "(`lm-eval ls tasks` lists them; a task YAML file works too)")
    return problems


def _check_eval(r, problems: list[str]) -> None:
    target = _target(r.task, r.data)
    named = []  # built-in, evaluate:NAME or a metric script: the last two are loaded and their inputs checked
    for metric in r.eval.metrics:
        if metric not in METRIC_TASKS:
            if parse_metric(metric).kind in ("hub", "local"):
                named.append(metric)
                continue
            problems.append(f"eval.metrics: unknown metric {short(metric)}{did_you_mean(metric, METRIC_TASKS)}; "
                            f"known: {', '.join(METRIC_TASKS)}, or evaluate:NAME[/CONFIG], or a metric script")
            continue
        named.append(metric)
        if (r.task, target) not in METRIC_TASKS[metric]:
            problems.append(f"eval.metrics: {metric} does not apply to task {r.task}"
                            + (f" with data.target {target}" if target else ""))
    problems += metric_problems(named, r.task)
    # On causal LM, exact_match and evaluate metrics score answers generated for the evaluation prompts.
    generated = [m for m in r.eval.metrics if m == "exact_match"
                 or (r.task == "causal_lm" and m not in METRIC_TASKS and parse_metric(m).kind in ("hub", "local"))]
    if generated and r.data.format not in ("prompt_completion", "instruction"):
        problems.append(f"eval.metrics: {', '.join(map(short, generated))} score(s) answers generated for evaluation "
                        f"prompts and need prompt_completion or instruction data (got {r.data.format})")
    if r.eval.answer_pattern is not None:
        try:
            groups = re.compile(r.eval.answer_pattern).groups
        except re.error as exc:
            problems.append(f"eval.answer_pattern: {short(r.eval.answer_pattern)} is not a regular expression ({exc})")
        else:
            if groups < 1:
                problems.append(f"eval.answer_pattern: {short(r.eval.answer_pattern)} needs a group, "
                                "e.g. '####\\s*(\\S+)'")
        if "exact_match" not in r.eval.metrics:
            problems.append("eval.answer_pattern is set but eval.metrics has no exact_match")


def _has_eval(data) -> bool:
    return any(getattr(data, k) is not None for k in EVAL_SOURCES)


def _check_eval_data(r, problems: list[str]) -> None:
    if not _has_eval(r.data) and r.eval.metrics:
        problems.append("eval.metrics are set but there is no evaluation data: set data.eval_file, "
                        "data.eval_split or data.eval_fraction (or eval.metrics: [])")
    if r.eval.lm_eval is not None:
        if r.task != "causal_lm":
            problems.append(f"eval.lm_eval evaluates a language model: it needs task causal_lm (got {r.task})")
        else:
            missing = check_available()
            # Task names cost one build of lm-eval's task index (5-15 s, once per process); YAML paths nothing.
            problems += [missing] if missing else task_problems(r.eval.lm_eval.tasks)
