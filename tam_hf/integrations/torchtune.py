"""torchtune: the optimizers are plain ``torch.optim`` classes, so a config names them directly::

    optimizer:
      _component_: tam_hf.AdaTAMW
      lr: 2.0e-4
      weight_decay: 0.01

and the damping statistics reach torchtune's metric logger (disk, TensorBoard, W&B...) by wrapping it::

    metric_logger:
      _component_: tam_hf.integrations.torchtune.DampingLogger
      logger:
        _component_: torchtune.training.metric_logging.DiskLogger
        log_dir: ${output_dir}/logs

Every ``log_dict`` the recipe makes (its loss/lr lines) then also carries ``damping/mean``, ``damping/min``,
``damping/max`` and ``damping/frac_below_half``, the keys the Trainer logs. No recipe is copied or changed: the
wrapper learns which TAM optimizers stepped from torch's global optimizer step hook, so it also sees the
per-parameter optimizers of ``optimizer_in_bwd: True`` (their statistics are pooled over all tensors). A recipe
of your own can call :func:`damping_metrics` on its optimizer(s) instead.

Example: ``recipes/integrations/torchtune_adatamw.yaml``. Checked with torchtune 0.6.1 by
``scripts/check_integrations.sh``. Imports torch and tam_hf's optimizers only (torchtune environments have no
transformers).
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from tam_hf.optim.tam import TorqueOptimizer

__all__ = ["DampingLogger", "damping_metrics", "HFTokenizer"]

PREFIX = "damping/"  # the Trainer telemetry's keys (tam_hf.trainer.callbacks.KEYS), so dashboards match
STATS = ("mean", "frac_below_half", "min", "max")


def damping_metrics(optimizers: Iterable[torch.optim.Optimizer]) -> dict[str, float]:
    """``damping/*`` for the TAM optimizers among ``optimizers``, pooled over all their tensors; empty before the
    first step or without a TAM optimizer."""
    torque = [o for o in optimizers if isinstance(o, TorqueOptimizer)]
    if len(torque) == 1:  # its own summary: exact under sharded statistics too
        summary = torque[0].damping_summary()
    else:
        d = torch.cat([o.damping()["d"] for o in torque]) if torque else torch.zeros(0)
        summary = {} if d.numel() == 0 else {"mean": d.mean().item(), "min": d.min().item(),
                                             "max": d.max().item(), "frac_below_half": (d < 0.5).double().mean().item()}
    return {PREFIX + k: summary[k] for k in STATS} if summary else {}


class DampingLogger:
    """A torchtune metric logger that adds ``damping/*`` to each ``log_dict`` of the logger it wraps; everything
    else is the wrapped logger's. ``logger``: a logger, or its config node (torchtune 0.6 does not instantiate
    nested ``_component_`` nodes, so this does)."""

    def __init__(self, logger):
        if isinstance(logger, Mapping) and "_component_" in logger:
            from omegaconf import OmegaConf
            from torchtune import config

            logger = config.instantiate(OmegaConf.create(dict(logger)))
        self._logger = logger
        self._stepped: weakref.WeakSet = weakref.WeakSet()
        self._hook = register_optimizer_step_post_hook(self._record)

    def _record(self, optimizer, args, kwargs) -> None:
        if isinstance(optimizer, TorqueOptimizer):
            self._stepped.add(optimizer)

    def log_dict(self, payload: dict, step: int) -> None:
        self._logger.log_dict({**payload, **damping_metrics(list(self._stepped))}, step)

    def close(self) -> None:
        self._hook.remove()
        self._logger.close()

    def __getattr__(self, name):  # log, log_config and anything a newer interface adds
        return getattr(self._logger, name)


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` as the tokenizer torchtune's text datasets call (``encode``/``decode``,
    ``pad_id``, ``max_seq_len``): enough to fine-tune a Hugging Face checkpoint on ``text_completion_dataset``
    (the tiny model of the example config). Uses the ``tokenizers`` package, which torchtune depends on."""

    def __init__(self, path: str, max_seq_len: Optional[int] = None):
        from tokenizers import Tokenizer

        folder = Path(path)
        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        self.bos_id = config.get("bos_token_id")
        self.eos_id = config.get("eos_token_id")
        self.pad_id = config.get("pad_token_id", self.eos_id)
        self.max_seq_len = max_seq_len

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True, **_ignored) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids + (
            [self.eos_id] if add_eos and self.eos_id is not None else [])

    def decode(self, token_ids: list[int], **_ignored) -> str:
        return self._tok.decode(token_ids)
