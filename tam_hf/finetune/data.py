"""Datasets: load (Hub id, local directory or files), rename columns to the canonical ones of the format, check
every row.

Causal-LM formats (text, prompt_completion, instruction, chat) are tokenised by TRL's ``SFTTrainer``
(:mod:`tam_hf.finetune.sft`): :func:`load_raw` hands it checked rows with the canonical columns. Sequence
classification is tokenised here (:func:`build_datasets`, ``datasets.map``, cached) and padded by
transformers' ``DataCollatorWithPadding``.

Data that cannot be used is a :class:`DataError` of one line naming the file, the line (or row) and the column:
an empty or binary file, a line that is not JSON, a missing column, a value that is not a string, a chat turn
without a role. Files are checked cheaply before loading (size, the first bytes); anything `datasets` cannot
parse is located afterwards, on the error path only. Rows of the causal-LM formats are checked in
:func:`load_raw`, before TRL sees them; classification rows as they are tokenised.
"""

from __future__ import annotations

import codecs
import json
import math
from functools import partial
from pathlib import Path

from tam_hf.finetune.config.schema import FILE_SUFFIXES, FORMAT_COLUMNS, DataConfig, Recipe
from tam_hf.finetune.errors import DataError, hub_unavailable

__all__ = ["load_raw", "check_rows", "tokenize_row", "tokenize_split", "build_datasets", "prompt_and_answer",
           "collator", "label_names"]

DATASET_OFFLINE = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
_TEXT_BUILDERS = ("json", "csv", "text")
_SNIFF = 8192
# data.validation_split carves with its own fixed seed: every run of a study (any training.seed, any arm) selects
# on the same rows, and they are not the rows data.eval_fraction holds out (seed 0, carved first).
VALIDATION_SEED = 1
_SOURCE = Path(__file__).read_text()  # part of the tokenised data's cache key (see _fingerprint)


def _files(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _check_file(path: str, builder: str) -> None:
    """Empty and binary files, found from the file's size and first bytes."""
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(_SNIFF)
    size = p.stat().st_size
    if size == 0 or (builder in _TEXT_BUILDERS and size <= _SNIFF and not head.strip()):
        raise DataError(f"{path}: the file is empty")
    if builder not in _TEXT_BUILDERS:
        return
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at the end is fine
        binary = b"\x00" in head
    except UnicodeDecodeError:
        binary = True
    if binary:
        raise DataError(f"{path}: binary data, not UTF-8 text; a {p.suffix} file must hold {builder} text")


def _json_problem(path: str) -> str | None:
    """Where a .json/.jsonl file stops being JSON: 'line N: reason', or None when every line parses."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):  # one JSON array rather than JSON lines
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            return f"line {exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})"
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"line {number}: not valid JSON ({exc.msg}, column {exc.colno})"
        if not isinstance(value, dict):
            return f"line {number}: a JSON {type(value).__name__}, not an object of columns"
    return None


def _unreadable(builder: str, files: list[str], exc: Exception) -> DataError:
    """The DataError for files `datasets` failed to load: the first bad line when it can be found."""
    if builder == "json":
        for path in files:
            problem = _json_problem(path)
            if problem:
                return DataError(f"{path}, {problem}")
    cause = exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    reason = (str(cause).splitlines() or [type(cause).__name__])[0][:300]
    return DataError(f"{', '.join(files)}: cannot be read as {builder} data ({type(cause).__name__}: {reason})")


def _load_files(builder: str, files: dict):
    from datasets import load_dataset

    for paths in files.values():
        for path in paths:
            _check_file(path, builder)
    try:
        return load_dataset(builder, data_files=files)
    except Exception as exc:  # pyarrow / pandas parse errors, reported with the line they stopped at
        raise _unreadable(builder, [p for paths in files.values() for p in paths], exc) from None


def _load_dataset(cfg: DataConfig):
    from datasets import load_dataset

    local = Path(cfg.dataset).exists()  # a local dataset directory is resolved by the recipe; else a Hub id
    try:
        return load_dataset(cfg.dataset, cfg.config_name)
    except OSError as exc:  # ConnectionError and FileNotFoundError: offline, no network, not on the Hub
        if local:
            raise DataError(f"{cfg.dataset}: cannot be loaded as a dataset ({type(exc).__name__}: "
                            f"{(str(exc).splitlines() or [''])[0]})") from None
        raise hub_unavailable("dataset", cfg.dataset, exc, DATASET_OFFLINE,
                              "use local files: data.train_file (json, jsonl, csv, parquet or txt) or data.dataset "
                              "set to a local dataset directory") from None


def load_raw(cfg: DataConfig):
    """A DatasetDict with 'train' and, when the recipe has them, 'eval' and 'validation' (canonical column
    names). Held-out fractions are carved from the training rows: eval first, then validation."""
    from datasets import DatasetDict

    if cfg.train_file is not None:
        files = {"train": _files(cfg.train_file)}
        if cfg.eval_file is not None:
            files["eval"] = _files(cfg.eval_file)
        builder = FILE_SUFFIXES[Path(files["train"][0]).suffix]
        raw = _load_files(builder, files)
        sources = {split: ", ".join(paths) for split, paths in files.items()}
    else:
        loaded = _load_dataset(cfg)
        if cfg.train_split not in loaded:
            raise DataError(f"{cfg.dataset} has no split {cfg.train_split!r} (splits: {list(loaded)}); "
                            "set data.train_split")
        if cfg.eval_split is not None and cfg.eval_split not in loaded:
            raise DataError(f"{cfg.dataset} has no split {cfg.eval_split!r} (splits: {list(loaded)}); "
                            "set data.eval_split")
        raw = DatasetDict({"train": loaded[cfg.train_split]})
        if cfg.eval_split is not None:
            raw["eval"] = loaded[cfg.eval_split]
        sources = {"train": f"{cfg.dataset} split {cfg.train_split}", "eval": f"{cfg.dataset} split {cfg.eval_split}"}
    if cfg.validation_file is not None:
        files = _files(cfg.validation_file)
        raw["validation"] = _load_files(FILE_SUFFIXES[Path(files[0]).suffix], {"validation": files})["validation"]
        sources["validation"] = ", ".join(files)
    for name, ds in raw.items():
        if len(ds) == 0:
            raise DataError(f"{name} data ({sources[name]}) has no rows")
    carved = []
    for name, key, fraction, seed in (("eval", "data.eval_fraction", cfg.eval_fraction, 0),
                                      ("validation", "data.validation_split", cfg.validation_split, VALIDATION_SEED)):
        if fraction is not None:
            n = len(raw["train"])
            if n - math.ceil(fraction * n) < 1:  # datasets rounds the held-out part up
                after = "".join(f" left after {k}" for k in carved)
                raise DataError(f"{key} {fraction:g} of the {n} training rows{after} leaves none to train on "
                                f"({sources['train']}); lower it, or give more training rows")
            carved.append(key)
            split = raw["train"].train_test_split(test_size=fraction, seed=seed)
            raw = DatasetDict({**raw, "train": split["train"], name: split["test"]})
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
            source = sources.get(name, sources["train"])
            raise DataError(f"{name} data ({source}) has no column(s) {missing} for format {cfg.format} (columns: "
                            f"{ds.column_names}); map them with data.columns, e.g. {{{missing[0]}: your_column}}")
    if cfg.format != "classification":  # TRL tokenises these: their rows are checked here, before it sees them
        check_rows(raw, cfg)
    return raw


# ---------------------------------------------------------------------------------------------- formats


def _classification(row, tokenizer, cfg: DataConfig, label2id=None) -> dict:
    pair = row.get("text_pair")
    enc = tokenizer(row["text"], pair, truncation=True, max_length=cfg.max_length)
    label = float(row["label"]) if cfg.target == "score" else label2id[str(row["label"])]
    # Whatever the model reads: BERT's token_type_ids tell the two texts of a pair apart; Llama takes none.
    return {**{k: enc[k] for k in tokenizer.model_input_names if k in enc}, "labels": label}


def prompt_and_answer(row, cfg: DataConfig) -> tuple[str, str]:
    """The generation prompt and reference answer of a prompt_completion or instruction row (generated metrics)."""
    if cfg.format == "instruction":
        from tam_hf.finetune.sft import instruction_prompt  # the prompt TRL trained on

        return instruction_prompt(row, cfg.instruction_template), row["output"]
    return row["prompt"], row["completion"]


def tokenize_row(row, tokenizer, cfg: DataConfig, label2id=None) -> dict:
    """A classification row as input_ids / attention_mask / labels (class id, or the score for target score).
    Causal-LM rows are tokenised by TRL (:func:`tam_hf.finetune.sft.build_sft_trainer`)."""
    if cfg.format != "classification":
        raise ValueError(f"format {cfg.format} is tokenised by TRL's SFTTrainer (tam_hf.finetune.sft), not here")
    return _classification(row, tokenizer, cfg, label2id=label2id)


# ------------------------------------------------------------------------------------------ row checks

# Columns each format reads as text: required, and optional (None allowed).
_STRING_COLUMNS = {"text": ("text",), "prompt_completion": ("prompt", "completion"),
                   "instruction": ("instruction", "output"), "chat": (), "classification": ("text",)}
_OPTIONAL_STRING_COLUMNS = {"instruction": ("input",), "classification": ("text_pair",)}


class _Locator:
    """Turns a row index of a split into 'FILE, line N' (JSON lines and text files loaded as they are) or
    'SPLIT data (SOURCE), row N'. Lines are counted only when an error needs one."""

    def __init__(self, cfg: DataConfig, split: str):
        value = {"train": cfg.train_file, "eval": cfg.eval_file, "validation": cfg.validation_file}.get(split)
        carved = cfg.eval_fraction is not None or cfg.validation_split is not None  # rows shuffled by the split
        self.split = split
        self.files = _files(value) if value is not None and not (carved and split != "validation") else []
        self.source = ", ".join(self.files) or (cfg.dataset or ", ".join(_files(cfg.train_file)))

    @staticmethod
    def _row_lines(path: str) -> list[int] | None:
        """The line number of each row, for files whose rows are lines (JSON lines, plain text)."""
        builder = FILE_SUFFIXES.get(Path(path).suffix)
        text = Path(path).read_text(errors="replace")
        if builder == "text":
            return list(range(1, len(text.splitlines()) + 1))
        if builder != "json" or text.lstrip().startswith("["):
            return None
        return [n for n, line in enumerate(text.splitlines(), 1) if line.strip()]

    def __call__(self, index: int) -> str:
        position = index
        for path in self.files:
            lines = self._row_lines(path)
            if lines is None:
                break
            if position < len(lines):
                return f"{path}, line {lines[position]}"
            position -= len(lines)
        return f"{self.split} data ({self.source}), row {index}"


def _describe(value) -> str:
    return "nothing (null or missing)" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"


def _column(cfg: DataConfig, name: str) -> str:
    mapped = cfg.columns.get(name, name)
    return f"'{mapped}'" + (f" (data.columns.{name})" if mapped != name else "")


def _row_problem(row, cfg: DataConfig) -> str | None:
    """What makes `row` unusable for the format, or None."""
    for name in _STRING_COLUMNS[cfg.format]:
        if not isinstance(row.get(name), str):
            return f"column {_column(cfg, name)} must be a string, got {_describe(row.get(name))}"
    for name in _OPTIONAL_STRING_COLUMNS.get(cfg.format, ()):
        if row.get(name) is not None and not isinstance(row.get(name), str):
            return f"column {_column(cfg, name)} must be a string or empty, got {_describe(row.get(name))}"
    if cfg.format == "classification":
        label = row.get("label")
        if label is None or (cfg.target == "score" and (isinstance(label, bool) or not isinstance(label, (int, float)))):
            kind = "a number (data.target score)" if cfg.target == "score" else "a class label"
            return f"column {_column(cfg, 'label')} must be {kind}, got {_describe(label)}"
    if cfg.format == "chat":
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            return f"column {_column(cfg, 'messages')} must be a list of {{role, content}} turns, got {_describe(messages)}"
        for turn, message in enumerate(messages, 1):
            where = f"column {_column(cfg, 'messages')}, turn {turn}"
            if not isinstance(message, dict):
                return f"{where}: not a {{role, content}} mapping but {_describe(message)}"
            if not isinstance(message.get("role"), str) or not message.get("role"):
                return f"{where}: no role (each turn needs role: system, user or assistant)"
            if not isinstance(message.get("content"), str):
                return f"{where}: content must be a string, got {_describe(message.get('content'))}"
    return None


def _tokenize_checked(row, index, tokenizer, cfg: DataConfig, label2id, locate: _Locator) -> dict:
    problem = _row_problem(row, cfg)
    if problem is not None:
        raise DataError(f"{locate(index)}: {problem}")
    return tokenize_row(row, tokenizer, cfg, label2id=label2id)


def check_rows(raw, cfg: DataConfig, batch_size: int = 1024) -> None:
    """Raise a DataError naming the file and line (or split and row) of the first row of ``raw`` (a DatasetDict of
    canonical columns) that the format cannot use. Read in batches of columns: a few seconds for 100k rows."""
    for split, ds in raw.items():
        locate, index = _Locator(cfg, split), 0
        for batch in ds.iter(batch_size=batch_size):
            columns = list(batch)
            for j in range(len(batch[columns[0]]) if columns else 0):
                problem = _row_problem({c: batch[c][j] for c in columns}, cfg)
                if problem is not None:
                    raise DataError(f"{locate(index + j)}: {problem}")
            index += len(batch[columns[0]]) if columns else 0


def label_names(raw, cfg: DataConfig) -> list[str] | None:
    """Class names in a stable order: sorted numerically when they are all integers, else as strings."""
    if cfg.format != "classification" or cfg.target == "score":
        return None
    for split, ds in raw.items():
        labels = ds["label"]
        if None in labels:
            raise DataError(f"{_Locator(cfg, split)(labels.index(None))}: column {_column(cfg, 'label')} is empty")
    values = sorted({str(v) for split in raw.values() for v in split["label"]},
                    key=lambda s: (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s))
    if cfg.num_labels is not None:
        if len(values) > cfg.num_labels:
            raise DataError(f"data.num_labels is {cfg.num_labels} but the data has {len(values)} labels: {values}")
        if all(v.isdigit() for v in values):
            values = [str(i) for i in range(cfg.num_labels)]
    return values


def build_datasets(recipe: Recipe, tokenizer):
    """Sequence classification: (train, eval or None, raw DatasetDict, label names or None, validation or None),
    tokenised datasets ready for :func:`collator`. Causal-LM recipes hand :func:`load_raw`'s rows to TRL instead."""
    cfg = recipe.data
    if cfg.format != "classification":
        raise ValueError(f"format {cfg.format}: causal-LM data is tokenised by TRL (tam_hf.finetune.sft); "
                         "use load_raw for its rows")
    raw = load_raw(cfg)
    names = label_names(raw, cfg)
    label2id = {n: i for i, n in enumerate(names)} if names else None
    out = {split: tokenize_split(ds, split, tokenizer, cfg, label2id) for split, ds in raw.items()}
    return out["train"], out.get("eval"), raw, names, out.get("validation")


def tokenize_split(ds, split: str, tokenizer, cfg: DataConfig, label2id, desc: str | None = None):
    """One split of classification rows tokenised (``datasets.map``, cached), each row checked (a DataError names
    its file and line)."""
    fn = partial(_tokenize_checked, tokenizer=tokenizer, cfg=cfg, label2id=label2id, locate=_Locator(cfg, split))
    return ds.map(fn, with_indices=True, remove_columns=ds.column_names, desc=desc or f"tokenising {split}",
                  new_fingerprint=_fingerprint(ds, tokenizer, cfg, label2id))


def _fingerprint(ds, tokenizer, cfg: DataConfig, label2id) -> str:
    """The cache key of a tokenised split. `datasets` hashes the mapped function but not the functions it calls,
    so an edit of this module would silently reuse rows tokenised the old way: its source is part of the key."""
    from datasets.fingerprint import Hasher

    return Hasher.hash([ds._fingerprint, tokenizer, cfg.model_dump(mode="json"), label2id, _SOURCE])


def collator(recipe: Recipe, tokenizer):
    """Sequence classification: pads input_ids and attention_mask (labels are one value per row)."""
    from transformers import DataCollatorWithPadding

    if recipe.task != "sequence_classification":
        raise ValueError("causal-LM batches are collated by TRL's SFTTrainer (tam_hf.finetune.sft)")
    return DataCollatorWithPadding(tokenizer)
