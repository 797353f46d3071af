"""Model and tokenizer builders: base model (optionally 4/8-bit through bitsandbytes), then LoRA, QLoRA or nothing.

The recipe is read here and turned into transformers/peft objects; nothing below this module sees the recipe.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from tam_hf.finetune.config.schema import ModelConfig, Recipe
from tam_hf.finetune.errors import ModelError, hub_unavailable

__all__ = ["model_path", "load_tokenizer", "load_base_model", "load_model"]

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cache_root() -> Path:
    return Path(os.environ.get("TAM_HF_CACHE", Path.home() / ".cache" / "tam_hf"))


def model_path(cfg: ModelConfig) -> str:
    """Where from_pretrained reads the model. An embedded model ships a config but no weights (none are
    committed): it is built once from the config with a fixed seed and saved in the cache, so every later
    path (bitsandbytes loading included) is the ordinary from_pretrained one."""
    if not cfg.embedded:
        return cfg.local_dir or cfg.name
    source = Path(cfg.local_dir)
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(source.iterdir()) if p.is_file())).hexdigest()
    target = _cache_root() / f"{source.name}-{digest[:12]}"
    if not (target / "config.json").is_file():
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(source)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same initial weights on every machine
            model = AutoModelForCausalLM.from_config(config)
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=target.parent))
        model.save_pretrained(scratch)
        for item in source.iterdir():
            if item.is_file() and item.name != "config.json":
                shutil.copy(item, scratch / item.name)
        try:
            scratch.rename(target)  # atomic: a concurrent builder either wins or finds the finished copy
        except OSError:
            shutil.rmtree(scratch, ignore_errors=True)
    return str(target)


MODEL_OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _from_hub(name: str, local: bool, load):
    """`load()`, turning "the Hub was needed and not there" into one line naming `name` (a local path's own
    errors pass through unchanged)."""
    try:
        return load()
    except OSError as exc:  # transformers reports a missing cache entry, offline mode or no network as OSError
        if local:
            raise ModelError(f"model.name {name} could not be loaded: {(str(exc).splitlines() or [''])[0][:300]} "
                             "(a directory needs the weights save_pretrained writes: model.safetensors, "
                             "model.safetensors.index.json with its shards, or pytorch_model.bin)") from exc
        raise hub_unavailable("model", name, exc, MODEL_OFFLINE,
                              "set model.name to a local model directory (offline demo: embedded:tiny-llama)") from None


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    if cfg.tokenizer is None and cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    source = cfg.tokenizer_source or model_path(cfg)
    local = cfg.local_dir is not None if cfg.tokenizer is None else cfg.tokenizer_source != cfg.tokenizer
    tokenizer = _from_hub(cfg.tokenizer or cfg.name, local, lambda: AutoTokenizer.from_pretrained(source, **kwargs))
    if tokenizer.pad_token is None:
        # Padding positions never carry labels (the collator pads labels with -100), so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _quantization_config(cfg: ModelConfig):
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def load_model(recipe: Recipe, tokenizer, label_names: list[str] | None = None):
    """The base model for the task, wrapped in a peft LoRA model unless the recipe fine-tunes in full."""
    model = load_base_model(recipe, tokenizer, label_names)
    if recipe.finetune.method == "full":
        return model
    return _add_lora(model, recipe)


def load_base_model(recipe: Recipe, tokenizer, label_names: list[str] | None = None):
    """The model for the task as the recipe loads it (dtype, GGUF, 4/8-bit, attention), without an adapter."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = recipe.model
    kwargs = dict(
        revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=DTYPES[cfg.dtype],
        quantization_config=_quantization_config(cfg),
    )
    if cfg.gguf_file:
        from transformers import GgufConfig

        # Unpacked into plain dense tensors: otherwise the model stays marked as GGUF-quantized, which the
        # Trainer refuses to train and save_pretrained refuses to write.
        kwargs.update(gguf_file=cfg.gguf_file, quantization_config=GgufConfig(dequantize=True))
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if recipe.task == "sequence_classification":
        if recipe.data.target == "score":
            kwargs.update(num_labels=1, problem_type="regression")
        else:
            kwargs.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                          label2id={n: i for i, n in enumerate(label_names)},
                          problem_type="single_label_classification")
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
    model = _from_hub(cfg.name, cfg.local_dir is not None, lambda: auto.from_pretrained(model_path(cfg), **kwargs))
    if model.config.pad_token_id is None:  # decoder classifiers find the last token through the pad id
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _add_lora(model, recipe: Recipe):
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if recipe.model.quantization != "none":
        # Casts norms to fp32 and enables input grads so a frozen quantized base passes gradients to the adapter.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(recipe.training.get("gradient_checkpointing", False))
        )
    lora = recipe.finetune.lora
    task_type = TaskType.SEQ_CLS if recipe.task == "sequence_classification" else TaskType.CAUSAL_LM
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
                        target_modules=lora.target_modules, modules_to_save=lora.modules_to_save, task_type=task_type)
    return get_peft_model(model, config)
