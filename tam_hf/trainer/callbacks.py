"""DampingCallback: TAM's damping statistics in the Trainer's logs, next to the loss.

The mean damping ``d`` says how much of each new gradient TAM lets into its momentum (1 = agrees with the
momentum, 0 = points against it, about 0.5 for noise); ``frac_below_half`` is the share of tensors whose
smoothed cosine is negative. They are read only when the Trainer logs (one small device-to-host copy).

Why ``on_log`` edits two dicts: ``Trainer.log`` appends a copy of the logs to ``state.log_history`` and then
hands the original dict to the callbacks in order. Placed before the reporting callbacks (TensorBoard, W&B,
the console printer), this callback adds its keys to that dict, so every reporter after it sees them, and
to the copy just appended, so they reach ``log_history`` and ``trainer_state.json``.
"""

from __future__ import annotations

from transformers import TrainerCallback

from tam_hf.trainer.distributed import find_torque_optimizer

__all__ = ["DampingCallback", "KEYS", "install"]

PREFIX = "damping/"
KEYS = tuple(PREFIX + k for k in ("mean", "frac_below_half", "min", "max"))


class DampingCallback(TrainerCallback):
    """Adds ``damping/mean``, ``damping/frac_below_half``, ``damping/min``, ``damping/max`` to training logs
    (not to evaluation or end-of-training summaries). Does nothing for optimizers other than TAM's."""

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if logs is None or "loss" not in logs:  # a training-step log; eval logs carry "eval_loss"
            return
        torque = find_torque_optimizer(optimizer)[0]
        summary = torque.damping_summary() if torque is not None else {}
        if not summary:
            return
        values = {key: summary[key[len(PREFIX):]] for key in KEYS}
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)


def install(callbacks: list, callback=DampingCallback) -> None:
    """Put ``callback`` (the class, in a list of classes, or an instance, in a CallbackHandler's list) right
    after the flow callback in ``callbacks``, in place, unless a DampingCallback is there already: the
    reporters that follow must see its keys."""
    if any(c is DampingCallback or isinstance(c, DampingCallback) for c in callbacks):
        return
    from transformers.trainer_callback import DefaultFlowCallback

    flow = [i for i, c in enumerate(callbacks) if c is DefaultFlowCallback or isinstance(c, DefaultFlowCallback)]
    callbacks.insert(flow[-1] + 1 if flow else 0, callback)
