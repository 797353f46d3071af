r"""AdaTAM and AdaTAMW with 8-bit states: the first and second moments stored blockwise-quantized with bitsandbytes.

The update is AdaTAM(W)'s, unchanged (see :mod:`tam_hf.optim.tam`). Only the storage of ``exp_avg`` (m) and
``exp_avg_sq`` (v) differs: each tensor with at least ``min_8bit_size`` elements keeps them as uint8 codes of
bitsandbytes' dynamic maps (signed for m, unsigned for v) with one float32 absmax per block of ``block_size``
elements. Each step, per tensor:

1. dequantize m and v to float32 (``bitsandbytes.functional.dequantize_blockwise``);
2. run AdaTAM(W)'s step on them through the public functional :func:`tam_hf.optim.tam.adatam`: the cosine is
   taken on the dequantized m, exactly the momentum this optimizer holds;
3. quantize the new m and v back (``quantize_blockwise``) into the same uint8 / absmax tensors.

``s`` (the smoothed cosine) and ``step`` stay float32 scalars; smaller tensors keep float32 m and v, as in
AdaTAM. Tensors are processed one at a time, so the float32 scratch is two copies of the largest tensor, never
of the model (``cosine_scope="global"`` is the exception: one cosine over a group needs the whole group's
momentum before any update, so it dequantizes the group at once).

Why the dynamic map suits AdaTAM's first moment although it is not an EMA (it grows to about
``d / (1 - beta1)`` times the gradient): quantization is relative to each block's absmax, so the scale of m
does not matter, only the spread of magnitudes inside a block, which the dynamic (exponent) map covers
down to ~5e-7 of the absmax. The error of one quantization is about half the widest gap of the map at most
(0.0070 of the block's absmax for the signed map, 0.0035 for the unsigned one), whatever the step
(``tests/test_optim_8bit.py`` checks it over a long run).

Block size 256: the blocksize bitsandbytes' own 8-bit blockwise optimizers use. Smaller blocks isolate
outliers (a large entry only coarsens its own 256 neighbours) at 4 bytes of absmax per 256 elements per state:
2.03 bytes per parameter for both moments, 0.51x the float32 parameter bytes (2048 would give 0.50x with a
coarser map for every block that holds an outlier).

State per tensor: quantized ones ``exp_avg_q`` / ``exp_avg_sq_q`` (uint8, the parameter's shape) and
``exp_avg_absmax`` / ``exp_avg_sq_absmax`` (float32, one per block); small ones ``exp_avg`` / ``exp_avg_sq``
(float32). Both have ``s`` and ``step``. The names differ from AdaTAM's on purpose: a reader that expects a
float ``exp_avg`` never receives codes. :meth:`AdaTAM8bit.load_state_dict` takes a 32-bit AdaTAM(W) state
(quantized on load); :func:`dequantize_state_dict` turns an 8-bit one into what AdaTAM(W) loads.

Distributed: DDP only (every rank holds whole tensors; the step is deterministic, so replicas stay
bit-identical). DeepSpeed ZeRO and FSDP2 hand the optimizer shards: the cosine would silently be taken per
shard, so both are refused (``supports_sharded_statistics = False``).

bitsandbytes is imported when an optimizer is built, not with this module (the registry lists these
optimizers on machines without it).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tam_hf.optim.hyperparams import (
    ADATAM8BIT_ARGS, ADATAMW8BIT_ARGS, BITSANDBYTES_INSTALL, check_block_size,
)
from tam_hf.optim.tam import AdaTAM, adatam

__all__ = ["AdaTAM8bit", "AdaTAMW8bit", "dequantize_state_dict", "SUPPORTED_DEVICES", "SUPPORTED_DTYPES"]

SUPPORTED_DEVICES = ("cpu", "cuda", "xpu", "mps")  # where bitsandbytes has blockwise-quantization kernels
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what its quantization takes

# (quantized codes, absmax, signed map) per moment
_QUANTIZED = {"exp_avg": ("exp_avg_q", "exp_avg_absmax", True),
              "exp_avg_sq": ("exp_avg_sq_q", "exp_avg_sq_absmax", False)}
_ALL_BUFFERS = tuple(_QUANTIZED) + tuple(k for q, a, _ in _QUANTIZED.values() for k in (q, a))

_SHARDED = ("needs whole tensors on every rank: DeepSpeed ZeRO and FSDP2 hand it shards, and its cosine would "
            "silently be taken per shard. Use it with DDP (or one process), or train with adatamw / adatam "
            "(32-bit, exact sharded statistics) under ZeRO or FSDP2")


def _bnb_functional():
    try:
        import bitsandbytes.functional as F
    except ImportError as exc:
        raise ImportError(f"the 8-bit AdaTAM optimizers need bitsandbytes: {BITSANDBYTES_INSTALL} ({exc})") from exc
    return F


class _Codebooks:
    """bitsandbytes' dynamic maps (signed for m, unsigned for v), built once and kept per device."""

    def __init__(self):
        self._maps: dict = {}

    def get(self, signed: bool, device: torch.device) -> Tensor:
        key = (signed, str(device))
        if key not in self._maps:
            self._maps[key] = _bnb_functional().create_dynamic_map(signed=signed).to(device)
        return self._maps[key]


_CODEBOOKS = _Codebooks()
_WORKING_DEVICES: set = set()  # devices where a quantization was tried and worked


def _n_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def _quantize(x: Tensor, signed: bool, block_size: int, codes: Optional[Tensor] = None,
              absmax: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """float32 ``x`` -> (uint8 codes of x's shape, float32 absmax per block); written into ``codes``/``absmax``
    when given."""
    F = _bnb_functional()
    q, qs = F.quantize_blockwise(x, code=_CODEBOOKS.get(signed, x.device), blocksize=block_size, out=codes,
                                 absmax=absmax)
    return q, qs.absmax


def _dequantize(codes: Tensor, absmax: Tensor, signed: bool, block_size: int) -> Tensor:
    F = _bnb_functional()
    return F.dequantize_blockwise(codes, absmax=absmax, code=_CODEBOOKS.get(signed, codes.device),
                                  blocksize=block_size)


def _is_dtensor(p: Tensor) -> bool:
    return type(p).__name__ == "DTensor" or hasattr(p, "device_mesh")


class AdaTAM8bit(AdaTAM):
    r"""AdaTAM with 8-bit moments (bitsandbytes blockwise quantization); see the module docstring.

    Same update and arguments as :class:`~tam_hf.optim.tam.AdaTAM`, plus:

    Args:
        min_8bit_size: tensors with fewer elements keep float32 moments (default 4096, as bitsandbytes).
        block_size: elements per quantization block, one float32 absmax each (default 256, as bitsandbytes'
            8-bit blockwise optimizers); one of 64, 128, 256, 512, 1024, 2048, 4096.

    Parameters must be float32, float16 or bfloat16 on CPU, CUDA, XPU or MPS (where bitsandbytes quantizes).
    Under DeepSpeed ZeRO or FSDP2 it refuses to run (see ``supports_sharded_statistics``).
    """

    supports_sharded_statistics = False  # read by the trainer layer's distributed checks

    @ADATAM8BIT_ARGS.init
    def __init__(self, min_8bit_size: int, block_size: int, **kwargs):
        _bnb_functional()  # an installed but broken bitsandbytes fails now too, not at the first step
        self._constructing = (min_8bit_size, block_size)  # add_param_group runs inside super().__init__
        self._known_params: set[int] = set()  # what a step may find; DeepSpeed swaps in partitions
        super().__init__(**kwargs)
        del self._constructing
        self.defaults.update(min_8bit_size=min_8bit_size, block_size=block_size)  # for later add_param_group

    # ------------------------------------------------------------------------------------ construction

    def add_param_group(self, param_group: dict) -> None:
        """As AdaTAM's, and refuses (naming the parameter; the group is not added) what bitsandbytes cannot
        quantize and sharded tensors."""
        # inside super().__init__ the defaults do not hold our two keys yet
        min_size, block = getattr(self, "_constructing", None) or (self.defaults["min_8bit_size"],
                                                                     self.defaults["block_size"])
        param_group.setdefault("min_8bit_size", min_size)
        param_group.setdefault("block_size", block)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_block_size(group["block_size"])
            for i, p in enumerate(group["params"]):
                self._check_param(len(self.param_groups) - 1, i, p, group)
        except Exception:
            self.param_groups.pop()
            raise
        self._known_params.update(id(p) for p in group["params"])

    def _check_param(self, group_index: int, index: int, p: Tensor, group: dict) -> None:
        name, where = type(self).__name__, _where(group_index, index, p, group)
        if _is_dtensor(p):
            raise ValueError(f"{name} {_SHARDED} (got a DTensor: {where})")
        if p.device.type not in SUPPORTED_DEVICES:
            raise ValueError(f"{name} supports parameters on {', '.join(SUPPORTED_DEVICES)} (where bitsandbytes "
                             f"quantizes), got {p.device} for {where}; use AdaTAMW there")
        if p.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} supports {', '.join(str(d).removeprefix('torch.') for d in SUPPORTED_DTYPES)} "
                             f"parameters (bitsandbytes' blockwise quantization), got {p.dtype} for {where}; "
                             "use AdaTAMW for it")
        if p.device not in _WORKING_DEVICES:  # this bitsandbytes build may lack kernels for it (CPU-only wheel)
            try:
                _quantize(torch.zeros(group["block_size"], device=p.device), True, group["block_size"])
            except (RuntimeError, NotImplementedError) as exc:
                raise ValueError(f"bitsandbytes cannot quantize on {p.device} here ({exc}); {name} supports "
                                 f"{', '.join(SUPPORTED_DEVICES)} where bitsandbytes has kernels") from exc
            _WORKING_DEVICES.add(p.device)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # groups loaded from a 32-bit AdaTAM(W) state dict lack them
            group.setdefault("min_8bit_size", self.defaults.get("min_8bit_size", 4096))
            group.setdefault("block_size", self.defaults.get("block_size", 256))
        # a copy or unpickled optimizer has new parameter objects (torch pickles state and groups only)
        self._known_params = {id(p) for g in self.param_groups for p in g["params"]}

    # ------------------------------------------------------------------------------------- distributed

    @property
    def stats_reducer(self):
        return self.__dict__.get("_stats_reducer")

    @stats_reducer.setter
    def stats_reducer(self, reducer) -> None:
        # The distributed wiring installs a reducer under ZeRO / FSDP2: refuse there, at train begin.
        if reducer is not None:
            raise RuntimeError(f"{type(self).__name__} {_SHARDED}")
        self.__dict__["_stats_reducer"] = None

    # ------------------------------------------------------------------------------------------- state

    def _new_state(self, group: dict, p: Tensor, state: dict) -> None:
        if p.numel() >= group["min_8bit_size"]:
            zeros = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            for codes, absmax, signed in _QUANTIZED.values():
                state[codes], state[absmax] = _quantize(zeros, signed, group["block_size"])
        else:
            for name in _QUANTIZED:
                state[name] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        state["s"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)

    # -------------------------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._evaluate_closure(closure)
        for gi, group in enumerate(self.param_groups):
            self._step_group(gi, group)
        return loss

    def _step_group(self, group_index: int, group: dict) -> None:
        active = []
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if id(p) not in self._known_params or _is_dtensor(p):
                raise RuntimeError(f"{type(self).__name__} {_SHARDED} (its parameters were replaced after "
                                   f"construction: {_where(group_index, i, p, group)})")
            if p.grad.layout is not torch.strided:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients: "
                                   f"{_where(group_index, i, p, group)}")
            active.append(p)
        if not active:
            return
        group_s = None
        if group["cosine_scope"] == "global":
            group_s = next((self.state[p]["s"] for p in group["params"] if "s" in self.state.get(p, ())), None)
        for p in active:
            state = self.state[p]
            if not state:  # lazily: FSDP2 and DeepSpeed swap parameters after construction
                self._new_state(group, p, state)
                if group_s is not None:  # global scope: a newcomer joins the group's running average
                    state["s"].copy_(group_s)
        torch._foreach_add_([self.state[p]["step"] for p in active], 1)
        beta1, beta2 = group["betas"]
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, decay_rate=group["decay_rate"],
                     damping_eps=group["damping_eps"], eps=group["eps"], weight_decay=group["weight_decay"],
                     decoupled_weight_decay=group["decoupled_weight_decay"], maximize=group["maximize"],
                     cosine_scope=group["cosine_scope"], fixed_damping=group["fixed_damping"],
                     bias_correction=group["bias_correction"], foreach=group["foreach"], fused=group["fused"])

        def run(params: list[Tensor], ms: list[Tensor], vs: list[Tensor]) -> None:
            # AdaTAM's own step on float32 moments; it picks the code path as the class does
            counts = [self.state[p]["step"].item() for p in params] if group["bias_correction"] else None
            adatam(params, [p.grad for p in params], ms, vs, [self.state[p]["s"] for p in params], steps=counts,
                   **hyper)

        quantized = [p for p in active if "exp_avg_q" in self.state[p]]
        plain = [p for p in active if "exp_avg_q" not in self.state[p]]
        if group["cosine_scope"] == "global":  # one cosine over the group: every momentum before any update
            moments = [self._load(group, p) for p in quantized]
            run(quantized + plain, [m for m, _ in moments] + [self.state[p]["exp_avg"] for p in plain],
                [v for _, v in moments] + [self.state[p]["exp_avg_sq"] for p in plain])
            for p, (m, v) in zip(quantized, moments):
                self._store(group, p, m, v)
            s = self.state[active[0]]["s"]
            for p in group["params"]:  # s belongs to the group: tensors without a gradient follow it
                st = self.state.get(p)
                if st and "s" in st and st["s"] is not s:
                    st["s"].copy_(s)
            return
        if plain:
            run(plain, [self.state[p]["exp_avg"] for p in plain], [self.state[p]["exp_avg_sq"] for p in plain])
        for p in quantized:  # one tensor at a time: the float32 scratch is never bigger than one tensor
            m, v = self._load(group, p)
            run([p], [m], [v])
            self._store(group, p, m, v)

    def _load(self, group: dict, p: Tensor) -> tuple[Tensor, Tensor]:
        st = self.state[p]
        return tuple(_dequantize(st[codes], st[absmax], signed, group["block_size"])
                     for codes, absmax, signed in _QUANTIZED.values())

    def _store(self, group: dict, p: Tensor, m: Tensor, v: Tensor) -> None:
        st = self.state[p]
        for x, (codes, absmax, signed) in zip((m, v), _QUANTIZED.values()):
            _quantize(x, signed, group["block_size"], codes=st[codes], absmax=st[absmax])

    # ----------------------------------------------------------------------------------- state dicts

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads an 8-bit state (codes and absmax stay uint8 / float32, bit for bit) or a 32-bit AdaTAM(W) one
        (quantized here). A state that does not fit the parameters raises ``ValueError`` naming the parameter,
        before anything changes. The block size and ``min_8bit_size`` come from the saved param groups when they
        hold them (as every hyperparameter does in torch), else they stay this optimizer's."""
        saved_groups = state_dict["param_groups"]
        layouts = [(sg.get("block_size", g["block_size"]), sg.get("min_8bit_size", g["min_8bit_size"]))
                   for g, sg in zip(self.param_groups, saved_groups)]
        self._loading_layouts = layouts  # read by _check_state_entry, which the base class calls first
        try:
            super().load_state_dict(state_dict)  # checks, then torch casts every state tensor to the param's dtype
        finally:
            del self._loading_layouts
        for group, (block, min_size) in zip(self.param_groups, layouts):
            group["block_size"], group["min_8bit_size"] = block, min_size
        for group, saved_group in zip(self.param_groups, saved_groups):
            for pid, p in zip(saved_group["params"], group["params"]):
                saved = state_dict["state"].get(pid)
                if saved:
                    self._restore(group, p, saved)

    def _restore(self, group: dict, p: Tensor, saved: dict) -> None:
        """Rebuilds p's moments from the saved tensors (not torch's casts) in this group's layout."""
        st, block = self.state[p], group["block_size"]
        quantize = p.numel() >= group["min_8bit_size"]
        for name in _ALL_BUFFERS:
            st.pop(name, None)
        for name, (codes, absmax, signed) in _QUANTIZED.items():
            if codes in saved:
                q = saved[codes].detach().to(device=p.device, dtype=torch.uint8).clone()
                scale = saved[absmax].detach().to(device=p.device, dtype=torch.float32).clone()
                if quantize:
                    st[codes], st[absmax] = q, scale
                else:  # 8-bit saved, kept 32-bit here (a larger min_8bit_size)
                    st[name] = _dequantize(q, scale, signed, block)
            else:
                x = saved[name].detach().to(device=p.device, dtype=torch.float32).clone()
                if quantize:
                    st[codes], st[absmax] = _quantize(x, signed, block)
                else:
                    st[name] = x
        st["step"] = saved["step"].detach().to(device=p.device, dtype=torch.float32).clone()

    def _check_state_entry(self, group_index: int, index: int, p: Tensor, entry: dict) -> None:
        """Accepts AdaTAM(W)'s 32-bit layout (checked by AdaTAM) or the 8-bit one; see the module docstring."""
        if not any(codes in entry for codes, _, _ in _QUANTIZED.values()):
            return super()._check_state_entry(group_index, index, p, entry)
        group = self.param_groups[group_index]
        block = getattr(self, "_loading_layouts", None)
        block = block[group_index][0] if block else group["block_size"]

        def fail(what: str) -> None:
            raise ValueError(f"{type(self).__name__}.load_state_dict: the saved state does not fit "
                             f"{_where(group_index, index, p, group)}: {what} (a state dict saved for another "
                             "model?)")

        expected = {*(k for codes, absmax, _ in _QUANTIZED.values() for k in (codes, absmax)), "s", "step"}
        if set(entry) != expected:
            fail(f"it holds {', '.join(sorted(map(str, entry)))}; an 8-bit AdaTAM(W) state holds "
                 f"{', '.join(sorted(expected))}")
        for codes, absmax, _ in _QUANTIZED.values():
            q, scale = entry[codes], entry[absmax]
            if not isinstance(q, Tensor) or q.dtype != torch.uint8 or tuple(q.shape) != tuple(p.shape):
                fail(f"{codes} is {_tensor_text(q)}, expected uint8 of the parameter's shape {tuple(p.shape)}")
            if not isinstance(scale, Tensor) or not scale.is_floating_point() or \
                    scale.numel() != _n_blocks(p.numel(), block):
                fail(f"{absmax} is {_tensor_text(scale)}, expected {_n_blocks(p.numel(), block)} floats (one per "
                     f"block of {block})")
        for name in ("s", "step"):
            if not isinstance(entry[name], Tensor) or entry[name].dim() != 0:
                fail(f"{name} is {_tensor_text(entry[name])}, expected a 0-dim tensor")


def _tensor_text(t) -> str:
    return f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, Tensor) else f"a {type(t).__name__}"


def _where(group_index: int, index: int, p: Tensor, group: dict) -> str:
    names = group.get("param_names")
    name = f" {names[index]!r}" if names and index < len(names) else ""
    return f"param group {group_index}, parameter {index}{name} (shape {tuple(p.shape)}, {p.dtype})"


class AdaTAMW8bit(AdaTAM8bit):
    r"""AdaTAMW (decoupled weight decay, ``weight_decay`` default 0.01) with 8-bit moments; same arguments as
    :class:`AdaTAM8bit` less ``decoupled_weight_decay``."""

    @ADATAMW8BIT_ARGS.init
    def __init__(self, **kwargs):
        super().__init__(decoupled_weight_decay=True, **kwargs)


def dequantize_state_dict(state_dict: dict) -> dict:
    """An :class:`AdaTAM8bit` / :class:`AdaTAMW8bit` state dict as the 32-bit AdaTAM / AdaTAMW load it (float32
    ``exp_avg`` / ``exp_avg_sq``), so a run can switch back. The input is not modified."""
    groups = [dict(g) for g in state_dict["param_groups"]]
    block_of = {pid: g.get("block_size", 256) for g in groups for pid in g["params"]}
    for g in groups:
        g.pop("min_8bit_size", None)
        g.pop("block_size", None)
    state = {}
    for pid, saved in state_dict["state"].items():
        entry = {k: v for k, v in saved.items() if k not in _ALL_BUFFERS}
        for name, (codes, absmax, signed) in _QUANTIZED.items():
            if codes in saved:
                entry[name] = _dequantize(saved[codes], saved[absmax].float(), signed, block_of[pid])
            elif name in saved:
                entry[name] = saved[name]
        state[pid] = entry
    return {"state": state, "param_groups": groups}

