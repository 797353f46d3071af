"""Non-finite training stops the run before the diverged state is saved.

The Trainer hides a NaN loss from its logs (``logging_nan_inf_filter`` replaces it with the running mean), so
the logged loss alone cannot be trusted. :func:`nonfinite_guard` watches three things:

* every optimizer step, the largest |gradient| of each trainable tensor (one fused ``_foreach_norm(inf)``,
  after clipping), folded into a device tensor holding the first step whose gradient was not finite: no host
  sync per step;
* at every step that logs, evaluates, saves or ends the run, that tensor is read (one sync, a step at which
  the Trainer syncs anyway), and the logged loss and gradient norm are checked too;
* before a checkpoint is written, and when training starts from a resumed checkpoint, the weights themselves.

A failure raises :class:`NonFiniteError` from inside the Trainer's loop, so nothing after it runs: no
evaluation, no checkpoint, no final save. With fp16 loss scaling an overflowing gradient is a skipped step,
not a failure, so gradients are not watched there (the loss and the weights still are). Under DeepSpeed the
gradients live in the engine, not on the parameters; the logged loss and gradient norm still are checked.
"""

from __future__ import annotations

import math

import torch

from tam_hf.finetune.errors import NonFiniteError

__all__ = ["nonfinite_guard", "nonfinite_parameters"]

_NONE = 2**62  # "no bad step yet" (kept as the minimum over steps)


def _all_reduce(value: torch.Tensor, op: str) -> torch.Tensor:
    """In a launched run, combine `value` over the ranks: with sharded parameters or gradients a NaN may sit in
    one rank's shard only, and every rank must stop at the same step."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=getattr(dist.ReduceOp, op))
    return value


def nonfinite_parameters(model, device=None) -> list[str]:
    """Names of the parameters (of this rank's shards) holding a NaN or an infinity; in a launched run every
    rank learns whether any rank found one ("on another rank" then). One host sync."""
    named = [(n, p.to_local() if hasattr(p, "to_local") else p) for n, p in model.named_parameters()]
    named = [(n, p.detach()) for n, p in named if p.numel() > 0]
    device = device or (named[0][1].device if named else "cpu")
    finite = torch.stack([p.isfinite().all().to(device) for _, p in named]) if named else torch.ones(1, dtype=torch.bool)
    anywhere = _all_reduce((~finite).any().to(device, torch.int32), "MAX")
    if not bool(anywhere):
        return []
    return [n for (n, _), ok in zip(named, finite.tolist()) if not ok] or ["(on another rank)"]


def nonfinite_guard(resumed_from: str | None = None):
    """The TrainerCallback; `resumed_from` names the checkpoint whose weights are checked when training starts.
    Its ``started`` attribute tells whether the Trainer got as far as training (checkpoint loading precedes)."""
    from transformers import TrainerCallback

    class NonFiniteGuard(TrainerCallback):
        started = False

        def __init__(self):
            self._first_bad = None
            self._watch_gradients = True

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.started = True
            self._watch_gradients = not args.fp16
            if self._watch_gradients:  # on every rank, so that each takes part in the check's all-reduce
                self._first_bad = torch.full((), _NONE, dtype=torch.int64, device=args.device)
            if resumed_from is not None:
                bad = nonfinite_parameters(model, args.device)
                if bad:
                    raise NonFiniteError(f"the checkpoint {resumed_from} holds non-finite weights ({len(bad)} "
                                         f"tensor(s), first {bad[0]}): it cannot be trained from")

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if self._first_bad is None or model is None:
                return
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
            grads = [g for g in grads if g.numel() > 0]
            if not grads:
                return
            device = grads[0].device
            # max |g| is finite exactly when every element is (NaN propagates), and cannot overflow
            largest = torch.stack([n.to(device, torch.float32) for n in torch._foreach_norm(grads, float("inf"))])
            step = torch.where(largest.isfinite().all(), _NONE, state.global_step + 1)
            self._first_bad = torch.minimum(self._first_bad, step.to(self._first_bad.device))

        def _check(self, args, state, control, model):
            if self._first_bad is not None:
                first = int(_all_reduce(self._first_bad.clone(), "MIN").item())
                if first != _NONE:
                    raise NonFiniteError(f"the gradient became non-finite (NaN or infinity) at step {first}",
                                         step=first)
            if control.should_save and model is not None:
                bad = nonfinite_parameters(model, args.device)
                if bad:
                    raise NonFiniteError(f"the weights became non-finite by step {state.global_step} ({len(bad)} "
                                         f"tensor(s), first {bad[0]})", step=state.global_step)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if control.should_log or control.should_save or control.should_evaluate or control.should_training_stop:
                self._check(args, state, control, model)

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            self._check(args, state, control, model)

        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "grad_norm") if self._watch_gradients else ("loss",):
                value = (logs or {}).get(key)
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    raise NonFiniteError(f"the logged {key.replace('_', ' ')} is {value} at step {state.global_step}",
                                         step=state.global_step)

        def check_weights(self, model, step: int) -> None:
            """The last check before the final model is saved."""
            bad = nonfinite_parameters(model)
            if bad:
                raise NonFiniteError(f"the weights are non-finite after step {step} ({len(bad)} tensor(s), "
                                     f"first {bad[0]})", step=step)

    return NonFiniteGuard()
