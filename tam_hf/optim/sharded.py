"""Exact per-tensor torque statistics when the optimizer only holds pieces of each tensor.

DeepSpeed ZeRO-1/2 hands the optimizer one flat fp32 slice per param group and rank, ZeRO-3 one flat slice per
sub-group, and FSDP2 gives it DTensors whose local shards are dim-0 slices. TAM's cosine must be taken over each
WHOLE logical tensor, so :class:`ShardedStats` does three things around every ``optimizer.step()``:

1. a step pre-hook replaces each sharded source (a flat partition, or a DTensor) in the param groups by its
   *fragments*: plain-tensor views of the local slice of one logical tensor each, with ``.grad`` views into the
   matching gradient, and state entries that are views into the source's own state (so checkpoints, DeepSpeed's
   optimizer-state mapping and DCP keep seeing state of the source's shape);
2. the optimizer's public ``stats_reducer`` hook (see :class:`~tam_hf.optim.tam.TorqueOptimizer`) receives the
   per-fragment partial sums (m.g, |m|^2, |g|^2) of every param group of the step in one tensor, scatter-adds them
   into one row per logical tensor, all-reduces that small float64 tensor ONCE over the data-parallel group and
   hands every fragment its tensor's total. Every fragment of a tensor therefore sees the same statistics, starts
   from ``s = 0`` and keeps the same ``s`` and damping as the whole tensor would;
3. a post-hook puts the sources back and drops the fragment views.

``cosine_scope="global"`` gets the group total in the first row and zeros elsewhere, so the optimizer's sum over
rows is the sum over the whole group on every rank. Whole-tensor runs (one process, DDP) install nothing.

Cost: one all-reduce of ``n_tensors x 3`` float64 per ``optimizer.step()``: the optimizer gathers the statistics
of all its param groups and calls the reducer once (FSDP2: one all-reduce per training step for every group).
DeepSpeed ZeRO-1/2/3 step the client optimizer once per (sub-)group, each call holding one group, so there a
training step pays one all-reduce per (sub-)group. (The reducer also takes one group's rows at a time, for a caller
that reduces group by group.) Plus, on the optimizer's side, a second pass over m and g: the statistics must be
complete before the update, so the single-pass fused kernel becomes a statistics pass and an update pass
(bench/sharded_stats.py).

Only the optimizer's public interface is used: :class:`~tam_hf.optim.tam.TorqueOptimizer`, its ``state_buffers``
and ``state_scalars``, ``stats_reducer``, and :data:`~tam_hf.optim.state_dicts.FRAGMENT_SCALAR_KEYS` for the
per-fragment vectors a flat partition's state keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from tam_hf.optim.state_dicts import FRAGMENT_SCALAR_KEYS
from tam_hf.optim.tam import TorqueOptimizer

_S, _STEP = FRAGMENT_SCALAR_KEYS["s"], FRAGMENT_SCALAR_KEYS["step"]

__all__ = ["Fragment", "ShardedSource", "ShardedStats", "zero_sources", "dtensor_sources"]


@dataclass(frozen=True)
class Fragment:
    """The slice ``flat[start:start + numel]`` of a source, holding part of logical tensor ``row``."""

    start: int
    numel: int
    row: int


@dataclass(eq=False)
class ShardedSource:
    """A tensor the optimizer is handed that holds pieces of ``len(names)`` logical tensors.

    ``kind="flat"``: a 1-D ZeRO partition; its state lives in ``optimizer.state[tensor]`` as full-size buffers
    plus ``tam_s`` / ``tam_step`` vectors (:data:`~tam_hf.optim.state_dicts.FRAGMENT_SCALAR_KEYS`) with one entry per
    fragment. ``kind="dtensor"``: one DTensor parameter
    (one logical tensor, ``row`` 0 of a group-wide numbering given by ``names``); state is DTensor-shaped.
    """

    tensor: Tensor
    kind: str
    fragments: list[Fragment]
    names: list[str]  # one per logical row; the row order is the same on every rank
    group: Optional[dist.ProcessGroup] = None
    row_offset: int = 0  # dtensor sources of one param group share one row numbering

    def __post_init__(self):
        if self.kind not in ("flat", "dtensor"):
            raise ValueError(f"Invalid source kind: {self.kind!r}")


@dataclass
class _Plan:
    rows: Tensor  # logical row of each fragment that has a gradient, in param order
    n_rows: int
    group: Optional[dist.ProcessGroup]
    scope: str


@dataclass
class _Swap:
    group: dict
    original: list
    fragments: list[Tensor] = field(default_factory=list)


class ShardedStats:
    """Installs fragment views and the one-all-reduce statistics reducer on a TAM/AdaTAM(W) optimizer.

    ``sources`` maps each sharded tensor the optimizer may find in a param group to its layout. Call
    :meth:`remove` to undo. ``allreduce_calls`` counts the all-reduces issued (one per ``optimizer.step()`` call,
    whatever the number of param groups).
    """

    def __init__(self, optimizer, sources: Sequence[ShardedSource]):
        if getattr(optimizer, "stats_reducer", None) is not None:
            raise RuntimeError("this optimizer already has a stats_reducer installed")
        if not isinstance(optimizer, TorqueOptimizer):
            raise TypeError(f"ShardedStats needs a TAM/AdaTAM/AdaTAMW optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.sources = {id(s.tensor): s for s in sources}
        self.allreduce_calls = 0
        self._plans: list[_Plan] = []
        self._swaps: list[_Swap] = []
        self._row_cache: dict = {}
        self._view_cache: dict = {}
        for src in sources:
            if src.kind == "flat":
                self._check_flat(src)
        optimizer.stats_reducer = self  # first: an optimizer that refuses sharded statistics raises here
        for src in sources:
            if src.kind == "flat":
                # State exists from the start, full-size: DeepSpeed links each parameter's view of it
                # (safe_get_full_optimizer_state, universal checkpoints) once, after the first step of group 0
                self._flat_state(src)
        self._handles = [
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._enter()),
            optimizer.register_step_post_hook(lambda opt, args, kwargs: self._exit()),
        ]

    # ------------------------------------------------------------------------------------------ lifecycle

    def remove(self) -> None:
        self._exit()
        for h in self._handles:
            h.remove()
        self.optimizer.stats_reducer = None

    @staticmethod
    def _check_flat(src: ShardedSource) -> None:
        end = 0
        for f in sorted(src.fragments, key=lambda f: f.start):
            if f.start < end or f.start + f.numel > src.tensor.numel():
                raise ValueError(f"overlapping or out-of-range fragment {f} in a flat partition of "
                                 f"{src.tensor.numel()} elements")
            end = f.start + f.numel

    # ------------------------------------------------------------------------------------------- the swap

    def _flat_state(self, src: ShardedSource) -> dict:
        """The source's own state: full-size buffers (zeros when new) and per-fragment s / step vectors."""
        opt, flat = self.optimizer, src.tensor
        st = opt.state[flat]
        for name in opt.state_buffers:
            if not (torch.is_tensor(st.get(name)) and st[name].shape == flat.shape):
                st[name] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        n = len(src.fragments)
        s_dtype = torch.promote_types(flat.dtype, torch.float32)
        if not (torch.is_tensor(st.get(_S)) and st[_S].shape == (n,)):
            st[_S] = torch.zeros(n, dtype=s_dtype, device=flat.device)
        has_step = torch.is_tensor(st.get(_STEP)) and st[_STEP].shape == (n,)
        if "step" in opt.state_scalars and not has_step:
            st[_STEP] = torch.zeros(n, dtype=torch.float32, device=flat.device)
        for stray in ("s", "step"):  # left by a step taken before installation (all-zero gradients)
            st.pop(stray, None)
        return st

    def _dtensor_state(self, p: Tensor) -> dict:
        opt = self.optimizer
        st = opt.state[p]
        if not st:
            for name in opt.state_buffers:
                st[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["s"] = torch.zeros((), dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)
            if "step" in opt.state_scalars:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        return st

    def _enter(self) -> None:
        self._exit()  # a step that raised never ran its post-hook
        opt = self.optimizer
        for group in opt.param_groups:
            srcs = [self.sources.get(id(p)) for p in group["params"]]
            if not any(srcs):
                continue
            if not all(srcs):
                raise RuntimeError("a param group mixes sharded and whole tensors; ShardedStats cannot tell "
                                   "which statistics to reduce")
            swap = _Swap(group, group["params"])
            rows: list[int] = []
            if srcs[0].kind == "dtensor":  # one row per parameter of the group, numbered alike on every rank
                names = srcs[0].names
                for src in srcs:
                    swap.fragments += self._dtensor_views(src)
                    rows.append(src.row_offset)
            else:  # flat partitions: each brings its own logical tensors
                names = []
                for src in srcs:
                    views, row_ids = self._flat_views(src)
                    swap.fragments += views
                    rows += [len(names) + r for r in row_ids]
                    names = names + src.names
            n_rows, pgroup = len(names), srcs[0].group
            if not swap.fragments:
                continue
            group["params"] = swap.fragments
            self._swaps.append(swap)
            with_grad = tuple(r for v, r in zip(swap.fragments, rows) if v.grad is not None)
            if with_grad:
                self._plans.append(_Plan(self._rows(with_grad, swap.fragments[0].device), n_rows, pgroup,
                                         group["cosine_scope"]))

    def _rows(self, rows: tuple, device) -> Tensor:
        """The row index tensor, built once per layout (no host-to-device copy on every step)."""
        key = (rows, str(device))
        if key not in self._row_cache:
            self._row_cache[key] = torch.tensor(rows, dtype=torch.long, device=device)
        return self._row_cache[key]

    def _flat_views(self, src: ShardedSource):
        """Fragment views of a flat partition with their state entries; the views are built once and reused
        while the partition and its state buffers stay where they are (only the gradient views are new)."""
        flat = src.tensor
        st = self._flat_state(src)
        buffers = [st[name] for name in self.optimizer.state_buffers] + [st[_S], st.get(_STEP)]
        key = (flat.data_ptr(), flat.numel(), tuple(b.data_ptr() for b in buffers if b is not None))
        cached = self._view_cache.get(id(flat))
        if cached is None or cached[0] != key:
            cached = (key, self._build_flat_views(src, st))
            self._view_cache[id(flat)] = cached
        views, states, frags = cached[1]
        grad = flat.grad.view(-1) if flat.grad is not None else None
        for v, fst, f in zip(views, states, frags):
            if grad is not None:
                v.grad = grad.narrow(0, f.start, f.numel)
            self.optimizer.state[v] = fst
        return views, [f.row for f in frags]

    def _build_flat_views(self, src: ShardedSource, st: dict):
        data = src.tensor.detach().view(-1)
        names = self.optimizer.state_buffers
        if not src.fragments:  # no element of any tensor here, yet this rank must join the all-reduce
            v = data.narrow(0, 0, 0)
            fst = {name: torch.zeros_like(v) for name in names}
            fst["s"] = torch.zeros((), dtype=st[_S].dtype, device=v.device)
            if _STEP in st:
                fst["step"] = torch.zeros((), dtype=torch.float32, device=v.device)
            return [v], [fst], [Fragment(0, 0, 0)]
        views, states = [], []
        for j, f in enumerate(src.fragments):
            views.append(data.narrow(0, f.start, f.numel))
            fst = {name: st[name].view(-1).narrow(0, f.start, f.numel) for name in names}
            fst["s"] = st[_S][j]
            if _STEP in st:
                fst["step"] = st[_STEP][j]
            states.append(fst)
        return views, states, list(src.fragments)

    def _dtensor_views(self, src: ShardedSource) -> list[Tensor]:
        p = src.tensor
        st = self._dtensor_state(p)
        v = p.to_local().detach().view(-1)
        if p.grad is not None:
            v.grad = p.grad.to_local().reshape(-1)
        fst = self.optimizer.state[v]
        for name in self.optimizer.state_buffers:
            fst[name] = st[name].to_local().view(-1)
        fst["s"] = st["s"]
        if "step" in st:
            fst["step"] = st["step"]
        return [v]

    def _exit(self) -> None:
        for swap in self._swaps:
            swap.group["params"] = swap.original
            for v in swap.fragments:
                self.optimizer.state.pop(v, None)
                v.grad = None
        self._swaps.clear()
        self._plans.clear()

    # ---------------------------------------------------------------------------------------- the reducer

    def __call__(self, stats: Tensor) -> Tensor:
        """Per-fragment partial sums -> each fragment's whole-tensor sums, with one all-reduce.

        Takes the rows of all the param groups of this step concatenated (what TAM/AdaTAM(W) pass: one all-reduce
        per ``step()``), or those of the next param group alone (a caller that reduces group by group)."""
        if not self._plans:
            raise RuntimeError("stats_reducer called outside a ShardedStats step (was the optimizer's param "
                               "group list replaced after installation?)")
        n_first, n_all = self._plans[0].rows.numel(), sum(p.rows.numel() for p in self._plans)
        if stats.shape[0] == n_first:
            plans = [self._plans.pop(0)]
        elif stats.shape[0] == n_all:
            plans, self._plans = self._plans, []
        else:
            raise RuntimeError(f"expected statistics for {n_first} fragments (one param group) or {n_all} (all), "
                               f"got {stats.shape[0]}")
        if len({id(p.group) for p in plans}) != 1:
            raise RuntimeError("param groups reduced together must share one process group")
        # one buffer for every group: rows of group k are offset by the logical tensors of the groups before it
        offsets, n_rows = [], 0
        for plan in plans:
            offsets.append(n_rows)
            n_rows += plan.n_rows
        rows = torch.cat([p.rows.to(stats.device) + off for p, off in zip(plans, offsets)])
        total = stats.new_zeros(n_rows, 3)
        total.index_add_(0, rows, stats)
        if plans[0].group is not None or dist.is_initialized():
            comm = _comm_device(plans[0].group, total.device)
            if comm == total.device:
                dist.all_reduce(total, group=plans[0].group)
            else:  # ZeRO-Offload on GPUs: CPU statistics, NCCL group
                on_comm = total.to(comm)
                dist.all_reduce(on_comm, group=plans[0].group)
                total.copy_(on_comm)
            self.allreduce_calls += 1
        out = total.index_select(0, rows)
        start = 0
        for plan, off in zip(plans, offsets):
            n = plan.rows.numel()
            if plan.scope == "global":  # the optimizer sums the group's rows: put the group total in its first
                out[start:start + n] = 0
                out[start] = total[off:off + plan.n_rows].sum(0)
            start += n
        return out

    # -------------------------------------------------------------------------------------------- readout

    @torch.no_grad()
    def local_damping(self) -> dict[str, list[float]]:
        """Damping ``d = (1 + s) / 2`` of every fragment this rank holds, by logical tensor name (a tensor split
        into several fragments here lists each). No collective; for logging and tests."""
        out: dict[str, list[float]] = {}
        for src in self.sources.values():
            if src.kind == "flat":
                st = self.optimizer.state.get(src.tensor, {})
                if _S not in st:
                    continue
                for f, s in zip(src.fragments, st[_S].tolist()):
                    out.setdefault(src.names[f.row], []).append((1.0 + s) / 2.0)
            else:
                st = self.optimizer.state.get(src.tensor, {})
                if "s" in st:
                    out.setdefault(src.names[0], []).append((1.0 + st["s"].item()) / 2.0)
        return out


    @torch.no_grad()
    def gathered_damping(self) -> dict[str, float]:
        """Damping of EVERY logical tensor, by name, on every rank: one all-reduce of (sum of s, count) per
        tensor. A collective: call it on all ranks at the same point (e.g. in ``on_log``)."""
        names: dict[str, int] = {}
        for src in self.sources.values():  # every rank lists every tensor of every source, in the same order
            for name in src.names:
                names.setdefault(name, len(names))
        if not names:
            return {}
        device = next(iter(self.sources.values())).tensor.device
        buf = torch.zeros(len(names), 2, dtype=torch.float64, device=device)
        for name, ds in self.local_damping().items():
            for d in ds:
                buf[names[name], 0] += 2.0 * d - 1.0  # back to s
                buf[names[name], 1] += 1.0
        group = next(iter(self.sources.values())).group
        if dist.is_initialized():
            comm = _comm_device(group, buf.device)
            on_comm = buf.to(comm)
            dist.all_reduce(on_comm, group=group)
            buf = on_comm.to(buf.device)
        s = (buf[:, 0] / buf[:, 1].clamp(min=1.0)).tolist()
        return {name: (1.0 + s[i]) / 2.0 for name, i in names.items() if buf[i, 1] > 0}

    def damping_summary(self, gather: bool = False) -> dict[str, float]:
        """Like the optimizers' ``damping_summary``. ``gather=False``: over the tensors this rank holds a piece of
        (no collective; ranks may differ). ``gather=True``: over all tensors, the same on every rank (one
        all-reduce; call on all ranks)."""
        if gather:
            values = list(self.gathered_damping().values())
        else:
            values = [v[0] for v in self.local_damping().values()]
        d = torch.tensor(values, dtype=torch.float64)
        if d.numel() == 0:
            return {}
        return {"mean": d.mean().item(), "min": d.min().item(), "max": d.max().item(),
                "frac_below_half": (d < 0.5).double().mean().item()}


def _comm_device(group, device: torch.device) -> torch.device:
    """Where a tensor must be to be all-reduced over ``group``: NCCL cannot reduce CPU tensors, and under
    ZeRO-Offload the optimizer (and so its statistics) runs on the CPU while the group is NCCL."""
    if device.type != "cpu":
        return device
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "cpu:" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return device


# ------------------------------------------------------------------------------------ discovery by backend


def zero_sources(zero_optimizer, names: Optional[dict[int, str]] = None) -> list[ShardedSource]:
    """Sources for a DeepSpeed ZeRO-1/2 (``DeepSpeedZeroOptimizer``) or ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``)
    optimizer wrapper. ``names`` maps ``id(param)`` to a display name (default ``"group{i}.{j}"``)."""
    names = names or {}
    sources = []
    if hasattr(zero_optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        for i, flat in enumerate(zero_optimizer.single_partition_of_fp32_groups):
            lps = zero_optimizer.bit16_groups[i]
            frags = []
            for row, lp in enumerate(lps):
                mapping = getattr(lp, "_hp_mapping", None)
                if mapping is None:
                    continue
                addr = mapping.get_hp_fragment_address()
                if addr.numel > 0:
                    frags.append(Fragment(int(addr.start), int(addr.numel), row))
            sources.append(ShardedSource(flat, "flat", frags, [names.get(id(p), f"group{i}.{j}") for j, p in
                                                              enumerate(lps)],
                                         group=zero_optimizer.real_dp_process_group[i]))
    elif hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
        for i, flat in enumerate(zero_optimizer.fp32_partitioned_groups_flat):
            lps = zero_optimizer.fp16_groups[i]
            pgroup = zero_optimizer.sub_group_process_groups[i]
            rank = dist.get_rank(group=pgroup)
            frags, offset = [], 0
            for row, lp in enumerate(lps):
                per_rank = lp.partition_numel()
                valid = max(0, min(per_rank, lp.ds_numel - rank * per_rank))  # the last ranks hold padding
                if valid > 0:
                    frags.append(Fragment(offset, valid, row))
                offset += per_rank
            if offset != flat.numel():
                raise RuntimeError(f"ZeRO-3 sub-group {i}: partitions add up to {offset} elements, the flat fp32 "
                                   f"partition has {flat.numel()}; unsupported DeepSpeed layout")
            sources.append(ShardedSource(flat, "flat", frags, [names.get(id(p), f"subgroup{i}.{j}") for j, p in
                                                              enumerate(lps)], group=pgroup))
    else:
        raise TypeError(f"not a DeepSpeed ZeRO optimizer: {type(zero_optimizer).__name__}")
    return sources


def dtensor_sources(optimizer, names: Optional[dict[int, str]] = None) -> list[ShardedSource]:
    """Sources for an optimizer whose param groups hold DTensors (FSDP2): every DTensor sharded on a 1-D mesh.
    Tensors of one param group get one row each, in group order. Replicated or multi-dimensional placements are
    refused (summing replicas would count them several times)."""
    from torch.distributed.tensor import DTensor, Shard

    names = names or {}
    sources = []
    for gi, group in enumerate(optimizer.param_groups):
        params = group["params"]
        dts = [p for p in params if isinstance(p, DTensor)]
        if not dts:
            continue
        if len(dts) != len(params):
            raise RuntimeError(f"param group {gi} mixes DTensor and plain parameters")
        group_names = [names.get(id(p), f"group{gi}.{j}") for j, p in enumerate(params)]
        pg = None
        for j, p in enumerate(params):
            if p.device_mesh.ndim != 1 or not isinstance(p.placements[0], Shard):
                raise NotImplementedError(
                    f"{group_names[j]}: placements {p.placements} on a {p.device_mesh.ndim}-D mesh; exact torque "
                    "statistics support parameters sharded on a 1-D mesh (FSDP2 without HSDP/TP)")
            this_pg = p.device_mesh.get_group()
            if pg is not None and this_pg is not pg:
                raise NotImplementedError(f"param group {gi} spans several device meshes")
            pg = this_pg
            sources.append(ShardedSource(p, "dtensor", [Fragment(0, p.to_local().numel(), 0)], group_names,
                                         group=pg, row_offset=j))
    return sources
