"""Distributed wiring: give TAM the whole-tensor statistics it needs under DeepSpeed ZeRO and FSDP2, and refuse
the configurations that would silently replace it.

- DDP (and one process): every rank holds whole tensors and the same averaged gradients: nothing to do.
- DeepSpeed ZeRO-1/2/3, FSDP2: :func:`install_sharded_stats` finds the TAM optimizer inside the wrappers and
  installs :class:`tam_hf.optim.sharded.ShardedStats` (one all-reduce per param group stepped).
- Refused before training, with the reason and the fix: a DeepSpeed config with an ``"optimizer"`` block
  (transformers would build DeepSpeed's optimizer instead of ours), ZeRO optimizer offload unless
  ``"zero_force_ds_cpu_optimizer": false`` (accelerate would swap ours for DeepSpeedCPUAdam), NVMe optimizer
  offload (untested), and FSDP version 1 (flat parameters that no longer map to tensors).

Use with a ``transformers.Trainer`` through :func:`attach` (checks now, installs at ``on_train_begin``, after
accelerate/DeepSpeed have wrapped the optimizer), or call :func:`install_sharded_stats` yourself after
``accelerator.prepare``.

Launching (configs in ``recipes/accelerate/``)::

    accelerate launch --config_file recipes/accelerate/zero2.yml -m tam_hf.cli RECIPE.yaml     # GPUs
    torchrun --nproc_per_node 2 -m tam_hf.cli RECIPE.yaml   # CPU/GPU; ZeRO via the recipe's
                                                            # distributed.deepspeed: recipes/accelerate/ds_zero2.json
"""

from __future__ import annotations

import json
from typing import Any, Optional

from transformers import TrainerCallback

from tam_hf.optim.sharded import ShardedStats, dtensor_sources, zero_sources
from tam_hf.optim.switch import SwitchOptimizer, find_switch
from tam_hf.optim.tam import TorqueOptimizer
from tam_hf.trainer.optim_args import split_switch, torque_spec

__all__ = [
    "DistributedConfigError",
    "check_deepspeed_config",
    "check_training_args",
    "optimizer_chain",
    "find_torque_optimizer",
    "install_sharded_stats",
    "TorqueStatsCallback",
    "uses_tam",
    "attach",
]


class DistributedConfigError(ValueError):
    """A distributed configuration under which TAM would not run, or would not run exactly."""


def _load_ds_config(config: Any) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return config
    if hasattr(config, "config"):  # HfDeepSpeedConfig / HfTrainerDeepSpeedConfig
        return config.config
    with open(config) as f:
        return json.load(f)


def check_deepspeed_config(config: Any) -> None:
    """Raise :class:`DistributedConfigError` for a DeepSpeed config (dict, path or HfDeepSpeedConfig) under which
    DeepSpeed or accelerate would replace the TAM optimizer, or under which its statistics are not exact."""
    cfg = _load_ds_config(config)
    errors = []
    if "optimizer" in cfg:
        errors.append(
            f'the DeepSpeed config has an "optimizer" block ({cfg["optimizer"].get("type", "?")}): transformers would '
            "build DeepSpeed's optimizer and silently ignore the TAM optimizer. Remove the block; TAM's "
            "hyperparameters come from the training arguments / recipe.")
    zero = cfg.get("zero_optimization", {}) or {}
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") or "none"
    if offload == "nvme":
        errors.append("ZeRO optimizer offload to NVMe is not supported with TAM (its per-tensor state has not been "
                      'checked through the swapper). Use "device": "cpu" or no offload.')
    elif offload != "none" and cfg.get("zero_force_ds_cpu_optimizer", True) is not False:
        errors.append(
            f'ZeRO optimizer offload ("device": "{offload}") without "zero_force_ds_cpu_optimizer": false: accelerate '
            "would silently replace the TAM optimizer by DeepSpeedCPUAdam. Add "
            '"zero_force_ds_cpu_optimizer": false at the top level of the DeepSpeed config (TAM then steps the '
            "offloaded fp32 partitions on the CPU), or drop the offload.")
    if errors:
        raise DistributedConfigError("DeepSpeed config is not usable with TAM:\n  - " + "\n  - ".join(errors))


def _launcher_plugins() -> tuple[Optional[dict], Optional[int]]:
    """The DeepSpeed config and FSDP version set by ``accelerate launch --config_file ...`` (they reach the
    Trainer through accelerate's state, not through ``TrainingArguments``); None where not initialised/used."""
    try:
        from accelerate.state import AcceleratorState
    except ImportError:  # pragma: no cover - accelerate is a dependency of transformers' Trainer
        return None, None
    if not AcceleratorState._shared_state:
        return None, None
    state = AcceleratorState()
    ds = getattr(state, "deepspeed_plugin", None)
    fsdp = getattr(state, "fsdp_plugin", None)
    return (getattr(ds, "deepspeed_config", None) if ds is not None else None,
            getattr(fsdp, "fsdp_version", None) if fsdp is not None else None)


def _check_fsdp_version(version: int) -> None:
    if int(version) != 2:
        raise DistributedConfigError(
            f"FSDP version {version} hands the optimizer flattened parameters whose tensors TAM cannot recover; "
            'use FSDP2 ("version": 2 in fsdp_config / fsdp_version: 2 in the accelerate config).')


def _refuse_unsharded(optimizer_cls, backend: str) -> None:
    """Optimizers whose state cannot be split into exact per-tensor fragments (8-bit blocks) refuse sharding."""
    if optimizer_cls is SwitchOptimizer:
        raise DistributedConfigError(
            f"an optimizer switch (optimizer.switch, --optim_args switch_*) cannot run under {backend}: the "
            "sharded wrapper rewrites the param groups of the optimizer it is given, which the two optimizers "
            "inside the switch would not see. Use DDP (several processes without DeepSpeed/FSDP), or no switch.")
    if optimizer_cls is not None and not getattr(optimizer_cls, "supports_sharded_statistics", True):
        raise DistributedConfigError(
            f"{optimizer_cls.__name__} cannot run under {backend}: its quantized state blocks would straddle the "
            "shards and its cosine would silently become a per-shard one. Use DDP (several processes without "
            "DeepSpeed/FSDP), or the 32-bit optimizer (adatamw / adatam) under ZeRO or FSDP2.")


def check_training_args(args) -> None:
    """Checks ``TrainingArguments`` and the launcher's accelerate state for configurations that would replace
    TAM or break its statistics. Raises :class:`DistributedConfigError`."""
    spec = torque_spec(getattr(args, "optim", None))
    cls = spec.cls if spec is not None else None
    if spec is not None and split_switch(getattr(args, "optim_args", None))[1]:
        cls = SwitchOptimizer
    if getattr(args, "deepspeed", None):
        _refuse_unsharded(cls, "DeepSpeed ZeRO")
        check_deepspeed_config(getattr(args, "hf_deepspeed_config", None) or args.deepspeed)
    if getattr(args, "fsdp", None):
        _refuse_unsharded(cls, "FSDP")
        _check_fsdp_version((getattr(args, "fsdp_config", None) or {}).get("version", 2))
    ds_config, fsdp_version = _launcher_plugins()
    if ds_config:
        _refuse_unsharded(cls, "DeepSpeed ZeRO")
        check_deepspeed_config(ds_config)
    if fsdp_version is not None:
        _refuse_unsharded(cls, "FSDP")
        _check_fsdp_version(fsdp_version)


def optimizer_chain(optimizer) -> list:
    """``optimizer`` and every optimizer it wraps, outermost first. accelerate's ``AcceleratedOptimizer`` and
    DeepSpeed's ZeRO optimizers keep the one they wrap in ``.optimizer``; the one place tam_hf unwraps them."""
    chain = []
    while optimizer is not None and len(chain) < 8 and not any(optimizer is o for o in chain):
        chain.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return chain


def find_torque_optimizer(optimizer):
    """The TAM optimizer inside accelerate / DeepSpeed wrappers. Returns ``(tam_optimizer, zero_optimizer_or_None)``;
    the first is None when no TAM optimizer is inside."""
    zero = None
    for layer in optimizer_chain(optimizer):
        if isinstance(layer, TorqueOptimizer):
            return layer, zero
        if hasattr(layer, "single_partition_of_fp32_groups") or hasattr(layer, "fp32_partitioned_groups_flat"):
            zero = layer
    return None, zero


def _param_names(model) -> dict[int, str]:
    if model is None:
        return {}
    inner = getattr(model, "module", model)  # DDP / DeepSpeed engine
    return {id(p): n for n, p in inner.named_parameters()}


def install_sharded_stats(optimizer, model=None) -> Optional[ShardedStats]:
    """Installs exact sharded statistics on the TAM optimizer inside ``optimizer`` (possibly wrapped by accelerate
    and DeepSpeed). Returns the installed :class:`ShardedStats`, or None where tensors are whole (one process, DDP)
    or the optimizer is not a TAM one. Idempotent."""
    tam, zero = find_torque_optimizer(optimizer)
    if tam is None:
        return None
    if isinstance(tam.stats_reducer, ShardedStats):
        return tam.stats_reducer
    names = _param_names(model)
    if zero is not None:
        sources = zero_sources(zero, names)
    else:
        sources = dtensor_sources(tam, names)
    if not sources:
        return None
    _refuse_unsharded(type(find_switch(optimizer) or tam), "DeepSpeed ZeRO" if zero is not None else "FSDP2")
    return ShardedStats(tam, sources)


class TorqueStatsCallback(TrainerCallback):
    """Checks the configuration when the Trainer is built and installs exact statistics when training begins.

    ``expect_tam``: fail at ``on_train_begin`` if no TAM optimizer is found (it was replaced). By default only
    runs whose ``args.optim`` names a TAM optimizer are checked, so the callback is harmless in
    ``transformers.trainer.DEFAULT_CALLBACKS`` for runs with other optimizers."""

    def __init__(self, expect_tam: bool = False):
        self.expect_tam = expect_tam
        self.sharded: Optional[ShardedStats] = None

    def on_init_end(self, args, state, control, **kwargs):
        if self.expect_tam or _names_tam(args):
            check_training_args(args)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # A run resumed after its switch (tam_hf.optim.switch) steps the second optimizer: TAM was not replaced.
        if ((self.expect_tam or _names_tam(args)) and find_torque_optimizer(optimizer)[0] is None
                and find_switch(optimizer) is None):
            inner = optimizer_chain(optimizer)[-1] if optimizer is not None else None
            raise DistributedConfigError(
                f"training was set up for a TAM optimizer but runs {type(inner).__name__}: the launcher or DeepSpeed "
                "replaced it (see tam_hf.trainer.distributed.check_deepspeed_config)")
        self.sharded = install_sharded_stats(optimizer, model)


def _names_tam(args) -> bool:
    return torque_spec(args.optim) is not None


def uses_tam(trainer) -> bool:
    """True when the trainer will train with a TAM optimizer: ``args.optim`` names one, a TAM optimizer was
    passed in ``optimizers=``, or ``optimizer_cls_and_kwargs`` names a TAM class."""
    if _names_tam(trainer.args) or find_torque_optimizer(trainer.optimizer)[0] is not None:
        return True
    cls_and_kwargs = getattr(trainer, "optimizer_cls_and_kwargs", None)
    return bool(cls_and_kwargs) and isinstance(cls_and_kwargs[0], type) and issubclass(cls_and_kwargs[0],
                                                                                       TorqueOptimizer)


def attach(trainer, force: bool = False) -> Optional[TorqueStatsCallback]:
    """The one call a Trainer subclass makes in ``__init__`` (after ``super().__init__``): when it trains with a
    TAM optimizer (``args.optim`` names one, a TAM instance was passed, or ``force`` for a subclass that builds
    one in ``create_optimizer``), validates the distributed configuration now and installs the statistics layer
    at ``on_train_begin``. Returns the callback (None when the trainer does not use TAM)."""
    if not (force or uses_tam(trainer)):
        return None
    check_training_args(trainer.args)
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TorqueStatsCallback):
            cb.expect_tam = True
            return cb
    cb = TorqueStatsCallback(expect_tam=True)
    trainer.add_callback(cb)
    return cb
