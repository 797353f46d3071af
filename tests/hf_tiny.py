"""A tiny Llama and deterministic token data for the Trainer tests (offline, CPU, ~0.1 s per step)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

VOCAB = 64
SEQ = 16


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2 * SEQ, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


class ArithmeticTokens(torch.utils.data.Dataset):
    """Sequences x_t = (start + step * t) mod VOCAB: learnable, so the loss falls within a few steps."""

    def __init__(self, n: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(output_dir, **overrides) -> TrainingArguments:
    defaults = dict(
        output_dir=str(output_dir), per_device_train_batch_size=8, max_steps=8, learning_rate=5e-4,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    return TrainingArguments(**{**defaults, **overrides})


def losses(log_history: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in log_history if "loss" in e}
