"""The recipe schema: one YAML file describes a whole fine-tuning run.

Loading is strict and eager. Every problem (unknown key with a did-you-mean, wrong type, bad enum value, missing
file, settings that exclude each other) is collected and raised once as a :class:`RecipeError`, before any model
or dataset is touched, so a typo costs seconds rather than an hour of training. Only ``yaml.safe_load`` is used:
a tag that would build a Python object is refused, never executed.

Relative file paths are read relative to the current directory (as ``trl`` and ``llamafactory-cli`` do);
``embedded:NAME`` points into the package's own ``tam_hf/assets`` directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

__all__ = ["Recipe", "RecipeError", "load_recipe", "validate_recipe", "apply_overrides", "to_dict", "to_yaml", "resolve_path"]

EMBEDDED_PREFIX = "embedded:"
DATA_DIR = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_MODELS = ("tiny-llama",)  # directories under tam_hf/assets holding config.json + tokenizer files

# Canonical columns each data format reads; `data.columns` maps them onto the dataset's own column names.
FORMAT_COLUMNS = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "instruction": ("instruction", "input", "output"),
    "chat": ("messages",),
    "classification": ("text", "text_pair", "label"),
}
COMPLETION_FORMATS = ("prompt_completion", "instruction", "chat")
FILE_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}

# Which keyword arguments each optimizer accepts (besides lr); anything else set in the recipe is an error.
OPTIMIZER_PARAMS = {
    "tam": ("momentum", "decay_rate", "damping_eps", "weight_decay", "cosine_scope", "fixed_damping"),
    "adatam": ("betas", "eps", "decay_rate", "damping_eps", "weight_decay", "cosine_scope", "fixed_damping",
               "bias_correction"),
    "adatamw": ("betas", "eps", "decay_rate", "damping_eps", "weight_decay", "cosine_scope", "fixed_damping",
                "bias_correction"),
    "adamw": ("betas", "eps", "weight_decay"),
    "sgd": ("momentum", "weight_decay", "nesterov"),
}

# Metric name -> the (task, target) pairs it makes sense for; checked here, computed in tam_hf.metrics.
METRIC_TASKS = {
    "accuracy": {("sequence_classification", "label")},
    "f1": {("sequence_classification", "label")},
    "mcc": {("sequence_classification", "label")},
    "pearson": {("sequence_classification", "score")},
    "spearman": {("sequence_classification", "score")},
    "perplexity": {("causal_lm", None)},
    "exact_match": {("causal_lm", None)},
}

# TrainingArguments fields that another recipe section owns: one place per setting.
TRAINING_OWNED = {
    "learning_rate": "optimizer.lr",
    "optim": "optimizer.name",
    "optim_args": "optimizer.*",
    "weight_decay": "optimizer.weight_decay",
    "adam_beta1": "optimizer.betas",
    "adam_beta2": "optimizer.betas",
    "adam_epsilon": "optimizer.eps",
    "resume_from_checkpoint": "resume",
    "deepspeed": "distributed.deepspeed",
    "push_to_hub": "hub.push",
    "hub_model_id": "hub.repo_id",
    "hub_token": "the huggingface_hub login (never the recipe)",
}

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class RecipeError(ValueError):
    """All the problems found in one recipe, reported together."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} is not valid, found {len(self.problems)} problem(s):\n{lines}")


def _help(text: str, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    kw = {"metadata": {"help": text}}
    if default is not dataclasses.MISSING:
        kw["default"] = default
    if factory is not dataclasses.MISSING:
        kw["default_factory"] = factory
    return field(**kw)


@dataclass
class ModelConfig:
    name: str = _help("Hub id, local directory, or embedded:tiny-llama (shipped in the package, offline).")
    gguf_file: Optional[str] = _help("GGUF file inside `name` to load (dequantised by transformers).", None)
    revision: Optional[str] = _help("Hub revision (branch, tag or commit).", None)
    tokenizer: Optional[str] = _help("Tokenizer id or path when it differs from `name`.", None)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _help("Weights dtype; auto keeps the checkpoint's.", "auto")
    quantization: Literal["none", "4bit", "8bit"] = _help("Load the base through bitsandbytes.", "none")
    trust_remote_code: bool = _help("Run code shipped with the checkpoint. Off unless you trust it.", False)
    attn_implementation: Optional[str] = _help("eager, sdpa, flash_attention_2 ...; None lets transformers pick.", None)


@dataclass
class DataConfig:
    format: Literal["text", "prompt_completion", "instruction", "chat", "classification"] = _help(
        "How rows become tokens; see FORMAT_COLUMNS for the columns each reads."
    )
    dataset: Optional[str] = _help("Hub dataset id or local dataset directory (exclusive with train_file).", None)
    config_name: Optional[str] = _help("Dataset configuration (subset) name.", None)
    train_file: Optional[Union[str, list[str]]] = _help("Local json/jsonl/csv/parquet/txt file(s).", None)
    eval_file: Optional[Union[str, list[str]]] = _help("Local evaluation file(s).", None)
    train_split: str = _help("Split to train on.", "train")
    eval_split: Optional[str] = _help("Split to evaluate on.", None)
    eval_fraction: Optional[float] = _help("Hold this fraction of the training rows out for evaluation.", None)
    columns: dict[str, str] = _help("Canonical column -> dataset column, e.g. {prompt: question}.", factory=dict)
    max_length: int = _help("Longest tokenised example; longer ones are truncated (completions from the end).", 512)
    completion_only_loss: Optional[bool] = _help(
        "Loss on completion/assistant tokens only. Default true for prompt_completion, instruction and chat.", None
    )
    instruction_template: str = _help(
        "Prompt for the instruction format; {instruction} and {input} are filled in.",
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    )
    target: Literal["label", "score"] = _help("classification: class labels, or a regression score.", "label")
    num_labels: Optional[int] = _help("classification: number of classes (default: counted in the train split).", None)
    max_train_samples: Optional[int] = _help("Use only the first N training rows.", None)
    max_eval_samples: Optional[int] = _help("Use only the first N evaluation rows.", None)


@dataclass
class LoraConfig:
    r: int = _help("LoRA rank.", 16)
    alpha: int = _help("LoRA alpha (scale = alpha / r).", 32)
    dropout: float = _help("Dropout on the LoRA input.", 0.05)
    target_modules: Union[str, list[str]] = _help("Module names, or all-linear.", "all-linear")
    bias: Literal["none", "all", "lora_only"] = _help("Which biases train.", "none")
    modules_to_save: Optional[list[str]] = _help("Modules trained in full beside the adapter (e.g. a head).", None)


@dataclass
class FinetuneConfig:
    method: Literal["lora", "qlora", "full"] = _help("qlora = lora on a 4-bit bitsandbytes base.", "lora")
    lora: Optional[LoraConfig] = _help("LoRA settings (lora and qlora only).", None)


@dataclass
class OptimizerConfig:
    name: Literal["tam", "adatam", "adatamw", "adamw", "sgd"] = _help("Optimizer; TAM family from tam_hf.optim.")
    lr: float = _help("Peak learning rate. AdaTAM(W) wants ~0.2x AdamW's (DESIGN.md §1); TAM ~2x SGDM's.")
    weight_decay: Optional[float] = _help(
        "Coupled for tam/adatam/sgd, decoupled for adatamw/adamw; unset means 0 (TrainingArguments' default). "
        "The Trainer never decays biases and norms.", None)
    momentum: Optional[float] = _help("tam/sgd momentum.", None)
    betas: Optional[list[float]] = _help("adatam/adatamw/adamw (beta1, beta2).", None)
    eps: Optional[float] = _help("Adam-style denominator epsilon.", None)
    decay_rate: Optional[float] = _help("TAM family: gamma, smoothing of the cosine (paper: 0.9).", None)
    damping_eps: Optional[float] = _help("TAM family: floor added to the damping (paper: 1e-8).", None)
    cosine_scope: Optional[Literal["tensor", "global"]] = _help("TAM family: cosine per tensor or per group.", None)
    fixed_damping: Optional[float] = _help(
        "TAM family, a control: hold the damping d at this value in [0, 1] instead of measuring the angle.", None)
    bias_correction: Optional[bool] = _help(
        "adatam/adatamw: Adam-style correction of both moments (not the paper's form; off by default). With it "
        "the 0.2x transfer rule holds from the first step instead of only after ~1000 steps.", None)
    nesterov: Optional[bool] = _help("sgd only.", None)

    def kwargs(self) -> dict[str, Any]:
        """The constructor keyword arguments the recipe sets (unset ones keep the optimizer's defaults)."""
        out = {"lr": self.lr}
        for key in OPTIMIZER_PARAMS[self.name]:
            value = getattr(self, key)
            if value is not None:
                out[key] = tuple(value) if key == "betas" else value
        return out


@dataclass
class EvalConfig:
    metrics: Optional[list[str]] = _help("Metric names; default depends on the task.", None)
    max_new_tokens: int = _help("exact_match: tokens generated per answer.", 16)
    max_generate_samples: int = _help("exact_match: evaluation rows generated for (generation is slow).", 64)
    answer_pattern: Optional[str] = _help(
        "exact_match: a regular expression whose first group is the answer, searched in the generation and in the "
        "reference (GSM8K: '####\\s*(-?[\\d,.]+)'); unset compares the first generated line with the reference.",
        None)


@dataclass
class HubConfig:
    push: bool = _help("Push after training. Uses your huggingface_hub login; the token never enters the recipe.", False)
    repo_id: Optional[str] = _help("Target repository, user/name. Set without push: only prepare hub_upload/.", None)
    private: bool = _help("Create the repository private.", True)
    artifact: Optional[Literal["adapter", "merged"]] = _help(
        "lora/qlora: push the adapter (default) or the base with the adapter merged in. Full fine-tuning pushes the model.",
        None,
    )


@dataclass
class DistributedConfig:
    accelerate_config: Optional[str] = _help("accelerate config file for the launcher.", None)
    deepspeed: Optional[str] = _help("DeepSpeed JSON config, passed to TrainingArguments.deepspeed.", None)


@dataclass
class Recipe:
    model: ModelConfig = _help("Base model.")
    data: DataConfig = _help("Datasets and how they are tokenised.")
    optimizer: OptimizerConfig = _help("Optimizer and its hyperparameters.")
    task: Literal["causal_lm", "sequence_classification"] = _help("What the model learns.", "causal_lm")
    finetune: FinetuneConfig = _help("lora, qlora or full.", factory=FinetuneConfig)
    training: dict[str, Any] = _help("transformers.TrainingArguments fields (unknown keys rejected).", factory=dict)
    eval: EvalConfig = _help("Evaluation metrics.", factory=EvalConfig)
    hub: HubConfig = _help("Hub push.", factory=HubConfig)
    distributed: Optional[DistributedConfig] = _help("Launcher configuration (validated and passed on).", None)
    resume: Union[bool, str] = _help("true: continue from the last checkpoint in output_dir; or a checkpoint path.", False)

    @property
    def output_dir(self) -> str:
        return self.training["output_dir"]


# ------------------------------------------------------------------------------------------------ loading


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override, validate. Raises RecipeError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"recipe file not found: {path}"], str(path))
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:  # includes tags such as !!python/object, which safe_load refuses
        raise RecipeError([f"YAML could not be read: {exc}".replace("\n", " ")], str(path)) from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError([f"the top level must be a mapping of sections, got {type(raw).__name__}"], str(path))
    problems = apply_overrides(raw, overrides)
    return validate_recipe(raw, name=path.stem, source=str(path), problems=problems)


_YAML11_BOOL_WORDS = {"yes", "no", "on", "off", "y", "n"}


def apply_overrides(raw: dict, overrides: list[str]) -> list[str]:
    """Apply `a.b.c=value` overrides in place (value read as YAML); returns problems instead of raising."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r}: expected key.path=value")
            continue
        try:
            # YAML 1.1 reads yes/no/on/off as booleans; on a command line `training.save_strategy=no` means "no"
            value = text if text.strip().lower() in _YAML11_BOOL_WORDS else yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node, parts = raw, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {key}: {part} is not a section")
                break
        else:
            node[parts[-1]] = value
    return problems


def validate_recipe(raw: dict, name: str = "recipe", source: str = "recipe", problems: list[str] = ()) -> Recipe:
    problems = list(problems)
    recipe = _build(Recipe, raw, "", problems)
    if recipe is not None:
        _check_recipe(recipe, name, problems)
    if problems:
        raise RecipeError(problems, source)
    return recipe


def to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the instruction template) as readable literal blocks."""


_Dumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)


def to_yaml(recipe: Recipe) -> str:
    return yaml.dump(to_dict(recipe), Dumper=_Dumper, sort_keys=False)


def resolve_path(value: str) -> Path:
    """`embedded:x` -> the file shipped in tam_hf/assets; anything else is a path relative to the current directory."""
    if value.startswith(EMBEDDED_PREFIX):
        return DATA_DIR / value[len(EMBEDDED_PREFIX):]
    return Path(value).expanduser()


# ------------------------------------------------------------------------------------------ generic typing


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


class _Invalid:
    """Stands in for a value that failed its check, so the other sections can still be checked."""

    def __repr__(self):
        return "<invalid>"


INVALID = _Invalid()


def _clean(obj) -> bool:
    """True when no value inside `obj` failed its check."""
    if obj is INVALID:
        return False
    if dataclasses.is_dataclass(obj):
        return all(_clean(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return True


def _build(cls, raw, where: str, problems: list[str]):
    """Turn a mapping into dataclass `cls`, appending every problem found; failed fields hold INVALID."""
    if not isinstance(raw, dict):
        problems.append(f"{where or 'recipe'}: expected a mapping, got {type(raw).__name__} {raw!r}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            problems.append(f"{where}{key}: unknown key{_did_you_mean(str(key), fields)}")
    values = {}
    for name, f in fields.items():
        if name in raw:
            ok, value = _coerce(hints[name], raw[name], f"{where}{name}", problems)
            values[name] = value if ok else INVALID
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{where}{name}: required key is missing ({f.metadata.get('help', '')})")
            values[name] = INVALID
    return cls(**values)


def _coerce(tp, value, where: str, problems: list[str]) -> tuple[bool, Any]:
    """Check `value` against annotation `tp`; numbers written as strings (YAML reads `1e-4` as a str) become floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        obj = _build(tp, value, where + ".", problems)
        return obj is not None and _clean(obj), obj
    if origin is Union:
        if value is None and type(None) in args:
            return True, None
        options = [a for a in args if a is not type(None)]
        for option in options:  # first option that fits, silently
            scratch = []
            ok, out = _coerce(option, value, where, scratch)
            if ok and not scratch:
                return True, out
        if len(options) == 1:
            return _coerce(options[0], value, where, problems)
        problems.append(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return False, None
    if origin is Literal:
        if value in args:
            return True, value
        hint = _did_you_mean(str(value), [str(a) for a in args])
        problems.append(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}{hint}")
        return False, None
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {type(value).__name__} {value!r}")
            return False, None
        out, ok = [], True
        for i, item in enumerate(value):
            item_ok, item_value = _coerce(args[0], item, f"{where}[{i}]", problems)
            ok &= item_ok
            out.append(item_value)
        return ok, out
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
            return False, None
        ok = True
        for key, item in value.items():
            ok &= _coerce(args[1], item, f"{where}.{key}", problems)[0]
        return ok, dict(value)
    if tp is Any:
        return True, value
    if tp is bool:
        if isinstance(value, bool):
            return True, value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value
    elif tp is str:
        if isinstance(value, str):
            return True, value
    problems.append(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return False, None


# ------------------------------------------------------------------------------------ cross-field checks


def _check_recipe(r: Recipe, name: str, problems: list[str]) -> None:
    """Cross-field checks; each runs only when the sections it reads passed their own checks."""
    checks = [
        (_check_model, ("model",)),
        (_check_data, ("data", "task")),
        (_check_finetune, ("finetune", "model", "hub")),
        (lambda r, p: _check_optimizer(r.optimizer, p), ("optimizer",)),
        (lambda r, p: _check_training(r, name, p), ("training",)),
        (_check_eval, ("eval", "data", "task")),
        (_check_hub, ("hub", "finetune")),
        (_check_launch, ("distributed", "resume", "training")),
    ]
    for check, sections in checks:
        if all(_clean(getattr(r, s)) for s in sections):
            check(r, problems)


def _check_launch(r: Recipe, problems: list[str]) -> None:
    if r.distributed is not None:
        for key in ("accelerate_config", "deepspeed"):
            value = getattr(r.distributed, key)
            if value is not None and not resolve_path(value).is_file():
                problems.append(f"distributed.{key}: file not found: {value}")
    if isinstance(r.resume, str) and not resolve_path(r.resume).is_dir():
        problems.append(f"resume: checkpoint directory not found: {r.resume}")
    output_dir = r.training.get("output_dir")
    if r.resume is True and isinstance(output_dir, str) and not any(Path(output_dir).glob("checkpoint-*")):
        problems.append(f"resume: true but {output_dir} holds no checkpoint-* directory to continue from")


def _is_pathlike(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~", EMBEDDED_PREFIX)) or Path(value).expanduser().exists()


def _check_model(r: Recipe, problems: list[str]) -> None:
    m = r.model
    if m.name.startswith(EMBEDDED_PREFIX):
        short = m.name[len(EMBEDDED_PREFIX):]
        if short not in EMBEDDED_MODELS:
            problems.append(f"model.name: no embedded model {short!r}{_did_you_mean(short, EMBEDDED_MODELS)}; "
                            f"embedded: {', '.join(EMBEDDED_MODELS)}")
    elif _is_pathlike(m.name):
        if not resolve_path(m.name).is_dir():
            problems.append(f"model.name: local model directory not found: {m.name}")
        elif m.gguf_file and not (resolve_path(m.name) / m.gguf_file).is_file():
            problems.append(f"model.gguf_file: {m.gguf_file} not found in {m.name}")
    elif not HUB_ID.match(m.name):
        problems.append(f"model.name: {m.name!r} is neither an existing directory nor a Hub id (org/name)")
    if m.gguf_file is not None and m.quantization != "none":
        problems.append("model.gguf_file and model.quantization: a GGUF checkpoint is dequantised on load; "
                        "it cannot also be loaded through bitsandbytes")


def _check_data(r: Recipe, problems: list[str]) -> None:
    d = r.data
    if (d.dataset is None) == (d.train_file is None):
        problems.append("data: set exactly one of data.dataset (Hub id or directory) and data.train_file")
    evals = [k for k in ("eval_split", "eval_file", "eval_fraction") if getattr(d, k) is not None]
    if len(evals) > 1:
        problems.append(f"data: {' and '.join('data.' + k for k in evals)} exclude each other; pick one eval source")
    if d.eval_split is not None and d.dataset is None:
        problems.append("data.eval_split needs data.dataset; with local files use data.eval_file")
    for key in ("train_file", "eval_file"):
        value = getattr(d, key)
        for item in [value] if isinstance(value, str) else value or []:
            path = resolve_path(item)
            if path.suffix not in FILE_SUFFIXES:
                problems.append(f"data.{key}: {item}: unsupported file type {path.suffix!r}; "
                                f"use one of {', '.join(sorted(FILE_SUFFIXES))}")
            elif not path.is_file():
                problems.append(f"data.{key}: file not found: {item}")
    if d.dataset is not None and _is_pathlike(d.dataset) and not resolve_path(d.dataset).exists():
        problems.append(f"data.dataset: local dataset not found: {d.dataset}")
    allowed = FORMAT_COLUMNS[d.format]
    for key in d.columns:
        if key not in allowed:
            problems.append(f"data.columns.{key}: format {d.format} reads {', '.join(allowed)}{_did_you_mean(key, allowed)}")
    if d.completion_only_loss and d.format not in COMPLETION_FORMATS:
        problems.append(f"data.completion_only_loss: format {d.format} has no completion; "
                        f"it applies to {', '.join(COMPLETION_FORMATS)}")
    if d.eval_fraction is not None and not 0.0 < d.eval_fraction < 1.0:
        problems.append(f"data.eval_fraction: {d.eval_fraction} must be between 0 and 1")
    if d.max_length < 8:
        problems.append(f"data.max_length: {d.max_length} is too short (minimum 8)")
    if d.format == "classification":
        if r.task != "sequence_classification":
            problems.append(f"data.format classification needs task: sequence_classification (got {r.task})")
        if d.target == "score" and d.num_labels not in (None, 1):
            problems.append(f"data.num_labels: {d.num_labels} with data.target score (regression has one output)")
    elif r.task == "sequence_classification":
        problems.append(f"task sequence_classification needs data.format classification (got {d.format})")
    if d.format == "instruction" and "{instruction}" not in d.instruction_template:
        problems.append("data.instruction_template must contain {instruction}")


def _check_finetune(r: Recipe, problems: list[str]) -> None:
    f, q = r.finetune, r.model.quantization
    if f.method == "full":
        if f.lora is not None:
            problems.append("finetune.lora is set but finetune.method is full; remove it or use lora/qlora")
        if q != "none":
            problems.append(f"model.quantization {q} with finetune.method full: quantized weights cannot be "
                            "trained directly; use finetune.method qlora (or lora on 8bit)")
        if r.hub.artifact is not None:
            problems.append("hub.artifact applies to lora/qlora; full fine-tuning pushes the whole model")
        return
    if f.lora is None:
        f.lora = LoraConfig()
    if f.method == "qlora":
        if q == "none":
            r.model.quantization = "4bit"  # qlora means a 4-bit base: fill it in rather than ask twice
        elif q != "4bit":
            problems.append(f"finetune.method qlora needs a 4-bit base, but model.quantization is {q}")
    elif q == "4bit":
        problems.append("lora on a 4-bit base is qlora: set finetune.method: qlora")
    if f.lora.r < 1:
        problems.append(f"finetune.lora.r: {f.lora.r} must be >= 1")
    if not 0.0 <= f.lora.dropout < 1.0:
        problems.append(f"finetune.lora.dropout: {f.lora.dropout} must be in [0, 1)")


def _check_optimizer(o: OptimizerConfig, problems: list[str]) -> None:
    accepted = OPTIMIZER_PARAMS[o.name]
    for key in ("weight_decay", "momentum", "betas", "eps", "decay_rate", "damping_eps", "cosine_scope", "fixed_damping",
                "bias_correction", "nesterov"):
        if getattr(o, key) is not None and key not in accepted:
            problems.append(f"optimizer.{key} does not apply to {o.name} (it takes lr, {', '.join(accepted)})")
    if not o.lr > 0:
        problems.append(f"optimizer.lr: {o.lr} must be > 0")
    if o.betas is not None and (len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas)):
        problems.append(f"optimizer.betas: {o.betas} must be two values in [0, 1)")
    for key in ("momentum", "decay_rate"):
        value = getattr(o, key)
        if value is not None and not 0.0 <= value < 1.0:
            problems.append(f"optimizer.{key}: {value} must be in [0, 1)")
    for key in ("weight_decay", "eps", "damping_eps"):
        value = getattr(o, key)
        if value is not None and value < 0:
            problems.append(f"optimizer.{key}: {value} must be >= 0")
    if o.fixed_damping is not None and not 0.0 <= o.fixed_damping <= 1.0:
        problems.append(f"optimizer.fixed_damping: {o.fixed_damping} must be in [0, 1]")


def _training_fields() -> dict[str, Any]:
    from transformers import TrainingArguments  # imported here: the schema itself loads without torch

    return {f.name: f.type for f in dataclasses.fields(TrainingArguments) if f.init}


def _check_training(r: Recipe, name: str, problems: list[str]) -> None:
    known = _training_fields()
    for key, value in r.training.items():
        if key in TRAINING_OWNED:
            problems.append(f"training.{key}: set {TRAINING_OWNED[key]} instead")
        elif key not in known:
            problems.append(f"training.{key}: not a TrainingArguments field{_did_you_mean(key, known)}")
        elif value is not None:
            simple = _simple_type(known[key])
            if simple is not None:
                scratch = []
                ok, coerced = _coerce(simple, value, f"training.{key}", scratch)
                problems.extend(scratch)
                if ok and not isinstance(value, int):  # keep `logging_steps: 25` an int in the resolved recipe
                    r.training[key] = coerced
    r.training.setdefault("output_dir", f"outputs/{name}")
    r.training.setdefault("report_to", "none")  # no surprise wandb/tensorboard logins from a recipe


def _simple_type(tp):
    """int/float/bool/str (optionally Optional) annotations are checked; richer ones are left to transformers."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    return tp if tp in (int, float, bool, str) else None


def _check_eval(r: Recipe, problems: list[str]) -> None:
    target = r.data.target if r.task == "sequence_classification" else None
    if r.eval.metrics is None:
        defaults = {"label": ["accuracy", "f1"], "score": ["pearson", "spearman"], None: ["perplexity"]}
        r.eval.metrics = list(defaults[target])
    for metric in r.eval.metrics:
        if metric not in METRIC_TASKS:
            problems.append(f"eval.metrics: unknown metric {metric!r}{_did_you_mean(metric, METRIC_TASKS)}; "
                            f"known: {', '.join(METRIC_TASKS)}")
        elif (r.task, target) not in METRIC_TASKS[metric]:
            problems.append(f"eval.metrics: {metric} does not apply to task {r.task}"
                            + (f" with data.target {target}" if target else ""))
    if "exact_match" in r.eval.metrics and r.data.format not in ("prompt_completion", "instruction"):
        problems.append(f"eval.metrics: exact_match needs prompt_completion or instruction data (got {r.data.format})")
    if r.eval.answer_pattern is not None:
        try:
            groups = re.compile(r.eval.answer_pattern).groups
        except re.error as exc:
            problems.append(f"eval.answer_pattern: {r.eval.answer_pattern!r} is not a regular expression ({exc})")
        else:
            if groups < 1:
                problems.append(f"eval.answer_pattern: {r.eval.answer_pattern!r} needs a group, e.g. '####\\s*(\\S+)'")
        if "exact_match" not in r.eval.metrics:
            problems.append("eval.answer_pattern is set but eval.metrics has no exact_match")
    has_eval = any(getattr(r.data, k) is not None for k in ("eval_split", "eval_file", "eval_fraction"))
    if not has_eval and r.eval.metrics:
        problems.append("eval.metrics are set but there is no evaluation data: set data.eval_file, "
                        "data.eval_split or data.eval_fraction (or eval.metrics: [])")


def _check_hub(r: Recipe, problems: list[str]) -> None:
    h = r.hub
    if h.push and not h.repo_id:
        problems.append("hub.push is true but hub.repo_id is not set")
    if h.repo_id is not None and not re.match(r"^[\w.-]+/[\w.-]+$", h.repo_id):
        problems.append(f"hub.repo_id: {h.repo_id!r} must look like user/name")
    if r.finetune.method == "qlora" and h.artifact == "merged":
        problems.append("hub.artifact merged with qlora: merging into a 4-bit base is lossy; push the adapter")
    if r.finetune.method != "full" and h.artifact is None:
        h.artifact = "adapter"
