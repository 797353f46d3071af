"""8-bit AdaTAMW against bitsandbytes' AdamW8bit and 32-bit AdaTAMW / torch AdamW: step time and state memory,
in ONE run, on the same Llama-shaped tensor set as bench/optim_step.py.

    python bench/optim_8bit.py                    # ~30M-parameter Llama-shaped set, CPU
    python bench/optim_8bit.py --device cuda      # the same on a GPU

All optimizers step the same parameters and gradients; rounds alternate between them so that machine noise
hits everyone alike; the figure is the median over rounds of the mean step time within a round. Ratios are
to bitsandbytes' AdamW8bit of the same run. State bytes count every tensor in the optimizer's state (uint8
codes, per-block absmax, bitsandbytes' per-tensor code maps, float32 moments of small tensors, scalars).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

import tam_hf
from tam_hf.optim.tam8bit import AdaTAMW8bit


def _optim_step_module():
    """bench/optim_step.py (a script, not a package): its tensor set, timing and table, by path."""
    spec = importlib.util.spec_from_file_location("_optim_step", Path(__file__).with_name("optim_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_base = _optim_step_module()
llama_shapes, make_params, median_step_ms, print_table = (
    _base.llama_shapes, _base.make_params, _base.median_step_ms, _base.print_table)

BASELINE = "bitsandbytes AdamW8bit"


def candidates(device):
    import bitsandbytes as bnb

    lr = 1e-7  # every optimizer moves the same shared parameters; keep them where they are
    return {
        BASELINE: lambda p: bnb.optim.AdamW8bit(p, lr=lr),
        "tam_hf AdaTAMW8bit (default)": lambda p: AdaTAMW8bit(p, lr=lr),
        "tam_hf AdaTAMW8bit (single)": lambda p: AdaTAMW8bit(p, lr=lr, foreach=False, fused=False),
        "tam_hf AdaTAMW (default)": lambda p: tam_hf.AdaTAMW(p, lr=lr),
        "torch AdamW (default)": lambda p: torch.optim.AdamW(p, lr=lr),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="steps per optimizer per round")
    ap.add_argument("--only", default="", help="comma-separated substrings of optimizer names to keep")
    ap.add_argument("--small", action="store_true", help="a 0.1M-parameter set, to check the script runs")
    args = ap.parse_args(argv)

    shapes = llama_shapes(hidden=32, intermediate=64, layers=1, vocab=200) if args.small else llama_shapes()
    params = make_params(shapes, args.device)
    opts = {name: make(params) for name, make in candidates(args.device).items()
            if not args.only or name == BASELINE or any(k in name for k in args.only.split(","))}
    median = median_step_ms(opts, args.device, args.rounds, args.steps, warmup=1)
    print_table(opts, params, median, median[BASELINE], BASELINE, args)

if __name__ == "__main__":
    main()
