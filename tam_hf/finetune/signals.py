"""Stopping a run on a signal, in every phase, at a point where what is on disk is consistent.

The first SIGINT (Ctrl-C), SIGTERM (a scheduler's preemption) or SIGHUP (a closed terminal or ssh session) only
asks the run to stop: during training the current step finishes and a checkpoint is saved; in any other phase
(loading, the final save, evaluation, lm-eval, the upload) the phase in progress finishes, since cutting a
save short would leave a half-written model. The run then writes ``summary.json`` with ``status:
interrupted`` and exits with 128 + the signal's number. A second signal aborts at once (``KeyboardInterrupt``);
the run then removes what it was half-way through writing.

In a launched run the ranks agree on the training step to stop at (a one-element all-reduce per step), since a
signal reaches each process at a slightly different point of its step.
"""

from __future__ import annotations

import signal
import sys
import threading

__all__ = ["GracefulStop", "SIGNALS"]

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

# What finishing "the phase in progress" means, for the message printed at the first signal.
_AFTER = {"train": "saving a checkpoint after this step, then stopping",
          "build": "stopping once loading has finished (nothing is trained or written)"}


class GracefulStop:
    """The signal handlers of one run (installed for the ``with`` block; the main thread only). ``phase`` is
    set by the run as it moves on; ``requested`` and ``signal_name`` say whether and how a stop was asked."""

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self.phase = "plan"
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process stopped by it."""
        return 128 + int(getattr(signal, self.signal_name or "SIGINT"))

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        what = "Ctrl-C" if signum == signal.SIGINT else self.signal_name
        again = "press Ctrl-C again" if signum == signal.SIGINT else f"send {self.signal_name} again"
        after = _AFTER.get(self.phase, f"finishing the {self.phase} step in progress, then stopping")
        print(f"\n{what}: {after} ({again} to abort at once)", file=sys.stderr, flush=True)

    def callback(self):
        """The TrainerCallback that ends training at the step a stop was asked (saving a checkpoint there)."""
        from transformers import TrainerCallback

        stop = self

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                import torch
                import torch.distributed as dist

                if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                    flag = torch.tensor([1.0 if stop.requested else 0.0], device=args.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    if flag.item() > 0 and not stop.requested:
                        stop.requested, stop.signal_name = True, stop.signal_name or "SIGTERM"
                if stop.requested:
                    control.should_save = True
                    control.should_training_stop = True

        return _Stop()
