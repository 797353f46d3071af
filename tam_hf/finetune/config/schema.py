"""The recipe's sections as pydantic models: each setting with its type, its range and its help text.

Strict types: a YAML ``true`` is no number, ``64.0`` is no int, ``"8"`` is no int. Two allowances, both for
floats: an int is a float, and a number that PyYAML read as a string (YAML 1.1 reads ``1e-4``, without a dot,
as text) is read as the number it spells. No number may be nan or inf.

Two sections are open-ended and checked against the library that owns them: ``optimizer`` in
:mod:`tam_hf.finetune.config.load` (its keys are the chosen optimizer's constructor arguments, read from
``tam_hf.optim.registry``) and ``training`` in :mod:`tam_hf.finetune.config.training` (``TrainingArguments``
fields; :data:`TRAINING_RANGES` holds the ranges of its numeric ones).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, WrapValidator,
                      model_serializer)
from pydantic_core import PydanticCustomError

from tam_hf.finetune.config.resolve import EMBEDDED_PREFIX, local_source
from tam_hf.finetune.config.yaml_io import short

__all__ = ["Recipe", "ModelConfig", "DataConfig", "LoraConfig", "FinetuneConfig", "OptimizerConfig", "SwitchConfig",
           "EvalConfig", "LMEvalConfig", "HubConfig", "DistributedConfig", "StageConfig", "STAGE_NAME", "Float",
           "STRICT", "EMBEDDED_MODELS",
           "FORMAT_COLUMNS", "COMPLETION_FORMATS", "FILE_SUFFIXES", "METRIC_TASKS", "BUILTIN_METRICS",
           "TRAINING_OWNED", "TRAINING_RANGES", "HUB_ID"]

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

# The built-in metrics: name -> the (task, data.target) pairs it makes sense for. Computed in
# tam_hf.finetune.metrics (perplexity and exact_match by the evaluate phase); the defaults are in resolve.py.
METRIC_TASKS = {
    "accuracy": {("sequence_classification", "label")},
    "f1": {("sequence_classification", "label")},
    "mcc": {("sequence_classification", "label")},
    "pearson": {("sequence_classification", "score")},
    "spearman": {("sequence_classification", "score")},
    "perplexity": {("causal_lm", None)},
    "exact_match": {("causal_lm", None)},
}
BUILTIN_METRICS = tuple(METRIC_TASKS)

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

# Ranges of numeric TrainingArguments fields (pydantic Field constraints). A value outside them either fails
# late (after the model is loaded) or, worse, runs: `max_steps: -5` trained for the default 3 epochs.
TRAINING_RANGES: dict[str, dict[str, float]] = {
    "per_device_train_batch_size": {"ge": 1},
    "per_device_eval_batch_size": {"ge": 1},
    "gradient_accumulation_steps": {"ge": 1},
    "eval_accumulation_steps": {"ge": 1},
    "num_train_epochs": {"gt": 0},
    "warmup_steps": {"ge": 0},
    "logging_steps": {"gt": 0},
    "save_steps": {"gt": 0},
    "eval_steps": {"gt": 0},
    "eval_delay": {"ge": 0},
    "save_total_limit": {"ge": 1},
    "max_grad_norm": {"ge": 0},
    "label_smoothing_factor": {"ge": 0, "lt": 1},
    "neftune_noise_alpha": {"ge": 0},
    "torch_empty_cache_steps": {"ge": 1},
    "seed": {"ge": 0, "lt": 2**32},
    "data_seed": {"ge": 0, "lt": 2**32},
    "dataloader_num_workers": {"ge": 0},
    "dataloader_prefetch_factor": {"ge": 1},
    "ddp_bucket_cap_mb": {"ge": 1},
    "ddp_timeout": {"ge": 1},
}

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _number_from_text(value):
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


# A float setting: an int or a numeric string is read as a float; nan and inf are refused (STRICT config).
Float = Annotated[float, BeforeValidator(_number_from_text)]


def _one_of(expected: str):
    """For a union, one message ('expected a string or a list of strings, got int 3') instead of one per member."""

    def validate(value, handler):
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("recipe_type", "expected {expected}, got {got}",
                                      {"expected": expected, "got": f"{type(value).__name__} {short(value)}"}) from None

    return WrapValidator(validate)


StrOrList = Annotated[Union[str, list[str]], _one_of("a string or a list of strings")]

STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid", protected_namespaces=())


class _Section(BaseModel):
    model_config = STRICT


class ModelConfig(_Section):
    name: str = Field(description="Hub id, local directory, or embedded:tiny-llama (shipped in the package, offline).")
    gguf_file: Optional[str] = Field(None, description="GGUF file inside `name` to load (dequantised by transformers).")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit).")
    tokenizer: Optional[str] = Field(None, description="Tokenizer id or path when it differs from `name`.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto keeps the checkpoint's.")
    quantization: Literal["none", "4bit", "8bit"] = Field("none", description="Load the base through bitsandbytes.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the checkpoint. Off unless you trust it.")
    attn_implementation: Optional[str] = Field(
        None, description="eager, sdpa, flash_attention_2 ...; None lets transformers pick.")

    # Resolved once, when the section is built: where the weights and the tokenizer are read from.
    _source: Optional[str] = PrivateAttr(None)
    _tokenizer_source: Optional[str] = PrivateAttr(None)

    def model_post_init(self, context: Any) -> None:
        self._source = local_source(self.name)
        self._tokenizer_source = None if self.tokenizer is None else local_source(self.tokenizer) or self.tokenizer

    @property
    def embedded(self) -> bool:
        """A model shipped in the package as a config and tokenizer, without weights (built on first use)."""
        return self.name.startswith(EMBEDDED_PREFIX)

    @property
    def local_dir(self) -> Optional[str]:
        """The local directory the model is read from (for an embedded model, its config), or None: a Hub id."""
        return self._source

    @property
    def tokenizer_source(self) -> Optional[str]:
        """model.tokenizer as from_pretrained takes it (a local directory resolved), or None: the model's own."""
        return self._tokenizer_source


class DataConfig(_Section):
    format: Literal["text", "prompt_completion", "instruction", "chat", "classification"] = Field(
        description="How rows become tokens; see FORMAT_COLUMNS for the columns each reads.")
    dataset: Optional[str] = Field(
        None, description="Hub dataset id or local dataset directory (exclusive with train_file).")
    config_name: Optional[str] = Field(None, description="Dataset configuration (subset) name.")
    train_file: Optional[StrOrList] = Field(None, description="Local json/jsonl/csv/parquet/txt file(s).")
    eval_file: Optional[StrOrList] = Field(None, description="Local evaluation file(s).")
    train_split: str = Field("train", description="Split to train on.")
    eval_split: Optional[str] = Field(None, description="Split to evaluate on.")
    eval_fraction: Optional[Float] = Field(
        None, gt=0, lt=1, description="Hold this fraction of the training rows out for evaluation.")
    validation_split: Optional[Float] = Field(
        None, gt=0, lt=1, description="Hold this fraction of the training rows out as a validation set (carved with "
                                      "a fixed seed, the same for every run whatever training.seed): evaluated after "
                                      "training (summary.json 'validation'), used by `compare --tune-lr` to choose "
                                      "the lr; never the eval set.")
    validation_file: Optional[StrOrList] = Field(
        None, description="Local validation file(s) (exclusive with data.validation_split).")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Canonical column -> dataset column, e.g. {prompt: question}.")
    max_length: int = Field(
        512, ge=8, description="Longest tokenised example; longer ones are truncated (completions from the end).")
    completion_only_loss: Optional[bool] = Field(
        None, description="Loss on completion/assistant tokens only. Default true for prompt_completion, "
                          "instruction and chat.")
    instruction_template: str = Field(
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        description="Prompt for the instruction format; {instruction} and {input} are filled in.")
    target: Literal["label", "score"] = Field("label", description="classification: class labels, or a regression score.")
    num_labels: Optional[int] = Field(
        None, ge=1, description="classification: number of classes (default: counted in the train split).")
    max_train_samples: Optional[int] = Field(None, ge=1, description="Use only the first N training rows.")
    max_eval_samples: Optional[int] = Field(None, ge=1, description="Use only the first N evaluation rows.")
    packing: bool = Field(
        False, description="Pack tokenised rows into sequences of max_length (TRL's best-fit-decreasing; a longer row "
                           "is truncated). Packed rows never attend to each other: flash-attention reads the "
                           "boundaries from position ids, sdpa and eager get a block-diagonal mask. Causal LM only.")
    padding_free: bool = Field(
        False, description="TRL's padding-free batches: the rows of a batch concatenated into one, kept apart by "
                           "position ids. Needs model.attn_implementation flash_attention_2/3; implied by packing.")
    chat_template_path: Optional[str] = Field(
        None, description="chat: a .jinja/.j2 chat template used instead of the tokenizer's (TRL's "
                          "chat_template_path). Assistant-only loss needs {% generation %} markers around assistant "
                          "turns; embedded:chat_templates/chatml.jinja is ChatML with them.")


class LoraConfig(_Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: Float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: StrOrList = Field("all-linear", description="Module names, or all-linear.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    modules_to_save: Optional[list[str]] = Field(
        None, description="Modules trained in full beside the adapter (e.g. a head).")


class FinetuneConfig(_Section):
    method: Literal["lora", "qlora", "full"] = Field("lora", description="qlora = lora on a 4-bit bitsandbytes base.")
    lora: Optional[LoraConfig] = Field(None, description="LoRA settings (lora and qlora only; defaults filled in).")

    def model_post_init(self, context: Any) -> None:
        if self.method != "full" and self.lora is None:
            self.lora = LoraConfig()


class SwitchConfig(_Section):
    to: str = Field(description="The optimizer to continue with (a registry name): adamw after adatamw or adatam, "
                                "sgd after tam.")
    at_step: int = Field(ge=1, description="Optimizer steps taken with optimizer.name before the switch; below "
                                           "training.max_steps.")
    lr: Optional[Float] = Field(
        None, gt=0, description="Peak lr of the second optimizer (it follows the same schedule). Unset: the "
                                "registry's transfer rule, lr_to = optimizer.lr / lr_factor(name) * lr_factor(to) "
                                "(5x after AdaTAM(W) at beta1 0.9, 0.5x after TAM).")


class OptimizerConfig(_Section):
    """``name``, ``lr`` and ``switch``; every other key is a keyword argument of the chosen optimizer's constructor
    (``tam_hf.optim.registry``: ``OPTIMIZERS[name].accepted_keys()``), checked by the constructor itself.
    Unset keys keep the constructor's defaults, except those ``TrainingArguments`` feeds (weight_decay: 0)."""

    model_config = ConfigDict(STRICT, extra="allow")

    name: str = Field(description="Any optimizer of tam_hf.optim.registry: tam, adatam, adatamw (Torque-Aware "
                                  "Momentum), adamw, sgd (the torch references), or one added with registry.add().")
    lr: Float = Field(description="Peak learning rate. AdaTAM(W) wants ~0.2x AdamW's, TAM ~2x SGD-momentum's "
                                  "(README: the learning-rate transfer rule).")
    switch: Optional[SwitchConfig] = Field(
        None, description="Continue with another optimizer after at_step steps, the state handed over in its "
                          "convention (TAM as a warm-up; README: Switching optimizer mid-run): {to: adamw, at_step: "
                          "100, lr: optional}. Supported: adatamw -> adamw, adatam -> adamw, tam -> sgd.")

    @model_serializer(mode="wrap")
    def _without_unset_switch(self, handler):
        # Recipes without a switch dump as before: run fingerprints (compare) and resume records stay the same.
        out = handler(self)
        if isinstance(out, dict) and out.get("switch", 0) is None:
            del out["switch"]
        return out

    def settings(self) -> dict[str, Any]:
        """The constructor keys the recipe sets besides lr, as written (lists stay lists)."""
        return dict(self.__pydantic_extra__ or {})

    def kwargs(self) -> dict[str, Any]:
        """The constructor keyword arguments the recipe sets (unset ones keep the optimizer's defaults)."""
        return {"lr": self.lr, **{k: tuple(v) if isinstance(v, list) else v for k, v in self.settings().items()}}

    def __getattr__(self, item: str):
        # A key the optimizer takes but the recipe leaves unset reads None, as every key did before the
        # registry: `recipe.optimizer.betas is None` means "the constructor's default".
        try:
            return super().__getattr__(item)
        except AttributeError:
            if not item.startswith("_"):
                from tam_hf.optim.registry import get

                try:
                    accepted = get(self.__dict__.get("name")).accepted_keys()
                except ValueError:
                    accepted = ()
                if item in accepted:
                    return None
            raise


class LMEvalConfig(_Section):
    tasks: list[str] = Field(
        min_length=1, description="lm-eval task, group or tag names (gsm8k, hellaswag) or task YAML files; relative "
                                  "data_files in a YAML are read next to it.")
    num_fewshot: Optional[int] = Field(None, ge=0, description="Few-shot examples; unset keeps each task's default.")
    limit: Optional[Float] = Field(None, gt=0, description="Rows per task: a count, or a fraction when below 1.")
    batch_size: int = Field(1, ge=1, description="lm-eval's batch size.")


class EvalConfig(_Section):
    metrics: Optional[list[str]] = Field(
        None, description="Metric names: built-in ones, evaluate:NAME[/CONFIG] or a local metric script; default: "
                          "accuracy, f1 (labels), pearson, spearman (scores), perplexity (causal lm). On causal LM, "
                          "exact_match and evaluate metrics score answers generated for the evaluation prompts.")
    max_new_tokens: int = Field(16, ge=1, description="Generated metrics: tokens generated per answer.")
    max_generate_samples: int = Field(
        64, ge=1, description="Generated metrics: evaluation rows generated for (generation is slow).")
    answer_pattern: Optional[str] = Field(
        None, description="exact_match: a regular expression whose first group is the answer, searched in the "
                          "generation and in the reference (GSM8K: '####\\s*(-?[\\d,.]+)'); unset compares the "
                          "first generated line with the reference.")
    lm_eval: Optional[LMEvalConfig] = Field(
        None, description="Run lm-evaluation-harness on the fine-tuned model after it is saved; results in "
                          "<output_dir>/lm_eval/. Needs the [eval] extra.")


class HubConfig(_Section):
    push: bool = Field(False, description="Push after training. Uses your huggingface_hub login; the token never "
                                          "enters the recipe.")
    repo_id: Optional[str] = Field(None, description="Target repository, user/name. Set without push: only prepare "
                                                     "hub_upload/.")
    private: bool = Field(True, description="Create the repository private.")
    artifact: Optional[Literal["adapter", "merged"]] = Field(
        None, description="lora/qlora: push the adapter (default) or the base with the adapter merged in. Full "
                          "fine-tuning pushes the model.")


class DistributedConfig(_Section):
    accelerate_config: Optional[str] = Field(None, description="accelerate config file for the launcher.")
    deepspeed: Optional[str] = Field(None, description="DeepSpeed JSON config, passed to TrainingArguments.deepspeed.")


STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a folder name on every filesystem


class StageConfig(_Section):
    """One stage of a staged run (continual fine-tuning, distribution shift): its ``data`` and ``training`` are
    overrides of the recipe's sections, merged key by key and checked like them."""

    name: str = Field(
        description="Unique; letters, digits, '_', '.', '-' (it names the stage's folder stage-<k>-<name> and its "
                    "results in summary.json).")
    data: dict[str, Any] = Field(
        default_factory=dict, description="data keys this stage sets (train_file, eval_file, ...) over the recipe's "
                                          "data section; format, target and num_labels belong to the whole run.")
    training: dict[str, Any] = Field(
        default_factory=dict, description="TrainingArguments this stage sets over the recipe's training section "
                                          "(max_steps, warmup_steps, ...); its lr schedule and warm-up start afresh.")
    reset_optimizer: bool = Field(
        False, description="Start the optimizer's state (moments, TAM's damping) afresh at this stage; by default it "
                           "carries over from the previous stage.")


class Recipe(_Section):
    model: ModelConfig = Field(description="Base model.")
    data: DataConfig = Field(description="Datasets and how they are tokenised.")
    optimizer: OptimizerConfig = Field(description="Optimizer and its hyperparameters.")
    task: Literal["causal_lm", "sequence_classification"] = Field("causal_lm", description="What the model learns.")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="lora, qlora or full.")
    training: dict[str, Any] = Field(
        default_factory=dict, description="transformers.TrainingArguments fields (unknown keys rejected).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation metrics.")
    hub: HubConfig = Field(default_factory=HubConfig, description="Hub push.")
    distributed: Optional[DistributedConfig] = Field(
        None, description="Launcher configuration (validated and passed on).")
    resume: Annotated[Union[bool, str], _one_of("true/false or a checkpoint path")] = Field(
        False, description="true: continue from the last checkpoint in output_dir; or a checkpoint path.")
    overwrite: bool = Field(
        False, description="Start over in a training.output_dir that holds another run's outputs: its checkpoints, "
                           "weights and summary are removed once the model and data have loaded.")
    stages: Optional[Annotated[list[StageConfig], Field(min_length=1)]] = Field(
        None, description="Train in stages, one after the other (continual fine-tuning, distribution shift): the "
                          "model and the optimizer state carry over, and after each stage the model is evaluated on "
                          "every stage's eval set. summary.json gains stages and continual (final average, "
                          "forgetting, backward transfer); eval is the final model's average over the stages.")

    @property
    def output_dir(self) -> str:
        return self.training["output_dir"]
