"""Data: files and datasets load with their columns mapped; every causal-LM row is checked before TRL sees it
(how TRL tokenises each format is tests/test_sft.py's business); classification tokenises and collates here; the
embedded demo data is what scripts/build_embedded.py makes."""

import importlib.util
import json
from pathlib import Path

import pytest

from tam_hf.finetune.data import build_datasets, collator, load_raw, tokenize_row
from tam_hf.finetune.model import load_tokenizer
from tam_hf.finetune.config.load import validate_recipe
from tam_hf.finetune.config.schema import DataConfig, ModelConfig
from tam_hf.finetune.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(name="embedded:tiny-llama"))


def test_classification_single_and_paired(tok):
    cfg = DataConfig(format="classification")
    single = tokenize_row({"text": "one", "label": "pos"}, tok, cfg, label2id={"neg": 0, "pos": 1})
    paired = tokenize_row({"text": "one", "text_pair": "two", "label": "neg"}, tok, cfg, label2id={"neg": 0, "pos": 1})
    assert single["labels"] == 1 and paired["labels"] == 0
    assert len(paired["input_ids"]) > len(single["input_ids"])
    score = tokenize_row({"text": "one", "label": 3.5}, tok, DataConfig(format="classification", target="score"))
    assert score["labels"] == 3.5


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_files_load_with_column_mapping_and_an_eval_fraction(tmp_path):
    train = _write(tmp_path / "train.jsonl", [{"q": f"What is {i} plus 1?", "a": f" {i + 1}"} for i in range(10)])
    cfg = DataConfig(format="prompt_completion", train_file=train, eval_fraction=0.2,
                     columns={"prompt": "q", "completion": "a"})
    raw = load_raw(cfg)
    assert (len(raw["train"]), len(raw["eval"])) == (8, 2)
    assert set(raw["train"].column_names) == {"prompt", "completion"}  # canonical names, what TRL's type needs
    assert sorted([*raw["train"]["prompt"], *raw["eval"]["prompt"]]) == sorted(f"What is {i} plus 1?" for i in range(10))


def test_causal_rows_are_checked_before_trl_sees_them(tmp_path):
    rows = [{"instruction": "Add", "input": None, "output": " 4"}, {"instruction": "Add", "input": 3, "output": " 5"}]
    cfg = DataConfig(format="instruction", train_file=_write(tmp_path / "i.jsonl", rows))
    with pytest.raises(DataError, match=r"i.jsonl, line 2: column 'input' must be a string or empty, got int"):
        load_raw(cfg)
    many = [{"text": f"row {i}"} for i in range(2500)] + [{"text": None}]  # past the first batches of the check
    with pytest.raises(DataError, match=r"t.jsonl, line 2501: column 'text' must be a string"):
        load_raw(DataConfig(format="text", train_file=_write(tmp_path / "t.jsonl", many)))
    chat = [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": []}]
    with pytest.raises(DataError, match=r"c.jsonl, line 2: column 'messages' must be a list of"):
        load_raw(DataConfig(format="chat", train_file=_write(tmp_path / "c.jsonl", chat)))


def test_causal_rows_are_trls_business_and_classification_collates_here(tmp_path, tok):
    cfg = DataConfig(format="prompt_completion")
    with pytest.raises(ValueError, match="TRL"):
        tokenize_row({"prompt": "a", "completion": "b"}, tok, cfg)
    recipe = validate_recipe({
        "model": {"name": "embedded:tiny-llama"}, "task": "sequence_classification",
        "data": {"format": "classification", "train_file": _write(tmp_path / "c.jsonl", [
            {"text": "good " * (i + 1), "label": "pos"} for i in range(3)])},
        "optimizer": {"name": "adamw", "lr": 1e-3}, "eval": {"metrics": []},
    })
    train_ds, _, _, _, _ = build_datasets(recipe, tok)
    batch = collator(recipe, tok)([train_ds[i] for i in range(3)])
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["labels"].tolist() == [0, 0, 0]
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][2].sum()  # padded to the longest


def test_classification_labels_are_named_and_csv_loads(tmp_path, tok):
    path = tmp_path / "train.csv"
    path.write_text("sentence,label\ngood,pos\nbad,neg\nfine,pos\n")
    recipe = validate_recipe({
        "model": {"name": "embedded:tiny-llama"}, "task": "sequence_classification",
        "data": {"format": "classification", "train_file": str(path), "columns": {"text": "sentence"}},
        "optimizer": {"name": "adamw", "lr": 1e-3}, "eval": {"metrics": []},
    })
    train_ds, _, _, names, _ = build_datasets(recipe, tok)
    assert names == ["neg", "pos"] and train_ds["labels"] == [1, 0, 1]


def test_missing_column_is_a_clear_error(tmp_path):
    cfg = DataConfig(format="prompt_completion", train_file=_write(tmp_path / "t.jsonl", [{"question": "x", "completion": "y"}]))
    with pytest.raises(DataError, match=r"no column\(s\) \['prompt'\].*data.columns"):
        load_raw(cfg)


def test_local_dataset_directory_with_splits_and_plain_text_file(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    _write(root / "train.jsonl", [{"text": f"line {i}"} for i in range(6)])
    _write(root / "test.jsonl", [{"text": "held out"}])
    raw = load_raw(DataConfig(format="text", dataset=str(root), eval_split="test"))
    assert (len(raw["train"]), len(raw["eval"])) == (6, 1)
    (tmp_path / "corpus.txt").write_text("Add one and two.\nWhat is 3 plus 4?\n")
    raw = load_raw(DataConfig(format="text", train_file=str(tmp_path / "corpus.txt")))
    assert raw["train"]["text"] == ["Add one and two.", "What is 3 plus 4?"]


def test_embedded_demo_data_is_what_the_generator_makes():
    spec = importlib.util.spec_from_file_location("build_embedded", ROOT / "scripts" / "build_embedded.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assets = ROOT / "tam_hf" / "assets"
    data = gen.rows()
    assert (assets / "demo_train.jsonl").read_text() == gen.jsonl(data[:168])
    assert (assets / "demo_eval.jsonl").read_text() == gen.jsonl(data[168:])
    assert (assets / "demo_chat.jsonl").read_text() == gen.jsonl(gen.chat_rows())  # byte for byte
    assert (assets / "chat_templates" / "chatml.jinja").read_text() == gen.CHAT_TEMPLATE
    assert (assets / "tiny-llama" / "chat_template.jinja").read_text() == gen.CHAT_TEMPLATE
    chats = [json.loads(line)["messages"] for line in (assets / "demo_chat.jsonl").read_text().splitlines()]
    assert len(chats) == 64 and sum(len(m) == 5 for m in chats) == 22  # (8a + b) % 3 == 0 for 22 of the 64
    for messages in chats:
        words = messages[1]["content"].rstrip("?.").split()  # "What is 3 plus 4" / "Add three and five"
        a, b = (int(words[2]), int(words[4])) if words[0] == "What" else (gen.WORDS.index(words[1]), gen.WORDS.index(words[3]))
        assert messages[2]["content"] == str(a + b)
        assert len(messages) == 3 or messages[4]["content"] == str(a + b + 1)
    train_prompts = {json.loads(line)["prompt"] for line in (assets / "demo_train.jsonl").read_text().splitlines()}
    eval_prompts = {json.loads(line)["prompt"] for line in (assets / "demo_eval.jsonl").read_text().splitlines()}
    assert not train_prompts & eval_prompts and len(train_prompts | eval_prompts) == 200


def _bert_tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "the", "film"]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


def test_a_pair_keeps_its_segments_for_models_that_read_them(tmp_path, tok):
    cfg, ids = DataConfig(format="classification"), {"neg": 0, "pos": 1}
    pair = tokenize_row({"text": "good film", "text_pair": "bad", "label": "pos"}, _bert_tokenizer(tmp_path), cfg, ids)
    assert pair["token_type_ids"] == [0, 0, 0, 0, 1, 1]  # [CLS] good film [SEP] | bad [SEP]: BERT tells them apart
    llama = tokenize_row({"text": "one", "text_pair": "two", "label": "neg"}, tok, cfg, ids)
    assert "token_type_ids" not in llama  # a model without segments is not handed any


def test_tokenised_data_is_not_reused_from_the_cache_after_the_tokenisation_changes(tmp_path, monkeypatch):
    from tam_hf.finetune import data

    tok = _bert_tokenizer(tmp_path)
    recipe = validate_recipe({
        "model": {"name": "embedded:tiny-llama"}, "task": "sequence_classification",
        "data": {"format": "classification", "train_file": _write(tmp_path / "c.jsonl", [
            {"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}])},
        "optimizer": {"name": "adamw", "lr": 1e-3}, "eval": {"metrics": []},
        "training": {"output_dir": str(tmp_path / "o")}})
    first = build_datasets(recipe, tok)[0]
    monkeypatch.setattr(data, "_SOURCE", data._SOURCE + "# changed")  # as if data.py had been edited
    monkeypatch.setattr(data, "_classification", lambda row, tokenizer, cfg, label2id=None: {
        "input_ids": [2, 3], "attention_mask": [1, 1], "labels": 0})
    second = build_datasets(recipe, tok)[0]
    assert first["input_ids"][0] != [2, 3] and second["input_ids"][0] == [2, 3]
