"""``register()`` / ``unregister()``: the single, explicit place where tam_hf changes transformers' globals, so that
``--optim`` may name every TAM optimizer of the registry (``tam``, ``adatam``, ``adatamw`` and any added later).

transformers checks ``TrainingArguments.optim`` against the ``OptimizerNames`` enum three times: argparse choices
(built from the enum when ``HfArgumentParser`` is created), ``TrainingArguments.__post_init__``
(``OptimizerNames(value)``) and the handler table the Trainer dispatches on
(``transformers.trainer_optimizer._OPTIMIZER_HANDLERS``, present since transformers 5.2). None offers an extension
point. ``register()`` makes exactly these changes, and ``unregister()`` undoes exactly these:

1. ``transformers.training_args.OptimizerNames``: one genuine member per TAM entry of the registry (``ADATAM =
   "adatam"``), entered in ``_member_map_``, ``_value2member_map_``, ``_member_names_`` and as a class attribute
   (iteration, lookup by value or name, ``is`` identity and ``isinstance`` behave as for built-in members). A
   member pickles as a call to :func:`restore_optim_name` (see "Saved training_args.bin" below).
2. ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS``: one entry per member added, a handler that builds the
   optimizer from ``TrainingArguments`` (:func:`tam_hf.trainer.optim_args.optimizer_cls_and_kwargs`).
3. ``transformers.training_args.TrainingArguments.__post_init__``: wrapped so that, after the original, a TAM
   ``--optim`` has its ``--optim_args`` checked (:func:`~tam_hf.trainer.optim_args.check_optim_args`). A typo
   then fails when the arguments are parsed, before any model is loaded; subclasses (TRL's ``SFTConfig``...) call
   it through ``super().__post_init__()``. Other ``--optim`` values are untouched.
4. ``transformers.trainer.DEFAULT_CALLBACKS``: two callbacks, so that a plain ``Trainer`` gets what
   ``TAMTrainer`` adds (the handler sees only ``(args, model)``, never the Trainer, so the default list is the
   one way in). Both do nothing when the optimizer is not a TAM one.

   * :class:`~tam_hf.trainer.callbacks.DampingCallback`, inserted right after ``DefaultFlowCallback`` so that
     the reporters after it see its ``damping/*`` keys;
   * :class:`~tam_hf.trainer.distributed.TorqueStatsCallback`, appended: the DeepSpeed/FSDP checks and the exact
     sharded statistics.

Nothing else is touched. ``register()`` is idempotent, picks up registry entries added since its last call, and
must run before a script creates its ``HfArgumentParser`` (argparse choices are fixed then, and a parser built
before ``unregister()`` keeps offering the names). ``python -m tam_hf.run`` runs unmodified scripts and command
line tools with it (:mod:`tam_hf.trainer.run`), in every process they start (:mod:`tam_hf.trainer.autoregister`),
through :func:`register_on_import`: the same changes, each made when its transformers module has been imported.

Saved ``training_args.bin``: the Trainer pickles ``TrainingArguments`` into every checkpoint. Our enum members
pickle as a call to :func:`restore_optim_name` instead of ``OptimizerNames("adatam")``. So, where tam_hf is
installed, ``torch.load(".../training_args.bin", weights_only=False)`` works without calling ``register()``
first (loading registers the names). Where tam_hf is not installed it fails with ``ModuleNotFoundError: No
module named 'tam_hf'`` (installing tam_hf there fixes it), instead of transformers' ``adatam is not a valid
OptimizerNames``. Nothing else in a checkpoint depends on tam_hf: the weights, ``optimizer.pt`` (plain tensors and
dicts), ``scheduler.pt`` and ``trainer_state.json`` load anywhere, and ``TrainingArguments.to_dict()`` /
``to_json_string()`` store the optimizer as the plain string ``"adatam"``.

This module imports nothing heavy at import time (it is imported at interpreter start by the child-process hook).
"""

from __future__ import annotations

import functools
import sys

__all__ = ["register", "unregister", "register_on_import", "restore_optim_name", "SUPPORTED_TRANSFORMERS"]

SUPPORTED_TRANSFORMERS = ("5.2.0", "6.0.0")  # [low, high): the handler table exists

# What register() has changed and unregister() must undo (empty when nothing is registered).
_ADDED_MEMBERS: dict[str, object] = {}  # value -> the member we inserted into OptimizerNames
_ADDED_HANDLERS: list = []  # keys we inserted into _OPTIMIZER_HANDLERS
_ADDED_CALLBACKS: list[type] = []  # classes we inserted into DEFAULT_CALLBACKS
_WRAPPED_POST_INIT: list = []  # [original __post_init__] while ours is installed
# Members ever created, reused on a later register(): TrainingArguments built before an unregister()/register()
# cycle keep an ``optim`` that ``is`` the registered member.
_MEMBERS: dict[str, object] = {}


def check_transformers_version(version: str) -> None:
    """Raise a ``RuntimeError`` that names the supported range when ``version`` is outside it."""
    from packaging.version import Version

    low, high = (Version(v) for v in SUPPORTED_TRANSFORMERS)
    if not (low <= Version(Version(version).base_version) < high):
        raise RuntimeError(
            f"tam_hf.register() supports transformers>={low},<{high} (found {version}): it registers "
            f"--optim names in the Trainer's optimizer handler table, which older releases do not have. "
            f"Install a supported version: pip install 'transformers>={low},<{high}'. "
            f"Or pass optimizer_cls_and_kwargs=(tam_hf.AdaTAM, {{...}}) to your Trainer."
        )


def _handler(ctx):
    """The Trainer's optimizer handler for our names (``ctx`` is transformers' ``OptimizerContext``)."""
    from tam_hf.trainer.optim_args import optimizer_cls_and_kwargs

    return optimizer_cls_and_kwargs(ctx.args)


def restore_optim_name(value: str):
    """Unpickling target for our ``OptimizerNames`` members (see the module docstring)."""
    register()
    from transformers.training_args import OptimizerNames

    return OptimizerNames(value)


# ------------------------------------------------------------------------------------------ the enum members


def _new_member(enum_cls, name: str, value: str):
    member = _MEMBERS.get(value)
    if member is None:
        member = enum_cls._member_type_.__new__(enum_cls, value)
        member._name_ = name
        member._value_ = value
        member.__objclass__ = enum_cls
        # Instance attribute, read by pickle before the class's: see "Saved training_args.bin" above.
        member.__reduce_ex__ = lambda protocol: (restore_optim_name, (value,))
        _MEMBERS[value] = member
    member._sort_order_ = len(enum_cls._member_names_)
    return member


def _insert_member(enum_cls, member) -> None:
    name, value = member._name_, member._value_
    if hasattr(enum_cls, "_add_member_"):  # Python >= 3.13: class attribute and _member_map_
        enum_cls._add_member_(name, member)
    else:
        setattr(enum_cls, name, member)  # EnumType refuses reassigning members only, so set it first
        enum_cls._member_map_[name] = member
    enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[value] = member


def _remove_member(enum_cls, member) -> None:
    name, value = member._name_, member._value_
    if enum_cls._value2member_map_.get(value) is member:
        del enum_cls._value2member_map_[value]
    if enum_cls._member_map_.get(name) is member:
        del enum_cls._member_map_[name]  # first: EnumType refuses deleting a member's class attribute
    if name in enum_cls._member_names_:
        enum_cls._member_names_.remove(name)
    if name in enum_cls.__dict__:
        delattr(enum_cls, name)


def _add_names(training_args) -> None:
    """Change 1 (members) and change 3 (the ``__post_init__`` check); needs only ``transformers.training_args``."""
    import transformers

    check_transformers_version(transformers.__version__)
    from tam_hf.optim import registry

    enum_cls = training_args.OptimizerNames
    for value in registry.torque_names():
        if value in enum_cls._value2member_map_:  # ours already, or (one day) transformers' own
            continue
        member = _new_member(enum_cls, value.upper(), value)
        _insert_member(enum_cls, member)
        _ADDED_MEMBERS[value] = member
    if not _WRAPPED_POST_INIT:
        _wrap_post_init(training_args.TrainingArguments)


def _wrap_post_init(cls) -> None:
    original = cls.__dict__["__post_init__"]

    @functools.wraps(original)
    def __post_init__(self):
        original(self)
        from tam_hf.trainer.optim_args import check_optim_args

        check_optim_args(self)  # TAM names only; raises OptimArgsError (a ValueError)

    __post_init__._tam_hf_original = original
    cls.__post_init__ = __post_init__
    _WRAPPED_POST_INIT.append(original)


def _add_handlers(trainer_optimizer) -> None:
    """Change 2: a handler for each member added."""
    table = trainer_optimizer._OPTIMIZER_HANDLERS
    for member in _ADDED_MEMBERS.values():
        if member not in table:
            table[member] = _handler
            _ADDED_HANDLERS.append(member)


def _add_callbacks(trainer_module) -> None:
    """Change 4: the telemetry and distributed callbacks in every Trainer's defaults."""
    from tam_hf.trainer.callbacks import DampingCallback, install
    from tam_hf.trainer.distributed import TorqueStatsCallback

    callbacks = trainer_module.DEFAULT_CALLBACKS
    if DampingCallback not in callbacks:
        install(callbacks, DampingCallback)
        _ADDED_CALLBACKS.append(DampingCallback)
    if TorqueStatsCallback not in callbacks:
        callbacks.append(TorqueStatsCallback)
        _ADDED_CALLBACKS.append(TorqueStatsCallback)


# Each change, after the transformers module it edits (the order register() applies them in).
_STEPS = (
    ("transformers.training_args", _add_names),
    ("transformers.trainer_optimizer", _add_handlers),
    ("transformers.trainer", _add_callbacks),
)


def register() -> tuple[str, ...]:
    """Make every TAM optimizer of the registry a valid ``--optim`` (the changes listed in the module docstring;
    idempotent); returns the names. Raises ``RuntimeError`` on a transformers version outside
    :data:`SUPPORTED_TRANSFORMERS`."""
    import importlib

    for module_name, step in _STEPS:
        step(importlib.import_module(module_name))
    from tam_hf.optim import registry

    return registry.torque_names()


def unregister() -> tuple[str, ...]:
    """Undo :func:`register` (and a pending :func:`register_on_import`): transformers' enum, handler table,
    ``TrainingArguments.__post_init__`` and ``DEFAULT_CALLBACKS`` are as they were before. Returns the names
    removed. ``HfArgumentParser`` objects built meanwhile keep their argparse choices."""
    _ImportHook.remove()
    trainer_module = sys.modules.get("transformers.trainer")
    if trainer_module is not None:
        for cls in _ADDED_CALLBACKS:
            while cls in trainer_module.DEFAULT_CALLBACKS:
                trainer_module.DEFAULT_CALLBACKS.remove(cls)
    _ADDED_CALLBACKS.clear()
    trainer_optimizer = sys.modules.get("transformers.trainer_optimizer")
    if trainer_optimizer is not None:
        for key in _ADDED_HANDLERS:
            if trainer_optimizer._OPTIMIZER_HANDLERS.get(key) is _handler:
                del trainer_optimizer._OPTIMIZER_HANDLERS[key]
    _ADDED_HANDLERS.clear()
    training_args = sys.modules.get("transformers.training_args")
    if training_args is not None and _WRAPPED_POST_INIT:
        cls = training_args.TrainingArguments
        if getattr(cls.__dict__["__post_init__"], "_tam_hf_original", None) is _WRAPPED_POST_INIT[0]:
            cls.__post_init__ = _WRAPPED_POST_INIT[0]
        # else something wrapped it after us: ours stays inside theirs, harmless (it checks TAM names only, and
        # those are gone from the enum below)
    _WRAPPED_POST_INIT.clear()
    removed = tuple(_ADDED_MEMBERS)
    if training_args is not None:
        for member in _ADDED_MEMBERS.values():
            _remove_member(training_args.OptimizerNames, member)
    _ADDED_MEMBERS.clear()
    return removed


# --------------------------------------------------------------------------------------------- lazy form


def register_on_import() -> None:
    """:func:`register`, each change made right after the transformers module it edits has been imported (now,
    for modules already imported). Imports nothing itself: a process that never imports transformers pays
    nothing. Used by ``python -m tam_hf.run`` and by the child-process hook (:mod:`tam_hf.trainer.autoregister`)."""
    pending = []
    for module_name, step in _STEPS:
        module = sys.modules.get(module_name)
        if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
            step(module)
        else:
            pending.append((module_name, step))
    if pending:
        _ImportHook.install(pending)


class _ImportHook:
    """A ``sys.meta_path`` finder that lets the usual finders locate the modules named in ``steps`` and wraps the
    loader so that each step runs right after its module's code. It removes itself once every step has run.

    A step may not run while its module is still executing: ``transformers.trainer`` imports ``training_args``
    near its top and defines ``DEFAULT_CALLBACKS`` further down, which is why each change waits for its own
    module."""

    _active: "_ImportHook | None" = None

    def __init__(self, steps):
        self.steps = dict(steps)

    @classmethod
    def install(cls, steps) -> None:
        cls.remove()
        cls._active = cls(steps)
        sys.meta_path.insert(0, cls._active)

    @classmethod
    def remove(cls) -> None:
        if cls._active is not None and cls._active in sys.meta_path:
            sys.meta_path.remove(cls._active)
        cls._active = None

    def find_spec(self, fullname, path, target=None):
        step = self.steps.get(fullname)
        if step is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _RunAfter(spec.loader, functools.partial(self._ran, fullname, step))
        return spec

    def _ran(self, fullname, step, module) -> None:
        self.steps.pop(fullname, None)
        if not self.steps and type(self)._active is self:
            type(self).remove()
        step(module)


class _RunAfter:
    """A loader that runs ``then(module)`` after the wrapped loader executed the module; anything else is the
    wrapped loader's (source lookups for tracebacks, resources)."""

    def __init__(self, loader, then):
        self._loader, self._then = loader, then

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._then(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)
