"""``tam_hf.trainer.register()``: make ``--optim tam|adatam|adatamw`` valid wherever transformers reads ``optim``.

transformers checks ``TrainingArguments.optim`` against the ``OptimizerNames`` enum three times: argparse
choices (built from the enum when ``HfArgumentParser`` is created), ``TrainingArguments.__post_init__``
(``OptimizerNames(value)``) and the handler table the Trainer dispatches on
(``transformers.trainer_optimizer._OPTIMIZER_HANDLERS``, present since transformers 5.2). None offers an
extension point, so ``register()`` is the single, explicit place where tam_hf touches transformers' globals:

1. adds ``TAM``, ``ADATAM`` and ``ADATAMW`` as genuine members of ``OptimizerNames`` (iteration, lookup by
   value, ``is`` identity and ``isinstance`` all behave as for built-in members);
2. maps them to a handler in the Trainer's table, which builds the optimizer from ``TrainingArguments``
   (see :mod:`tam_hf.trainer.optim_args`);
3. appends :class:`~tam_hf.callbacks.DampingCallback` to ``transformers.trainer.DEFAULT_CALLBACKS`` right
   after the flow callback. The handler only sees ``(args, model)``, never the Trainer, so the default
   callback list is the one place through which a plain ``Trainer`` gets the damping telemetry; the callback
   does nothing when the optimizer is not a TAM one.

It is idempotent and must run before a script creates its ``HfArgumentParser`` (argparse choices are fixed
then): call it at the top of your code, or run an unmodified script with ``python -m tam_hf.run``.

Saved ``training_args.bin``: the Trainer pickles ``TrainingArguments`` into every checkpoint. Our enum
members pickle as a call to :func:`restore_optim_name` instead of ``OptimizerNames("adatam")``. So, where
tam_hf is installed, ``torch.load(".../training_args.bin", weights_only=False)`` works without calling
``register()`` first (loading registers the names). Where tam_hf is not installed it fails with
``ModuleNotFoundError: No module named 'tam_hf'`` (installing tam_hf there fixes it), instead of transformers'
``adatam is not a valid OptimizerNames``. Nothing else in a checkpoint depends on tam_hf: the weights,
``optimizer.pt`` (plain tensors and dicts), ``scheduler.pt`` and ``trainer_state.json`` load anywhere, and
``TrainingArguments.to_dict()`` / ``to_json_string()`` store the optimizer as the plain string ``"adatam"``.
"""

from __future__ import annotations

from packaging.version import Version

from tam_hf.trainer.optim_args import OPTIMIZERS, optimizer_cls_and_kwargs

__all__ = ["register", "restore_optim_name", "SUPPORTED_TRANSFORMERS"]

SUPPORTED_TRANSFORMERS = (Version("5.2.0"), Version("6.0.0"))  # [low, high): the handler table exists


def check_transformers_version(version: str) -> None:
    """Raise a ``RuntimeError`` that names the supported range when ``version`` is outside it."""
    low, high = SUPPORTED_TRANSFORMERS
    if not (low <= Version(Version(version).base_version) < high):
        raise RuntimeError(
            f"tam_hf.trainer.register() supports transformers>={low},<{high} (found {version}): it registers "
            f"--optim names in the Trainer's optimizer handler table, which older releases do not have. "
            f"Install a supported version: pip install 'transformers>={low},<{high}'. "
            f"Or pass optimizer_cls_and_kwargs=(tam_hf.AdaTAM, {{...}}) to your Trainer."
        )


def _handler(ctx):
    """The Trainer's optimizer handler for our names (``ctx`` is transformers' ``OptimizerContext``)."""
    return optimizer_cls_and_kwargs(ctx.args)


def restore_optim_name(value: str):
    """Unpickling target for our ``OptimizerNames`` members (see the module docstring)."""
    register()
    from transformers.training_args import OptimizerNames

    return OptimizerNames(value)


def _add_member(enum_cls, name: str, value: str):
    """Add one member to a ``str``-based Enum after its creation; returns the existing one on repeat."""
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    member = enum_cls._member_type_.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    # Instance attribute, read by pickle before the class's: see "Saved training_args.bin" above.
    member.__reduce_ex__ = lambda protocol: (restore_optim_name, (value,))
    if hasattr(enum_cls, "_add_member_"):  # Python >= 3.13: class attribute and _member_map_
        enum_cls._add_member_(name, member)
    else:
        setattr(enum_cls, name, member)  # EnumType refuses reassigning members only, so set it first
        enum_cls._member_map_[name] = member
    enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[value] = member
    return member


def register() -> tuple[str, ...]:
    """Register ``tam``, ``adatam`` and ``adatamw`` with transformers (idempotent); returns the names.

    Raises ``RuntimeError`` on a transformers version outside :data:`SUPPORTED_TRANSFORMERS`."""
    import transformers

    check_transformers_version(transformers.__version__)
    from transformers import trainer as trainer_module
    from transformers import trainer_optimizer
    from transformers.training_args import OptimizerNames

    from tam_hf.trainer.callbacks import DampingCallback, install
    from tam_hf.trainer.distributed import TorqueStatsCallback

    for name in OPTIMIZERS:
        member = _add_member(OptimizerNames, name.upper(), name)
        trainer_optimizer._OPTIMIZER_HANDLERS[member] = _handler
    install(trainer_module.DEFAULT_CALLBACKS, DampingCallback)
    # A plain Trainer gets the distributed checks and exact sharded statistics too (inert for other optimizers).
    if TorqueStatsCallback not in trainer_module.DEFAULT_CALLBACKS:
        trainer_module.DEFAULT_CALLBACKS.append(TorqueStatsCallback)
    return tuple(OPTIMIZERS)
