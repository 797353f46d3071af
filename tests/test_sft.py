"""Causal-LM recipes on TRL's SFTTrainer (tam_hf.finetune.sft): formats map to TRL's dataset types with the
right loss masks; a packed batch has exactly the loss of its sequences unpacked (sdpa and eager, on CPU); the TAM
optimizer, its telemetry, the --optim_args check and resume work as under TAMTrainer."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainingArguments

from tam_hf.finetune.config.checks import packing_problems
from tam_hf.finetune.config.resolve import resolve_path
from tam_hf.finetune.config.schema import ModelConfig
from tam_hf.finetune.errors import DataError
from tam_hf.finetune.model import load_tokenizer, model_path
from tam_hf.finetune.sft import BLOCK_MASK_KEY, PackedBatchCollator, TAMSFTTrainer, build_sft_trainer, sft_config

# TrainingArguments(optim="adatamw") needs tam_hf.register(); the fixture undoes it after each test.
pytestmark = pytest.mark.usefixtures("registered")

TINY = ModelConfig(name="embedded:tiny-llama")
TEMPLATE = "Q: {instruction}\n{input}\nA:"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


def _rows(n: int = 12) -> Dataset:
    """Prompt/completion pairs of mixed lengths (4 to ~40 tokens)."""
    return Dataset.from_list([{"prompt": f"Add {i} and {3 * i}. " * (1 + i % 4), "completion": f" {4 * i}" * (1 + i % 3)}
                              for i in range(n)])


def _args(tmp_path, **overrides) -> TrainingArguments:
    defaults = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, learning_rate=5e-4,
                    lr_scheduler_type="constant", optim="adatamw", logging_steps=1, save_strategy="no",
                    report_to="none", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    return TrainingArguments(**{**defaults, **overrides})


def _model(attn: str = "sdpa"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_path(TINY), attn_implementation=attn)


def _trainer(tmp_path, tokenizer, rows=None, fmt="prompt_completion", attn="sdpa", args=None, **kwargs):
    kwargs.setdefault("max_length", 64)
    return build_sft_trainer(_model(attn), tokenizer, args or _args(tmp_path), _rows() if rows is None else rows,
                             fmt=fmt, **kwargs)


def _loss(trainer, batch, num_items=None) -> float:
    trainer.model.eval()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items).item()


def _targets(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def test_collator_keeps_packed_sequences_apart():
    batch = PackedBatchCollator(pad_token_id=0)([
        {"input_ids": [11, 12, 13, 21, 22], "labels": [-100, 12, 13, -100, 22], "seq_lengths": [3, 2]},
        {"input_ids": [31, 32, 33], "labels": [31, 32, 33]},  # no seq_lengths: one sequence
    ])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22], [-100, 32, 33, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    allowed = batch[BLOCK_MASK_KEY][:, 0].int().tolist()
    assert allowed[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    # padding attends to itself only, so no softmax row is empty; no real token attends to padding
    assert allowed[1] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]
    cut = PackedBatchCollator(pad_token_id=0, max_length=4)([{"input_ids": [1, 2, 3, 4, 5], "seq_lengths": [3, 2]}])
    assert cut["position_ids"].tolist() == [[0, 1, 2, 0]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_loss_equals_the_sequences_unpacked(tmp_path, tokenizer, attn):
    packed = _trainer(tmp_path, tokenizer, attn=attn, packing=True)
    unpacked = _trainer(tmp_path, tokenizer, attn=attn)
    assert isinstance(packed.data_collator, PackedBatchCollator)
    assert len(packed.train_dataset) < len(unpacked.train_dataset)  # several sequences share a row
    rows = [packed.train_dataset[i] for i in range(len(packed.train_dataset))]
    assert any(len(r["seq_lengths"]) > 1 for r in rows)
    batch = packed.data_collator(rows)
    loss = _loss(packed, batch, _targets(batch))

    # The Trainer's loss is per target token: the mean of the rows' own losses, each weighted by its targets.
    single = [unpacked.data_collator([unpacked.train_dataset[i]]) for i in range(len(unpacked.train_dataset))]
    weights = [_targets(b) for b in single]
    mean = sum(_loss(unpacked, b) * w for b, w in zip(single, weights)) / sum(weights)
    assert _targets(batch) == sum(weights)
    assert loss == pytest.approx(mean, abs=1e-4)
    padded = unpacked.data_collator([unpacked.train_dataset[i] for i in range(len(unpacked.train_dataset))])
    assert _loss(unpacked, padded, _targets(padded)) == pytest.approx(mean, abs=1e-4)

    # Without the block mask (restarting positions and a padding mask only) the sequences see each other.
    leaky = {k: v for k, v in batch.items() if k != BLOCK_MASK_KEY}
    assert abs(_loss(packed, leaky, _targets(batch)) - mean) > 1e-3


def test_formats_map_to_trl_types_with_their_loss_masks(tmp_path, tokenizer):
    pc = _trainer(tmp_path, tokenizer, _rows(2))
    row = pc.train_dataset[0]
    prompt = len(tokenizer("Add 0 and 0. ")["input_ids"])
    assert row["labels"][:prompt] == [-100] * prompt and row["labels"][prompt:] == row["input_ids"][prompt:]
    assert row["input_ids"][-1] == tokenizer.eos_token_id  # TRL ends the completion with EOS

    full = _trainer(tmp_path, tokenizer, _rows(2), completion_only_loss=False).train_dataset[0]
    assert full["labels"] == full["input_ids"]

    text = _trainer(tmp_path, tokenizer, Dataset.from_list([{"text": "one two three"}] * 2), fmt="text").train_dataset[0]
    assert text["labels"] == text["input_ids"] and text["input_ids"][-1] == tokenizer.eos_token_id

    instr = Dataset.from_list([{"instruction": "Add two and two.", "input": "", "output": " 4", "extra": 1}] * 2)
    trainer = _trainer(tmp_path, tokenizer, instr, fmt="instruction", instruction_template=TEMPLATE)
    row = trainer.train_dataset[0]
    shown = tokenizer.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l != -100])
    assert tokenizer.decode(row["input_ids"]).startswith("Q: Add two and two.\n\nA: 4") and shown.strip() == "4<|endoftext|>"

    chat = Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                            {"role": "user", "content": "sum"}, {"role": "assistant", "content": "42"}]}] * 2)
    row = _trainer(tmp_path, tokenizer, chat, fmt="chat").train_dataset[0]
    shown = tokenizer.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l != -100])
    assert shown == "yo<|im_end|>\n42<|im_end|>\n"  # assistant turns and their end-of-turn only


def test_chat_template_without_generation_markers_is_a_data_error(tmp_path, tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = plain.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    chat = Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 2)
    with pytest.raises(DataError, match="generation") as err:
        build_sft_trainer(_model(), plain, _args(tmp_path), chat, fmt="chat", max_length=32)
    assert "data.chat_template_path" in str(err.value) and "data.completion_only_loss: false" in str(err.value)
    row = build_sft_trainer(_model(), plain, _args(tmp_path), chat, fmt="chat", max_length=32,
                            completion_only_loss=False).train_dataset[0]
    assert row["labels"] == row["input_ids"]

    unmarked = tmp_path / "plain.jinja"
    unmarked.write_text(plain.chat_template)
    with pytest.raises(DataError, match="has no {% generation %}"):
        build_sft_trainer(_model(), plain, _args(tmp_path), chat, fmt="chat", max_length=32,
                          chat_template_path=str(unmarked))
    marked = str(resolve_path("embedded:chat_templates/chatml.jinja"))  # ChatML with markers, shipped
    row = build_sft_trainer(_model(), plain, _args(tmp_path), chat, fmt="chat", max_length=32,
                            chat_template_path=marked).train_dataset[0]
    assert tokenizer.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l != -100]) == "yo<|im_end|>\n"


def test_sft_config_keeps_the_training_arguments(tmp_path):
    args = _args(tmp_path, logging_steps=3, weight_decay=0.1, optim_args="decay_rate=0.8")
    config = sft_config(args, fmt="prompt_completion", max_length=48, packing=True)
    assert (config.bf16, config.gradient_checkpointing, config.logging_steps) == (False, False, 3)  # not SFTConfig's
    assert (str(config.optim.value), config.optim_args, config.weight_decay) == ("adatamw", "decay_rate=0.8", 0.1)
    assert (config.max_length, config.packing, config.completion_only_loss, config.assistant_only_loss) == (48, True, True, False)


def test_packed_training_uses_adatamw_with_param_groups_and_damping(tmp_path, tokenizer):
    from tam_hf.optim import AdaTAMW

    trainer = _trainer(tmp_path, tokenizer, packing=True,
                       args=_args(tmp_path, max_steps=-1, num_train_epochs=1, weight_decay=0.01))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    optimizer = trainer.optimizer
    while not isinstance(optimizer, AdaTAMW) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    assert isinstance(optimizer, AdaTAMW)
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.01]  # none on norms
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(0.0 <= h["damping/mean"] <= 1.0 for h in logs)
    real_tokens = sum(len(r["input_ids"]) for r in trainer.train_dataset)
    assert logs[-1]["num_tokens"] == real_tokens  # TRL's token count sees the padding mask, not the block mask
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) == len(before)


def test_bad_optim_args_fail_before_the_data_is_tokenised(tmp_path, tokenizer):
    config = sft_config(_args(tmp_path), fmt="prompt_completion", max_length=32)
    config.optim_args = "decay_rat=0.5"  # a typo that slipped past construction
    bad_rows = Dataset.from_list([{"prompt": 1, "completion": 2}])  # tokenising these would fail differently
    with pytest.raises(ValueError, match="decay_rat"):
        TAMSFTTrainer(model=_model(), args=config, train_dataset=bad_rows, processing_class=tokenizer)


def test_padding_free_needs_flash_attention_and_packing_a_maskable_attention(tmp_path, tokenizer):
    (problem,) = packing_problems(packing=False, padding_free=True, attn_implementation=None)
    assert "flash_attention_2" in problem and "data.packing: true" in problem
    assert packing_problems(True, False, "flex_attention") and not packing_problems(True, True, "flash_attention_2")
    assert not packing_problems(True, False, "eager") and not packing_problems(True, True, "sdpa")
    with pytest.raises(ValueError, match="flash"):
        _trainer(tmp_path, tokenizer, padding_free=True)


def test_resume_from_a_packed_checkpoint_continues_exactly(tmp_path, tokenizer):
    def run(out, steps, resume=None):
        trainer = _trainer(tmp_path, tokenizer, packing=True,
                           args=_args(tmp_path, output_dir=str(out), max_steps=steps, per_device_train_batch_size=2,
                                      save_strategy="steps", save_steps=2))
        trainer.train(resume_from_checkpoint=resume)
        return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}, trainer

    straight, _ = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed, trainer = run(tmp_path / "b", 4, resume=str(tmp_path / "b" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    assert [resumed[s] for s in (3, 4)] == pytest.approx([straight[s] for s in (3, 4)], abs=1e-6)


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_a_causal_lm_recipe_trains_on_the_sft_trainer(tmp_path, monkeypatch, packing):
    from tam_hf.finetune import sft
    from tam_hf.finetune.config.load import validate_recipe
    from tam_hf.finetune.pipeline import finetune

    built = []
    real = sft.build_sft_trainer
    monkeypatch.setattr(sft, "build_sft_trainer", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    recipe = validate_recipe({
        "model": {"name": "embedded:tiny-llama"},
        "data": {"format": "prompt_completion", "train_file": "embedded:demo_train.jsonl",
                 "eval_file": "embedded:demo_eval.jsonl", "max_length": 32, "max_eval_samples": 8, "packing": packing},
        "finetune": {"method": "full"},
        "optimizer": {"name": "adatamw", "lr": 1e-3},
        "eval": {"metrics": ["perplexity", "exact_match"], "max_new_tokens": 4},
        "training": {"max_steps": 4, "per_device_train_batch_size": 8, "logging_steps": 2, "save_strategy": "no",
                     "output_dir": str(tmp_path / "out"), "disable_tqdm": True},
    })
    summary = finetune(recipe)
    (trainer,) = built
    assert isinstance(trainer, TAMSFTTrainer) and isinstance(trainer.data_collator, PackedBatchCollator) == packing
    if packing:  # several demo rows share a packed row
        assert any(len(r["seq_lengths"]) > 1 for r in trainer.train_dataset)
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert 0.0 <= summary["damping"]["mean"] <= 1.0
    assert set(summary["eval"]) == {"loss", "perplexity", "exact_match"}  # TRL's entropy / token accuracy left out
    assert (tmp_path / "out" / "model.safetensors").is_file()
