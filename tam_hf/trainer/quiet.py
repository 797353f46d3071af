"""Hold back third-party notices and progress bars that say nothing about the run, and keep them for ``--verbose``.

What is held, each named by its logger and the start of its message, or by the library's own switch:

* bitsandbytes, on CPUs with AVX512-BF16: importing it (transformers and peft do, on every Trainer run) fetches an
  optional 4-bit CPU kernel through the ``kernels`` package, which logs "Skipping publisher trust check for
  'kernels-community/quantization-bitsandbytes'" offline, and bitsandbytes "Failed to load CPU
  gemm_4bit_forward from kernels-community" when the fetch fails. Runs that do not quantize never use that
  kernel. The second is held from import on (this module is imported before anything imports bitsandbytes);
  a 4-bit (QLoRA) run, where the kernel matters, finds it in :data:`HELD`.
* DeepSpeed's "Setting accelerator to CPU" (printed by any import of deepspeed on a machine without a GPU).
* ``datasets`` progress bars (split generation and every ``map``/``filter`` of TRL's preparation: about ten
  for a 168-row file) and transformers' "Loading weights" / "Writing model shards" bars. The Trainer's own
  training bar and its logs are not touched, and neither are Hub download bars.

:func:`install` turns the rest on (``verbose=False``) or shows everything, the records held so far included
(``verbose=True``); :func:`held` lists what was held, for a closing line such as "3 notices held back".
"""

from __future__ import annotations

import importlib
import logging

__all__ = ["HELD", "NOTICE", "NOISE", "BARS", "install", "held"]

NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
# logger name -> the starts of the messages held from it
NOISE: dict[str, tuple[str, ...]] = {
    "bitsandbytes.backends.cpu.ops": (NOTICE,),
    "kernels._internals.hf_hub": ("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",),
    "DeepSpeed": ("Setting accelerator to CPU",),
}
# library -> (module, the function that switches its bars off, the one that switches them on). transformers'
# switch covers its own bars only (loading, saving shards): the Trainer's training bar uses tqdm directly.
BARS: dict[str, tuple[str, str, str]] = {
    "datasets": ("datasets.utils.tqdm", "disable_progress_bars", "enable_progress_bars"),
    "transformers": ("transformers.utils.logging", "disable_progress_bar", "enable_progress_bar"),
}
HELD: list[logging.LogRecord] = []
_BARS: list[str] = []  # progress-bar families switched off by install()


class _Hold(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(self.starts):
            HELD.append(record)
            return False
        return True


_FILTERS: dict[str, _Hold] = {}


def _hold(name: str) -> None:
    if name not in _FILTERS:
        _FILTERS[name] = _Hold(NOISE[name])
        logging.getLogger(name).addFilter(_FILTERS[name])


def install(verbose: bool = False) -> None:
    """Call once a command knows it will load and train, before the heavy imports: with ``verbose`` False hold
    every notice of :data:`NOISE` and switch off the progress bars of :data:`BARS`; with ``verbose`` True hold
    nothing, switch those bars back on, and replay what was held already."""
    if verbose:
        for name, hold in _FILTERS.items():
            logging.getLogger(name).removeFilter(hold)
        _FILTERS.clear()
        for family in _BARS:
            _switch(family, on=True)
        _BARS.clear()
        for record in HELD:
            logging.getLogger(record.name).handle(record)
        HELD.clear()
        return
    for name in NOISE:
        _hold(name)
    for family in BARS:
        if _switch(family, on=False) and family not in _BARS:
            _BARS.append(family)


def _switch(family: str, on: bool) -> bool:
    """Switch a library's own progress bars on or off; False when the library is not installed."""
    module, off, on_again = BARS[family]
    try:
        switch = getattr(importlib.import_module(module), on_again if on else off)
    except (ImportError, AttributeError):
        return False
    switch()
    return True


def held() -> list[str]:
    """What was held back so far, one line each: every held notice (logger: message), then each family of progress
    bars switched off."""
    lines = [f"{r.name}: {r.getMessage().splitlines()[0]}" for r in HELD]
    return lines + [f"{family} progress bars" for family in _BARS]


_hold("bitsandbytes.backends.cpu.ops")
