"""Each data format tokenises as documented: labels, completion-only masks, columns, truncation."""

import json

import pytest

from tam_hf.finetune.data import IGNORE, DataError, build_datasets, collator, load_raw, tokenize_row
from tam_hf.finetune.model import load_tokenizer
from tam_hf.finetune.recipe import DataConfig, ModelConfig, validate_recipe


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(name="embedded:tiny-llama"))


def _labelled(enc, tok) -> str:
    return tok.decode([t for t, l in zip(enc["input_ids"], enc["labels"]) if l != IGNORE])


def test_prompt_completion_masks_the_prompt(tok):
    cfg = DataConfig(format="prompt_completion")
    enc = tokenize_row({"prompt": "What is 2 plus 3?", "completion": " 5"}, tok, cfg)
    assert len(enc["input_ids"]) == len(enc["labels"]) == len(enc["attention_mask"])
    assert enc["input_ids"][-1] == tok.eos_token_id
    assert _labelled(enc, tok) == " 5" + tok.eos_token
    n_prompt = len(tok("What is 2 plus 3?")["input_ids"])
    assert enc["labels"][:n_prompt] == [IGNORE] * n_prompt


def test_completion_only_loss_false_labels_everything(tok):
    cfg = DataConfig(format="prompt_completion", completion_only_loss=False)
    enc = tokenize_row({"prompt": "What is 2 plus 3?", "completion": " 5"}, tok, cfg)
    assert enc["labels"] == enc["input_ids"]


def test_text_labels_every_token(tok):
    enc = tokenize_row({"text": "Add one and two."}, tok, DataConfig(format="text"))
    assert enc["labels"] == enc["input_ids"] and enc["input_ids"][-1] == tok.eos_token_id


def test_instruction_fills_template_and_masks_it(tok):
    cfg = DataConfig(format="instruction", instruction_template="Q: {instruction} {input}\nA:")
    enc = tokenize_row({"instruction": "Add", "input": "two and two.", "output": " 4"}, tok, cfg)
    assert tok.decode(enc["input_ids"]).startswith("Q: Add two and two.\nA: 4")
    assert _labelled(enc, tok) == " 4" + tok.eos_token


def test_chat_labels_only_assistant_turns(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 1 plus 1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "And 2 plus 2?"},
        {"role": "assistant", "content": "4"},
    ]
    enc = tokenize_row({"messages": messages}, tok, DataConfig(format="chat"))
    assert tok.decode(enc["input_ids"]) == tok.apply_chat_template(messages, tokenize=False)
    # Both assistant answers and their end-of-turn markers, nothing of the system or user turns.
    assert _labelled(enc, tok) == "2<|im_end|>\n4<|im_end|>\n"
    full = tokenize_row({"messages": messages}, tok, DataConfig(format="chat", completion_only_loss=False))
    assert full["labels"] == full["input_ids"]


def test_classification_single_and_paired(tok):
    cfg = DataConfig(format="classification")
    single = tokenize_row({"text": "one", "label": "pos"}, tok, cfg, label2id={"neg": 0, "pos": 1})
    paired = tokenize_row({"text": "one", "text_pair": "two", "label": "neg"}, tok, cfg, label2id={"neg": 0, "pos": 1})
    assert single["labels"] == 1 and paired["labels"] == 0
    assert len(paired["input_ids"]) > len(single["input_ids"])
    score = tokenize_row({"text": "one", "label": 3.5}, tok, DataConfig(format="classification", target="score"))
    assert score["labels"] == 3.5


def test_truncation_keeps_lengths_consistent(tok):
    cfg = DataConfig(format="prompt_completion", max_length=8)
    enc = tokenize_row({"prompt": "What is 2 plus 3? " * 3, "completion": " 5"}, tok, cfg)
    assert len(enc["input_ids"]) == len(enc["labels"]) == 8


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_build_datasets_from_files_with_column_mapping_and_collator(tmp_path, tok):
    train = _write(tmp_path / "train.jsonl", [{"q": f"What is {i} plus 1?", "a": f" {i + 1}"} for i in range(10)])
    recipe = validate_recipe({
        "model": {"name": "embedded:tiny-llama"},
        "data": {"format": "prompt_completion", "train_file": train, "eval_fraction": 0.2,
                 "columns": {"prompt": "q", "completion": "a"}},
        "optimizer": {"name": "adatam", "lr": 1e-3},
    })
    train_ds, eval_ds, raw, names = build_datasets(recipe, tok)
    assert (len(train_ds), len(eval_ds)) == (8, 2) and names is None
    assert set(train_ds.column_names) == {"input_ids", "attention_mask", "labels"}
    batch = collator(recipe, tok)([train_ds[0], train_ds[1], train_ds[2]])
    assert batch["input_ids"].shape == batch["labels"].shape
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == IGNORE).all()  # padding never carries a label


def test_classification_labels_are_named_and_csv_loads(tmp_path, tok):
    path = tmp_path / "train.csv"
    path.write_text("sentence,label\ngood,pos\nbad,neg\nfine,pos\n")
    recipe = validate_recipe({
        "model": {"name": "embedded:tiny-llama"}, "task": "sequence_classification",
        "data": {"format": "classification", "train_file": str(path), "columns": {"text": "sentence"}},
        "optimizer": {"name": "adamw", "lr": 1e-3}, "eval": {"metrics": []},
    })
    train_ds, _, _, names = build_datasets(recipe, tok)
    assert names == ["neg", "pos"] and train_ds["labels"] == [1, 0, 1]


def test_missing_column_is_a_clear_error(tmp_path):
    cfg = DataConfig(format="prompt_completion", train_file=_write(tmp_path / "t.jsonl", [{"question": "x", "completion": "y"}]))
    with pytest.raises(DataError, match=r"no column\(s\) \['prompt'\].*data.columns"):
        load_raw(cfg)


def test_local_dataset_directory_with_splits_and_plain_text_file(tmp_path, tok):
    root = tmp_path / "ds"
    root.mkdir()
    _write(root / "train.jsonl", [{"text": f"line {i}"} for i in range(6)])
    _write(root / "test.jsonl", [{"text": "held out"}])
    recipe = validate_recipe({"model": {"name": "embedded:tiny-llama"},
                              "data": {"format": "text", "dataset": str(root), "eval_split": "test"},
                              "optimizer": {"name": "tam", "lr": 0.01}})
    train_ds, eval_ds, _, _ = build_datasets(recipe, tok)
    assert (len(train_ds), len(eval_ds)) == (6, 1)
    (tmp_path / "corpus.txt").write_text("Add one and two.\nWhat is 3 plus 4?\n")
    raw = load_raw(DataConfig(format="text", train_file=str(tmp_path / "corpus.txt")))
    assert raw["train"]["text"] == ["Add one and two.", "What is 3 plus 4?"]
