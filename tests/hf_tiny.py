"""A tiny Llama and deterministic token data for the Trainer tests (offline, CPU, ~0.1 s per step), and the
independent computation of the damping telemetry they check the logs against."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

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


# ------------------------------------------------------------------ damping telemetry, computed independently


def summary_of_s(s_values) -> dict[str, float]:
    """What the damping/* keys must say for these per-tensor smoothed cosines s (d = (1 + s) / 2), computed here
    from the optimizer's raw state rather than through the optimizer's own readout."""
    d = (1.0 + torch.as_tensor([float(s) for s in s_values], dtype=torch.float64)) / 2.0
    return {"damping/mean": d.mean().item(), "damping/min": d.min().item(), "damping/max": d.max().item(),
            "damping/frac_below_half": (d < 0.5).double().mean().item()}


def summary_of_optimizer_pt(path) -> dict[str, float]:
    """The damping summary of a checkpoint's optimizer.pt (every tensor's saved "s")."""
    state = torch.load(path, weights_only=True)["state"]
    return summary_of_s(v["s"] for v in state.values() if "s" in v)


class RecordS(TrainerCallback):
    """Records, at the end of every optimizer step, each tensor's "s" straight from the optimizer's state."""

    def __init__(self):
        self.by_step: dict[int, list[float]] = {}

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        inner = optimizer.optimizer  # accelerate's AcceleratedOptimizer
        self.by_step[state.global_step] = [inner.state[p]["s"].item() for g in inner.param_groups
                                           for p in g["params"] if "s" in inner.state[p]]


def assert_logged_damping(entry: dict, expected: dict[str, float]) -> None:
    for key, value in expected.items():
        assert entry[key] == pytest.approx(value, abs=1e-7), (entry["step"], key)


class PoisonGradient(TrainerCallback):
    """Makes one gradient NaN just before the optimizer step that becomes `step`: the run diverges there."""

    def __init__(self, step):
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))


# ------------------------------------------------------------------------------ recipe runs on the tiny model


def run_raw(out, **training) -> dict:
    """A full fine-tuning recipe (as a mapping) on the embedded tiny Llama and demo data, writing to `out`."""
    return {
        "model": {"name": "embedded:tiny-llama"},
        "data": {"format": "prompt_completion", "train_file": "embedded:demo_train.jsonl", "max_length": 32},
        "finetune": {"method": "full"},
        "optimizer": {"name": "adatamw", "lr": 1e-3},
        "eval": {"metrics": []},
        "training": {"max_steps": 4, "per_device_train_batch_size": 8, "logging_steps": 2, "save_steps": 2,
                     "output_dir": str(out), "disable_tqdm": True, **training},
    }


def run_recipe(out, **training):
    from tam_hf.finetune.config.load import validate_recipe

    return validate_recipe(run_raw(out, **training))


def set_fields(recipe, **values):
    for key, value in values.items():
        setattr(recipe, key, value)
    return recipe


def read_summary(out) -> dict:
    """summary.json, refusing the bare NaN / Infinity that would make it invalid JSON."""
    import json
    from pathlib import Path

    def refuse(constant):
        raise AssertionError(f"summary.json holds a bare {constant}: not JSON")

    return json.loads((Path(out) / "summary.json").read_text(), parse_constant=refuse)


def complete(checkpoint) -> bool:
    from pathlib import Path

    from tam_hf.finetune.outputs import MARKER

    return (Path(checkpoint) / MARKER).is_file()
