"""Optimizer step time and state memory: TAM / AdaTAM / AdaTAMW (every path) against torch AdamW and
SGD-momentum, and pytorch_optimizer's AdaTAM / TAM (optional `bench` extra), in ONE run.

    python bench/optim_step.py                    # ~30M-parameter Llama-shaped set, CPU
    python bench/optim_step.py --device cuda      # the same on a GPU

All optimizers step the same parameters and gradients; rounds alternate between them so that machine noise
hits everyone alike; the figure is the median over rounds of the mean step time within a round. Ratios are
to the fastest torch AdamW of the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tam_hf
from tam_hf.optim import fused


def llama_shapes(hidden=512, intermediate=1408, layers=6, vocab=12000):
    """Embedding, per layer q/k/v/o + gate/up/down + two norms, final norm, untied head: 31.6M parameters."""
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate), (hidden,), (hidden,)]
    return shapes + [(hidden,), (vocab, hidden)]


def candidates(device):
    lr = 1e-7  # every optimizer moves the same shared parameters; keep them where they are
    c = {
        "torch AdamW (for-loop)": lambda p: torch.optim.AdamW(p, lr=lr, foreach=False),
        "torch AdamW (foreach)": lambda p: torch.optim.AdamW(p, lr=lr, foreach=True),
        "torch AdamW (fused)": lambda p: torch.optim.AdamW(p, lr=lr, fused=True),
        "torch SGD momentum (foreach)": lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, foreach=True),
        "tam_hf AdaTAM (default)": lambda p: tam_hf.AdaTAM(p, lr=lr),
        "tam_hf AdaTAMW (default)": lambda p: tam_hf.AdaTAMW(p, lr=lr),
        "tam_hf TAM (default)": lambda p: tam_hf.TAM(p, lr=lr),
        "tam_hf AdaTAM (single)": lambda p: tam_hf.AdaTAM(p, lr=lr, foreach=False, fused=False),
        "tam_hf AdaTAM (foreach)": lambda p: tam_hf.AdaTAM(p, lr=lr, foreach=True),
        "tam_hf TAM (single)": lambda p: tam_hf.TAM(p, lr=lr, foreach=False, fused=False),
        "tam_hf TAM (foreach)": lambda p: tam_hf.TAM(p, lr=lr, foreach=True),
    }
    if device == "cpu" and fused.available():
        c["tam_hf AdaTAM (fused)"] = lambda p: tam_hf.AdaTAM(p, lr=lr, fused=True)
        c["tam_hf AdaTAM (fused, global scope)"] = lambda p: tam_hf.AdaTAM(p, lr=lr, fused=True, cosine_scope="global")
        c["tam_hf TAM (fused)"] = lambda p: tam_hf.TAM(p, lr=lr, fused=True)
    try:
        import pytorch_optimizer as po

        c["pytorch_optimizer 4.1 AdaTAM"] = lambda p: po.AdaTAM(p, lr=lr)
        c["pytorch_optimizer 4.1 TAM"] = lambda p: po.TAM(p, lr=lr)
    except ImportError:
        print("(pytorch_optimizer not installed: pip install -e '.[bench]' to compare against it)")
    return c


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def state_bytes(opt):
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))


def make_params(shapes, device, dtype=torch.float32) -> list[torch.nn.Parameter]:
    """One shared set of parameters with gradients (fixed seed): every optimizer steps the same tensors."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device, dtype)
    return params


def median_step_ms(opts: dict, device, rounds: int, steps: int, warmup: int = 2) -> dict[str, float]:
    """name -> median over rounds of the mean step time (ms) within a round. Rounds alternate between the
    optimizers so that machine noise hits everyone alike; warm-up steps (state creation, kernel compilation,
    caches) are not timed. Other bench scripts import this (``from optim_step import median_step_ms``)."""
    for opt in opts.values():
        for _ in range(warmup):
            opt.step()
    times = {name: [] for name in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.step()
            sync(device)
            times[name].append((time.perf_counter() - t0) / steps * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5, help="steps per optimizer per round")
    ap.add_argument("--only", default="", help="comma-separated substrings of optimizer names to keep")
    ap.add_argument("--small", action="store_true", help="a 0.1M-parameter set, to check the script runs")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    shapes = llama_shapes(hidden=32, intermediate=64, layers=1, vocab=100) if args.small else llama_shapes()
    params = make_params(shapes, args.device, dtype)

    opts = {name: make(params) for name, make in candidates(args.device).items()
            if not args.only or any(k in name for k in args.only.split(","))}
    median = median_step_ms(opts, args.device, args.rounds, args.steps)
    adamw = [median[n] for n in median if n.startswith("torch AdamW")]
    base = min(adamw) if adamw else min(median.values())
    print_table(opts, params, median, base, "fastest AdamW", args)


def print_table(opts: dict, params, median: dict, base: float, base_label: str, args) -> None:
    """The heading line and the markdown table (ms / step, ratio to ``base``, state bytes per parameter byte);
    ``args`` carries device, rounds, steps and, when there is one, dtype."""
    n_params = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    print(f"\n{n_params / 1e6:.1f}M parameters in {len(params)} tensors, {getattr(args, 'dtype', 'float32')}, "
          f"{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.rounds} "
          f"rounds x {args.steps} steps\n")
    print(f"| optimizer | ms / step | vs {base_label} | state bytes / param bytes |")
    print("|---|---:|---:|---:|")
    for name in opts:
        ratio = state_bytes(opts[name]) / param_bytes
        print(f"| {name} | {median[name]:.1f} | {median[name] / base:.2f}x | {ratio:.2f} |")


if __name__ == "__main__":
    main()
