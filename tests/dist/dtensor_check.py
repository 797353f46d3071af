"""The FSDP2 path of the statistics layer on a 2-process CPU mesh: DTensor parameters sharded on dim 0 (uneven,
one rank holding an empty shard) stepped through ShardedStats vs the same tensors whole on every rank.

    torchrun --standalone --nproc_per_node 2 tests/dist/dtensor_check.py OUT

(also run from parity.py as the ``dtensor`` backend). Writes OUT/dtensor-rank{r}.pt.
"""

import os
import sys

import torch
import torch.distributed as dist

from tam_hf.trainer.distributed import install_sharded_stats
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
        except Exception as e:  # the naive control may not run at all; the test checks why
            if not name.endswith("naive"):
                raise
            error = f"{type(e).__name__}: {e}"
        finally:
            restore()
        if error is not None:
            results[name] = {"error": error, "steps_done": len(per_step)}
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


def fsdp2_check(out_dir: str) -> None:
    """A real FSDP2 model (``fully_shard`` per decoder layer and at the root, gloo on CPU) trained 4 steps with
    batch 4 per rank vs the same model whole on one process with batch 8. A plain loop: accelerate enables FSDP
    only on accelerators, so the Trainer cannot run FSDP2 on CPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from parity import GLOBAL_BATCH, Tokens, build_model

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    data = Tokens().ids
    per_rank = GLOBAL_BATCH // world

    def groups(model, wd):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [{"params": [p for n, p in named if p.ndim >= 2], "weight_decay": wd},
                {"params": [p for n, p in named if p.ndim < 2], "weight_decay": 0.0}]

    results = {}
    for name, cls, kwargs in [("adatam", AdaTAM, dict(lr=5e-4)), ("tam", TAM, dict(lr=5e-2))]:
        ref, model = build_model(False), build_model(False)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt_ref, opt = cls(groups(ref, 0.01), **kwargs), cls(groups(model, 0.01), **kwargs)
        stats = install_sharded_stats(opt, model)
        for step in range(STEPS):
            batch = data[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH]
            ref(input_ids=batch, labels=batch).loss.backward()
            opt_ref.step()
            opt_ref.zero_grad()
            local = batch[rank * per_rank:(rank + 1) * per_rank]
            model(input_ids=local, labels=local).loss.backward()
            opt.step()
            opt.zero_grad()
        results[name] = {
            "param_err": max((p.full_tensor() - r).abs().max().item()
                             for p, r in zip(model.parameters(), ref.parameters())),
            "damping": opt.damping()["d"],
            "damping_ref": opt_ref.damping()["d"],
            "allreduces": stats.allreduce_calls,
            "n_groups": len(opt.param_groups),
            "dtensor_params": sum(type(p).__name__ == "DTensor" for p in model.parameters()),
        }
    results["adatam-resume"] = _fsdp2_resume(out_dir, mesh, data, groups, rank, per_rank)
    torch.save(results, os.path.join(out_dir, f"fsdp2-rank{rank}.pt"))


def _fsdp2_resume(out_dir, mesh, data, groups, rank, per_rank) -> dict:
    """2 steps, a torch.distributed.checkpoint save of model and optimizer (the FSDP2 checkpoint path), a fresh
    sharded model and optimizer loaded from it, 2 more steps: equal to 4 uninterrupted steps on one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.fsdp import fully_shard

    from parity import GLOBAL_BATCH, build_model

    def sharded():
        model = build_model(False)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = AdaTAM(groups(model, 0.01), lr=5e-4)
        install_sharded_stats(opt, model)
        return model, opt

    def train(model, opt, steps, whole=False):
        for step in steps:
            batch = data[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH]
            if not whole:
                batch = batch[rank * per_rank:(rank + 1) * per_rank]
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()

    ref = build_model(False)
    opt_ref = AdaTAM(groups(ref, 0.01), lr=5e-4)
    train(ref, opt_ref, range(STEPS), whole=True)
    model, opt = sharded()
    train(model, opt, range(STEPS // 2))
    ckpt = os.path.join(out_dir, "fsdp2-checkpoint")
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)
    model, opt = sharded()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    train(model, opt, range(STEPS // 2, STEPS))
    return {
        "param_err": max((p.full_tensor() - r).abs().max().item()
                          for p, r in zip(model.parameters(), ref.parameters())),
        "damping": opt.damping()["d"],
        "damping_ref": opt_ref.damping()["d"],
    }


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    dist.init_process_group("gloo")
    check(sys.argv[1])
    fsdp2_check(sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()
