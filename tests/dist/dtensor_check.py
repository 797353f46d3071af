"""The FSDP2 path of the statistics layer on a 2-process CPU mesh: DTensor parameters sharded on dim 0 (uneven,
one rank holding an empty shard) stepped through ShardedStats vs the same tensors whole on every rank.

    torchrun --standalone --nproc_per_node 2 tests/dist/dtensor_check.py OUT

(also run from parity.py as the ``dtensor`` backend). Writes OUT/dtensor-rank{r}.pt.
"""

import os
import sys

import torch
import torch.distributed as dist

from tam_hf.distributed import install_sharded_stats
from tam_hf.optim import TAM, AdaTAM, AdaTAMW

SHAPES = [(5, 3), (7,), (1, 4), (2, 2)]  # 5 and 7 rows split unevenly; (1, 4) leaves one rank an empty shard
CASES = {  # name: (class, kwargs); "-naive": the same without the statistics layer (the control)
    "adatam": (AdaTAM, dict(lr=1e-2, weight_decay=0.1)),
    "adatamw": (AdaTAMW, dict(lr=1e-2)),
    "tam": (TAM, dict(lr=1e-2)),
    "adatam-global": (AdaTAM, dict(lr=1e-2, cosine_scope="global")),
    "adatam-naive": (AdaTAM, dict(lr=1e-2, weight_decay=0.1)),
}
STEPS = 4


def _count_allreduces():
    counter = {"n": 0}
    original = dist.all_reduce

    def counting(*args, **kwargs):
        counter["n"] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counting
    return counter, lambda: setattr(dist, "all_reduce", original)


def check(out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {}
    for name, (cls, kwargs) in CASES.items():
        torch.manual_seed(0)  # the same whole tensors and gradients on every rank
        whole = [torch.randn(s) for s in SHAPES]
        ref = [torch.nn.Parameter(w.clone()) for w in whole]
        sharded = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w in whole]
        # two param groups, as the Trainer builds them
        groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}]  # noqa: E731
        opt_ref, opt = cls(groups(ref), **kwargs), cls(groups(sharded), **kwargs)
        if not name.endswith("naive"):
            assert install_sharded_stats(opt) is not None
        counter, restore = _count_allreduces()
        per_step = []
        error = None
        try:
            for _ in range(STEPS):
                grads = [torch.randn(s) for s in SHAPES]
                for p, g in zip(ref, grads):
                    p.grad = g.clone()
                for p, g in zip(sharded, grads):
                    p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
                opt_ref.step()
                before = counter["n"]
                opt.step()
                per_step.append(counter["n"] - before)
        except Exception as e:  # the naive control may not run at all
            if not name.endswith("naive"):
                raise
            error = f"{type(e).__name__}: {e}"
        finally:
            restore()
        if error is not None:
            results[name] = {"error": error}
            continue
        results[name] = {
            "param_err": max((p.full_tensor() - r).abs().max().item() for p, r in zip(sharded, ref)),
            "damping": opt.damping()["d"],
            "damping_ref": opt_ref.damping()["d"],
            "allreduces_per_step": per_step,
            "n_groups": len(opt.param_groups),
            "local_numels": [p.to_local().numel() for p in sharded],
            "state_is_dtensor": all(type(opt.state[p]["exp_avg" if "exp_avg" in opt.state[p] else
                                                    "momentum_buffer"]).__name__ == "DTensor" for p in sharded),
        }
    torch.save(results, os.path.join(out_dir, f"dtensor-rank{dist.get_rank()}.pt"))


if __name__ == "__main__":
    dist.init_process_group("gloo")
    check(sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()
