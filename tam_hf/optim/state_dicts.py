"""What a TAM optimizer's saved state must hold, and what to say when a loaded state dict does not fit: each
misfit is a ``ValueError`` naming the parameter and, where the keys give it away, which optimizer saved it."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

__all__ = ["FRAGMENT_SCALAR_KEYS", "check_state_dict", "check_state_entry"]

# A flat ZeRO partition (tam_hf.optim.sharded) holds pieces of many logical tensors: its state keeps the
# parameter-sized buffers whole and each scalar as a vector with one entry per fragment, under these keys.
FRAGMENT_SCALAR_KEYS = {"s": "tam_s", "step": "tam_step"}

# Key sets of other optimizers' per-parameter state, to say what a misfit state dict was saved by.
_KNOWN_STATES = (
    (frozenset({"exp_avg", "exp_avg_sq", "s", "step"}), "an AdaTAM/AdaTAMW state"),
    (frozenset({"momentum_buffer", "s"}), "a TAM state"),
    (frozenset({"exp_avg", "exp_avg_sq", "step"}), "an AdamW (or Adam) state"),
    (frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"}), "an AdamW (or Adam) state with amsgrad"),
    (frozenset({"momentum_buffer"}), "an SGD state"),
    (frozenset({"step", "sum"}), "an Adagrad state"),
)


def _describe_keys(found: set, expected: set) -> str:
    names = lambda keys: ", ".join(sorted(map(str, keys)))  # noqa: E731
    quoted = lambda keys: ", ".join(repr(k) for k in sorted(keys, key=str))  # noqa: E731
    missing, extra = expected - found, found - expected
    text = f"state has {names(found)}"
    if missing:
        text += f" but no {quoted(missing)}"
    if extra:
        text += f"{' and' if missing else ' with'} unexpected {quoted(extra)}"
    kind = next((k for keys, k in _KNOWN_STATES if keys == found), None)
    if kind is not None:
        text += f": it looks like {kind}"
    elif "exp_avg_q" in found and "exp_avg_q" not in expected:
        text += (": it looks like an 8-bit AdaTAM(W) state; convert it with "
                 "tam_hf.optim.tam8bit.dequantize_state_dict(state_dict) first")
    return f"{text} (expected {names(expected)})"


def check_state_dict(state_dict: dict, param_groups: list[dict],
                     check_entry: Callable[[int, int, Tensor, dict], None]) -> None:
    """Calls ``check_entry(group_index, index, p, entry)`` for every saved entry of a parameter that stepped."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, param_groups)):
        return  # torch's own load_state_dict says so, before changing anything
    saved_state = state_dict["state"]
    for gi, (saved_group, group) in enumerate(zip(saved_groups, param_groups)):
        for i, (pid, p) in enumerate(zip(saved_group["params"], group["params"])):
            entry = saved_state.get(pid)
            if entry:  # absent or empty: the tensor never stepped
                check_entry(gi, i, p, entry)


def check_state_entry(entry: dict, p: Tensor, buffers: tuple[str, ...], scalars: tuple[str, ...],
                      context: str) -> None:
    """Raises ``ValueError`` (``context``: what the message starts with) unless ``entry`` is a state for ``p``
    with these parameter-sized ``buffers`` and 0-dim ``scalars``: either whole-tensor (buffers shaped like p and
    floating point, 0-dim scalars, s floating point) or a flat ZeRO partition's (the same buffers, each scalar a
    vector with one entry per fragment)."""
    def fail(what: str):
        raise ValueError(f"{context}: {what}")

    found = set(entry)
    whole = {*buffers, *scalars}
    fragments = {*buffers, *(FRAGMENT_SCALAR_KEYS[k] for k in scalars)}
    if found not in (whole, fragments):
        fail(_describe_keys(found, fragments if FRAGMENT_SCALAR_KEYS["s"] in found else whole))
    for name in sorted(found, key=str):
        t = entry[name]
        if not isinstance(t, Tensor):
            fail(f"{name} is a {type(t).__name__}, expected a tensor")
        if t.is_complex() or t.is_sparse:
            fail(f"{name} is a {t.dtype} {t.layout} tensor, expected a dense real one")
    for name in buffers:
        t = entry[name]
        if not t.is_floating_point():
            fail(f"{name} is {t.dtype}, expected floating point (the parameter is {p.dtype})")
        if t.shape != p.shape:
            fail(f"{name} has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}")
    if found == whole:
        s = entry["s"]
        if s.dim() != 0 or not s.is_floating_point():
            fail(f"s must be a 0-dim floating-point tensor, found "
                 f"{'shape ' + str(tuple(s.shape)) if s.dim() else s.dtype}")
        if "step" in found and entry["step"].dim() != 0:
            fail(f"step must be a 0-dim tensor, found shape {tuple(entry['step'].shape)}")
        return
    s_key, step_key = FRAGMENT_SCALAR_KEYS["s"], FRAGMENT_SCALAR_KEYS["step"]
    s = entry[s_key]
    if s.dim() != 1 or not s.is_floating_point():
        fail(f"{s_key} must be a 1-dim floating-point tensor (one entry per fragment), found {s.dtype} of shape "
             f"{tuple(s.shape)}")
    if step_key in found and tuple(entry[step_key].shape) != tuple(s.shape):
        fail(f"{step_key} holds {entry[step_key].numel()} entries, {s_key} {s.numel()}")
