"""Resume only what ran: a checkpoint continues under the settings it was written with, or not at all.

Each checkpoint's completion marker records :func:`run_settings`: the optimizer (name, learning rate, every
hyperparameter: the state in ``optimizer.pt`` and the schedule in ``scheduler.pt`` belong to them), the model and
how it is fine-tuned, the training data (files by size and SHA-256) and the settings that fix the schedule and
the order of the batches. :func:`resume_problems` compares them with the recipe's before anything loads; a
difference is refused with both ways on. What may change on resume is everything else: ``max_steps`` or
``num_train_epochs`` (to train longer; the schedule follows them), logging, saving, evaluation. An
``optimizer.switch`` belongs to the optimizer's settings (which optimizer ``optimizer.pt`` holds depends on it):
resuming under another switch, or without it, is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tam_hf.finetune.outputs import checkpoint_record
from tam_hf.finetune.config.schema import Recipe

__all__ = ["run_settings", "resume_problems", "SCHEDULE_KEYS"]

# training: keys that fix the learning-rate schedule or which rows each step sees.
SCHEDULE_KEYS = ("lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio",
                 "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "data_seed",
                 "train_sampling_strategy", "group_by_length")
_DATA_KEYS = ("format", "dataset", "config_name", "train_split", "columns", "max_length", "completion_only_loss",
              "instruction_template", "target", "num_labels", "max_train_samples", "packing", "padding_free",
              "chat_template_path")


def _fingerprint(files) -> list[dict]:
    out = []
    for name in [files] if isinstance(files, str) else list(files or ()):
        path = Path(name)
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            out.append({"file": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest()})
        except OSError:
            out.append({"file": str(path), "bytes": None, "sha256": None})
    return out


def run_settings(recipe: Recipe) -> dict:
    """The settings a checkpoint belongs to, as plain JSON values."""
    data = recipe.data
    settings = {
        "task": recipe.task,
        "model": recipe.model.model_dump(),
        "finetune": recipe.finetune.model_dump(),
        "optimizer": recipe.optimizer.model_dump(),
        "data": {**{k: getattr(data, k) for k in _DATA_KEYS}, "train_file": _fingerprint(data.train_file)},
        "training": {k: recipe.training.get(k) for k in SCHEDULE_KEYS},
    }
    return json.loads(json.dumps(settings, default=str))


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def resume_problems(recipe: Recipe, checkpoint: Path) -> list[str]:
    """What differs between the recipe and the settings `checkpoint` was written with (empty: nothing, or the
    checkpoint carries no record of them: written by another tool or an older tam_hf)."""
    then = checkpoint_record(checkpoint).get("run")
    if not isinstance(then, dict):
        return []
    now, then = _flat(run_settings(recipe)), _flat(then)
    changed = [key for key in sorted(set(now) | set(then)) if now.get(key) != then.get(key)]
    files = [key for key in changed if key.startswith("data.train_file")]
    shown = [f"{key}: {then.get(key)!r} in the checkpoint, {now.get(key)!r} now"
             for key in changed if key not in files][:8]
    if files:
        shown.append("data.train_file: the training data's contents differ from the checkpoint's")
    return shown
