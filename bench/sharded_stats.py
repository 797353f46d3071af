"""What exact sharded statistics cost per optimizer step: ZeRO-like flat partitions on 2 processes.

    torchrun --standalone --nproc_per_node 2 bench/sharded_stats.py

Each rank holds one flat fp32 partition (half of every layer's tensors, some tensors straddling the boundary, as
under ZeRO-1/2). It times AdaTAM's step on that partition four ways: naive (the flat partition taken as one
tensor: wrong cosines, the cost floor), the same fragments as separate tensors with no reduction (per-tensor
cost, still wrong), with ShardedStats (fragment views + one all-reduce per param group: exact), and the
all-reduce of the [n_tensors, 3] float64 statistics alone. Prints a table (median over steps, ms).

On a CPU box the all-reduce is gloo between processes sharing cores: its latency (0.4 to several ms) is
scheduling noise more than communication. On GPUs the same 3 x n_tensors float64 NCCL all-reduce is a
latency-bound ~10-50 us collective.
"""

import statistics
import time

import torch
import torch.distributed as dist

from tam_hf.optim import AdaTAM
from tam_hf.optim.sharded import Fragment, ShardedSource, ShardedStats

SIZES = [  # (label, tensor shapes of the whole model)
    ("tiny Llama (21 tensors, 0.1M)", [(96, 32)] + [(32, 32), (16, 32), (16, 32), (32, 32), (64, 32), (64, 32),
                                                    (32, 64), (32,), (32,)] * 2 + [(32,), (96, 32)]),
    ("LoRA r=16 on 24 layers (192 tensors, 3.1M)", [(16, 1024), (1024, 16)] * 96),
    ("24 layers x 1024 full (218 tensors, 50M)", [(1024, 1024)] * 4 * 24 + [(2816, 1024)] * 24 + [(1024,)] * 98),
]
STEPS, WARMUP = 50, 5


def partition(shapes, rank, world):
    """The flat partition of `rank` and its fragments (start in the partition, numel, tensor row)."""
    sizes = [torch.Size(s).numel() for s in shapes]
    total = sum(sizes)
    per = -(-total // world)
    lo, hi = rank * per, min((rank + 1) * per, total)
    frags, offset = [], 0
    for row, n in enumerate(sizes):
        a, b = max(offset, lo), min(offset + n, hi)
        if a < b:
            frags.append(Fragment(a - lo, b - a, row))
        offset += n
    return torch.randn(per), frags, len(sizes)


def timed(fn):
    times = []
    for i in range(WARMUP + STEPS):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[WARMUP:]) * 1e3


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    rows = []
    for label, shapes in SIZES:
        flat, frags, n_tensors = partition(shapes, rank, world)
        grad = torch.randn_like(flat)

        naive_p = flat.clone().requires_grad_()
        naive_p.grad = grad.clone()
        naive = AdaTAM([naive_p], lr=1e-4)

        exact_p = flat.clone().requires_grad_()
        exact = AdaTAM([exact_p], lr=1e-4)
        ShardedStats(exact, [ShardedSource(exact_p, "flat", frags, [str(i) for i in range(n_tensors)])])

        def exact_step():
            exact_p.grad = grad  # DeepSpeed sets the flat grad before every step
            exact.step()

        # the same fragments as independent local tensors, no reduction: per-tensor granularity without exactness
        local = [flat[f.start:f.start + f.numel].clone().requires_grad_() for f in frags]
        for v, f in zip(local, frags):
            v.grad = grad[f.start:f.start + f.numel].clone()
        per_fragment = AdaTAM(local, lr=1e-4)

        stats = torch.randn(n_tensors, 3, dtype=torch.float64)
        rows.append((label, len(frags), timed(naive.step), timed(per_fragment.step), timed(exact_step),
                     timed(lambda: dist.all_reduce(stats))))
    if rank == 0:
        print(f"{world} processes (gloo, CPU, {torch.get_num_threads()} threads each); AdaTAM step on one flat "
              "partition per rank, median ms")
        print(f"| {'model':44s} | fragments/rank | naive: 1 flat tensor (wrong) | per fragment, unreduced (wrong) "
              "| exact (ShardedStats) | all-reduce alone |")
        print(f"|{'-' * 46}|---------------:|---:|---:|---:|---:|")
        for label, n_frag, t_naive, t_frag, t_exact, t_ar in rows:
            print(f"| {label:44s} | {n_frag:14d} | {t_naive:.3f} | {t_frag:.3f} | {t_exact:.3f} | {t_ar:.3f} |")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
