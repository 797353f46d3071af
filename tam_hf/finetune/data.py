"""Datasets: load (Hub id, local directory or files), rename columns, tokenise with `datasets.map` (cached).

Each format is one function in FORMATS turning a row of canonical columns into input_ids / attention_mask /
labels. Completion-only loss sets the labels of prompt (or non-assistant) tokens to -100, the value every
transformers loss ignores; padding is left to transformers' collators, which pad labels with -100 too.
"""

from __future__ import annotations

from functools import partial

from tam_hf.finetune.recipe import COMPLETION_FORMATS, FILE_SUFFIXES, FORMAT_COLUMNS, DataConfig, Recipe, resolve_path

__all__ = ["DataError", "load_raw", "tokenize_row", "build_datasets", "prompt_and_answer", "collator", "FORMATS"]

IGNORE = -100


class DataError(ValueError):
    """The data does not match the recipe (missing column, template that is not prefix-stable, ...)."""


def _files(value) -> list[str]:
    return [str(resolve_path(v)) for v in ([value] if isinstance(value, str) else value)]


def load_raw(cfg: DataConfig):
    """A DatasetDict with 'train' and, when the recipe has evaluation data, 'eval' (canonical column names)."""
    from datasets import DatasetDict, load_dataset

    if cfg.train_file is not None:
        files = {"train": _files(cfg.train_file)}
        if cfg.eval_file is not None:
            files["eval"] = _files(cfg.eval_file)
        builder = FILE_SUFFIXES[resolve_path(files["train"][0]).suffix]
        raw = load_dataset(builder, data_files=files)
    else:
        loaded = load_dataset(str(resolve_path(cfg.dataset)) if resolve_path(cfg.dataset).exists() else cfg.dataset,
                              cfg.config_name)
        raw = DatasetDict({"train": loaded[cfg.train_split]})
        if cfg.eval_split is not None:
            raw["eval"] = loaded[cfg.eval_split]
    if cfg.eval_fraction is not None:
        split = raw["train"].train_test_split(test_size=cfg.eval_fraction, seed=0)
        raw = DatasetDict({"train": split["train"], "eval": split["test"]})
    renames = {v: k for k, v in cfg.columns.items() if v != k}
    raw = DatasetDict({name: ds.rename_columns({o: n for o, n in renames.items() if o in ds.column_names})
                       for name, ds in raw.items()})
    for name, limit in (("train", cfg.max_train_samples), ("eval", cfg.max_eval_samples)):
        if limit is not None and name in raw:
            raw[name] = raw[name].select(range(min(limit, len(raw[name]))))
    required = {c for c in FORMAT_COLUMNS[cfg.format] if c not in ("input", "text_pair")}
    for name, ds in raw.items():
        missing = sorted(required - set(ds.column_names))
        if missing:
            raise DataError(f"{name} data has no column(s) {missing} for format {cfg.format} (columns: "
                            f"{ds.column_names}); map them with data.columns, e.g. {{{missing[0]}: your_column}}")
    return raw


# ---------------------------------------------------------------------------------------------- formats


def _join(tokenizer, prompt: str, completion: str, completion_only: bool, max_length: int) -> dict:
    prompt_ids = tokenizer(prompt)["input_ids"]  # the tokenizer's own BOS handling applies to the prompt
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + completion_ids if completion_only else prompt_ids + completion_ids)
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels[:max_length]}


def _text(row, tokenizer, cfg: DataConfig, completion_only: bool) -> dict:
    ids = (tokenizer(row["text"])["input_ids"] + [tokenizer.eos_token_id])[: cfg.max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


def _prompt_completion(row, tokenizer, cfg: DataConfig, completion_only: bool) -> dict:
    return _join(tokenizer, row["prompt"], row["completion"], completion_only, cfg.max_length)


def _instruction(row, tokenizer, cfg: DataConfig, completion_only: bool) -> dict:
    prompt, answer = prompt_and_answer(row, cfg)
    return _join(tokenizer, prompt, answer, completion_only, cfg.max_length)


def _chat(row, tokenizer, cfg: DataConfig, completion_only: bool) -> dict:
    """Renders with the tokenizer's chat template; with completion-only loss only assistant turns (their
    content and end-of-turn tokens) carry labels. Spans are found by rendering each prefix of the
    conversation, so the template must render a conversation's prefix as a prefix of its text."""
    messages = row["messages"]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("format chat needs a tokenizer with a chat template (tokenizer.chat_template is empty)")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError("the chat template does not render conversation prefixes as prefixes of the text; "
                            "completion-only loss cannot locate assistant turns (set data.completion_only_loss: false)")
        spans.append((len(before), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                    max_length=cfg.max_length)
    ids = enc["input_ids"]
    if completion_only:
        labels = [t if any(a <= start < b for a, b in spans) else IGNORE for t, (start, _) in zip(ids, enc["offset_mapping"])]
    else:
        labels = list(ids)
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _classification(row, tokenizer, cfg: DataConfig, completion_only: bool, label2id=None) -> dict:
    pair = row.get("text_pair")
    enc = tokenizer(row["text"], pair, truncation=True, max_length=cfg.max_length)
    label = float(row["label"]) if cfg.target == "score" else label2id[str(row["label"])]
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": label}


FORMATS = {
    "text": _text,
    "prompt_completion": _prompt_completion,
    "instruction": _instruction,
    "chat": _chat,
    "classification": _classification,
}


def prompt_and_answer(row, cfg: DataConfig) -> tuple[str, str]:
    """The generation prompt and reference answer of a prompt_completion or instruction row (for exact_match)."""
    if cfg.format == "instruction":
        return cfg.instruction_template.format(instruction=row["instruction"], input=row.get("input") or ""), row["output"]
    return row["prompt"], row["completion"]


def tokenize_row(row, tokenizer, cfg: DataConfig, label2id=None) -> dict:
    completion_only = cfg.completion_only_loss is not False and cfg.format in COMPLETION_FORMATS
    fn = FORMATS[cfg.format]
    if cfg.format == "classification":
        return fn(row, tokenizer, cfg, completion_only, label2id=label2id)
    return fn(row, tokenizer, cfg, completion_only)


def label_names(raw, cfg: DataConfig) -> list[str] | None:
    """Class names in a stable order: sorted numerically when they are all integers, else as strings."""
    if cfg.format != "classification" or cfg.target == "score":
        return None
    values = sorted({str(v) for split in raw.values() for v in split["label"]},
                    key=lambda s: (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s))
    if cfg.num_labels is not None:
        if len(values) > cfg.num_labels:
            raise DataError(f"data.num_labels is {cfg.num_labels} but the data has {len(values)} labels: {values}")
        if all(v.isdigit() for v in values):
            values = [str(i) for i in range(cfg.num_labels)]
    return values


def build_datasets(recipe: Recipe, tokenizer):
    """(train, eval or None, raw DatasetDict, label names or None): tokenised datasets ready for a collator."""
    cfg = recipe.data
    raw = load_raw(cfg)
    names = label_names(raw, cfg)
    label2id = {n: i for i, n in enumerate(names)} if names else None
    fn = partial(tokenize_row, tokenizer=tokenizer, cfg=cfg, label2id=label2id)
    out = {}
    for split, ds in raw.items():
        tokenised = ds.map(fn, remove_columns=ds.column_names, desc=f"tokenising {split}")
        if cfg.format != "classification":
            # Truncation can cut every completion token; such rows would add nothing but a 0/0 loss.
            tokenised = tokenised.filter(lambda labels: any(t != IGNORE for t in labels), input_columns="labels")
        if len(tokenised) == 0:
            raise DataError(f"no {split} example has a label left after tokenising (is data.max_length too short?)")
        out[split] = tokenised
    return out["train"], out.get("eval"), raw, names


def collator(recipe: Recipe, tokenizer):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if recipe.task == "sequence_classification":
        return DataCollatorWithPadding(tokenizer)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)
