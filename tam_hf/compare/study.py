"""The study behind ``tam-finetune compare`` (the command itself: :mod:`tam_hf.commands.compare`): the arms and the
plan of the runs.

A study runs one recipe under several optimizers ("arms") and seeds, one run after another, then writes the report of
:mod:`tam_hf.compare.report` (markdown + CSV table of every metric as mean ± std with the difference to the first arm,
loss and damping plots) into DIR.

Each seed, arm and sweep value is named once: a duplicate (``--seeds 3,3``, ``adamw,adamw``, an alias of an arm
already named, ``decay_rate=0.5,0.5``) would present one run as two and shrink every interval, so it is an error
(exit 2), as is an empty list.

Running and resuming the runs: :mod:`tam_hf.compare.runner`; lr tuning: :mod:`tam_hf.compare.tuning`.

Arms come from the optimizer registry (:mod:`tam_hf.optim.registry`): every entry is an arm under its own
name, and every TAM entry that takes ``fixed_damping`` also gets a ``<name>-const`` control arm that holds the
damping at d = 0.5 (no cosine) at the same lr as its TAM arm: same step size on average, no angle. The gap
between ``adatamw`` and ``adatamw-const`` is the effect of the angle; the gap between ``adatamw-const`` and
``adamw`` is the effect of the different normalisation. ``constant-damping`` is another name for
``adatamw-const``. An optimizer added to the registry is an arm with no edit here.

Learning rates. The recipe's ``optimizer.lr`` is read as the lr of the recipe's own optimizer; every arm of the
same family gets the lr the transfer rule gives (each entry's ``lr_factor``, relative to its family's reference:
AdamW for the Adam family, SGD-momentum for the SGD family; AdaTAM ``(1 - beta1) / 0.5``, TAM ``1 / 0.5``; see
the README, "The algorithm, and the learning rate to use"). Write ``NAME@LR`` (``adamw@2e-5``) to set an arm's
lr yourself, which is required across families (AdamW vs TAM).

Switched arms: ``adatamw>adamw@100`` trains with adatamw for 100 steps, then continues with AdamW
(``optimizer.switch``, :mod:`tam_hf.optim.switch`); ``adatamw@4e-5>adamw@100`` sets the first optimizer's lr. The
first lr follows the rules above, the second the transfer rule from it; the label is the text as typed, with
registry names.

Logging: a run of ``max_steps`` that the recipe's ``logging_steps`` would log fewer than :data:`MIN_POINTS` times
(``training.max_steps=10`` on a recipe that logs every 25 steps logs nothing) is logged every ``max_steps // 10``
steps instead, so that the loss and damping curves can be drawn; the plan's notes (console and report.md) say
so. A ``logging_steps`` given on the command line is kept as it is.

Sweeps: ``--sweep optimizer.decay_rate=0.5,0.9,0.99`` multiplies every arm the key applies to (adamw has no
decay_rate, the -const arms ignore it) into one arm per value, labelled ``adatamw decay_rate=0.5``; a key no arm
takes is an error (it would change nothing, silently).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import yaml

from tam_hf.compare.runner import read_result
from tam_hf.finetune.config.load import apply_overrides, read_recipe_file, rerun_yaml, to_dict, validate_recipe
from tam_hf.finetune.config.schema import Recipe
from tam_hf.finetune.config.yaml_io import read_yaml, short
from tam_hf.finetune.errors import RecipeError
from tam_hf.optim import registry
from tam_hf.optim.registry import OptimizerSpec

__all__ = ["Arm", "Run", "Plan", "Tuned", "MIN_POINTS", "arms", "find_arm", "expand", "plan", "plan_tuned",
           "extend_tuned", "check_seeds", "final_runs"]

# TrainingArguments fields that cannot change a run's numbers: a rerun that differs only in these is not redone.
COSMETIC = ("output_dir", "disable_tqdm", "report_to", "run_name", "logging_dir")
MAX_CHANGES = 4  # recipe keys Run.replaces names; the rest are counted
CONTROL_SUFFIX = "-const"
# The control holds d at its mean under noisy gradients, the E[d] the transfer rule divides by: its lr is its
# TAM arm's, and its step is on average the same.
CONTROL_DAMPING = registry.MEAN_DAMPING
ALIASES = {"constant-damping": "adatamw-const"}
# Fewest logged steps that draw a curve worth reading; fewer, and compare logs more often (see _log_often_enough).
MIN_POINTS = 10


@dataclass(frozen=True)
class Arm:
    """One optimizer setting to compare: a registry entry, optionally with the damping held fixed."""

    name: str
    spec: OptimizerSpec
    fixed_damping: Optional[float] = None

    @property
    def help(self) -> str:
        if self.fixed_damping is None:
            return self.spec.help
        return f"control: {self.spec.name} with d held at {self.fixed_damping:g} (no angle), same lr"

    def settings(self) -> dict:
        """The keys a recipe may set for this arm's optimizer (``lr`` included)."""
        return self.spec.accepted_keys()

    def lr_factor(self, kwargs: dict) -> float:
        """This arm's lr relative to its family's reference, given the recipe's optimizer settings (the keys
        this optimizer does not take are left out first)."""
        return self.spec.lr_factor({k: v for k, v in kwargs.items() if k in self.settings()})


def arms() -> dict[str, Arm]:
    """Every arm ``--optimizers`` may name, read from the registry now (entries added later are included)."""
    out = {}
    for spec in registry.OPTIMIZERS.values():
        out[spec.name] = Arm(spec.name, spec)
        if spec.torque and "fixed_damping" in spec.accepted_keys():
            out[spec.name + CONTROL_SUFFIX] = Arm(spec.name + CONTROL_SUFFIX, spec, CONTROL_DAMPING)
    return out


def find_arm(name: str) -> Arm:
    """The arm called ``name``: an arm name, ``constant-damping``, or a registry alias (``<alias>-const`` too)."""
    table = arms()
    name = ALIASES.get(name, name)
    if name in table:
        return table[name]
    base, control = (name[: -len(CONTROL_SUFFIX)], CONTROL_SUFFIX) if name.endswith(CONTROL_SUFFIX) else (name, "")
    for spec in registry.OPTIMIZERS.values():
        if base in spec.aliases and spec.name + control in table:
            return table[spec.name + control]
    known = [*table, *ALIASES]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown optimizer {name!r} in --optimizers{hint}; known: {', '.join(known)}")


@dataclass
class Run:
    label: str          # arm name plus sweep values, e.g. "adatamw decay_rate=0.5"
    seed: int
    recipe: Recipe
    fixed_damping: Optional[float]
    directory: Path

    @property
    def fingerprint(self) -> str:
        """Hash of everything that defines the run except where it is written, and whether it was continued
        from a checkpoint (the runner sets ``resume`` on a partial run: its result is the same run's)."""
        d = _defining({**to_dict(self.recipe), "resume": False}, self.fixed_damping)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def result_path(self) -> Path:
        return self.directory / "result.json"

    @property
    def done(self) -> bool:
        result = read_result(self.result_path)
        return result is not None and result.get("fingerprint") == self.fingerprint

    def replaces(self) -> Optional[list[str]]:
        """What would change if this run were trained into its folder over the finished run of another recipe
        there (its result's fingerprint differs): up to :data:`MAX_CHANGES` lines ``key: before -> now``, from the
        recipe.yaml that run wrote; None when the folder holds no finished run, or this run's own."""
        result = read_result(self.result_path)
        if result is None or result.get("fingerprint") == self.fingerprint:
            return None
        try:
            stored = yaml.safe_load((self.directory / "recipe.yaml").read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return ["its recipe.yaml is missing or unreadable: what changed cannot be shown"]
        before = _flat(_defining(stored if isinstance(stored, dict) else {}, result.get("fixed_damping")))
        now = _flat(_defining(yaml.safe_load(rerun_yaml(self.recipe)), self.fixed_damping))
        missing = "(not set)"
        keys = sorted(k for k in before.keys() | now.keys() if before.get(k, missing) != now.get(k, missing))
        lines = [f"{k}: {short(before.get(k, missing))} -> {short(now.get(k, missing))}" for k in keys[:MAX_CHANGES]]
        more = len(keys) - MAX_CHANGES
        return lines + ([f"and {more} more"] if more > 0 else []) or ["the recipe resolved differently (same keys)"]


def _defining(recipe: dict, fixed_damping: Optional[float]) -> dict:
    """What defines a run, from its recipe as a mapping: not where it is written nor how it is shown (COSMETIC
    training keys), and with the damping its control arm holds."""
    training = {k: v for k, v in (recipe.get("training") or {}).items() if k not in COSMETIC}
    return {**recipe, "training": training, "fixed_damping": fixed_damping}


def _flat(tree, prefix: str = "") -> dict:
    """A nested mapping as dotted keys (``training.max_steps``); lists and scalars are values."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) and value else
                   {f"{prefix}{key}": value})
    return out


# ------------------------------------------------------------------------------------------------ planning


def _parse_arm(text: str) -> tuple[Arm, Optional[float], Optional[list[float]]]:
    """(arm, the lr of ``NAME@LR`` or None, the grid of ``NAME@LR1|LR2|...`` or None)."""
    from tam_hf.compare.tuning import parse_lrs

    name, _, lr = text.strip().partition("@")
    arm = find_arm(name)
    if "|" in lr:
        return arm, None, parse_lrs(lr, f"--optimizers {text!r}:", "|")
    try:
        return arm, float(lr) if lr else None, None
    except ValueError:
        raise ValueError(f"--optimizers {text!r}: the lr after @ must be a number") from None


def _parse_switch(text: str) -> tuple[str, Optional[dict], str]:
    """(the first optimizer's ``NAME[@LR]``, the ``optimizer.switch`` of a switched arm ``NAME[@LR]>TO@K`` or None,
    the label's tail ``>TO@K`` in registry names or ''). TAM as a warm-up: NAME for K steps, then TO at the lr of
    the transfer rule from NAME's."""
    first, sep, second = text.strip().partition(">")
    if not sep:
        return first, None, ""
    to, _, step = second.strip().partition("@")
    if not step.strip().isdigit():
        raise ValueError(f"--optimizers {text!r}: a switched arm is NAME[@LR]>TO@K (adatamw>adamw@100): TO a "
                         f"registry optimizer, K the step of the switch")
    try:
        to_name = registry.get(to.strip()).name
    except ValueError as exc:  # the registry's did-you-mean
        raise ValueError(f"--optimizers {text!r}: {exc}") from None
    return first.strip(), {"to": to_name, "at_step": int(step)}, f">{to_name}@{int(step)}"


def _parse_sweeps(items: list[str]) -> list[tuple[str, list]]:
    out = []
    for item in items:
        key, sep, values = item.partition("=")
        words = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not words:
            raise ValueError(f"--sweep {item!r}: expected key.path=v1,v2,...")
        _once(words, lambda w: f"--sweep {item!r}: {w} is given twice")
        out.append((key, [_sweep_value(item, v) for v in words]))
    return out


def _once(items, message) -> None:
    """A ValueError naming the first item given twice: a run repeated under one label would count as two."""
    seen = set()
    for item in items:
        if item in seen:
            raise ValueError(message(item))
        seen.add(item)


def _as_yaml(value) -> str:
    """A sweep value as the override text that reads back to it (nan as .nan: str() would make it the string
    'nan')."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("...\n").strip()


def _sweep_value(item: str, text: str):
    from yaml import YAMLError

    try:
        return read_yaml(text)  # the recipe's safe loader, as for overrides
    except YAMLError:
        raise ValueError(f"--sweep {item!r}: {text!r} is not a YAML value") from None


def _applies(key: str, arm: Arm) -> bool:
    """A sweep over optimizer.X multiplies only the arms whose optimizer takes X (and that use the angle)."""
    if not key.startswith("optimizer."):
        return True
    field_name = key.split(".", 1)[1]
    if arm.fixed_damping is not None and field_name == "decay_rate":
        return False  # d is held: the smoothing of the cosine has nothing to act on
    return field_name in arm.settings()


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", label.replace(" ", "__"))


def expand(raw: dict, base: Recipe, optimizers: list[str], sweeps: list[str] = (),
           grids: dict[str, list[float]] | None = None) -> tuple[list[tuple[str, Arm, dict]], list[str]]:
    """(label, arm, the arm's recipe as a raw dict) for every arm and sweep value, in order, plus the problems
    found (an arm without an lr transfer). ``raw`` is the recipe after ``--set``, ``base`` the same validated.
    With ``grids`` (a dict, filled here: label -> the arm's own ``NAME@LR1|LR2`` grid, absent for the others) the
    arms are tuned: a label never carries an lr, the arm's lr (set in its recipe) is the centre of an auto grid."""
    base_spec = registry.get(base.optimizer.name)
    settings = base.optimizer.kwargs()  # what the recipe sets; each arm reads the keys its optimizer takes
    reference_lr = base.optimizer.lr / base_spec.lr_factor(settings)
    out, problems, given = [], [], {}
    sweep_axes = _parse_sweeps(list(sweeps))
    taken = set()  # the sweep keys some arm takes; one no arm takes would be silently ignored
    for text in optimizers:
        text = text.strip()
        first, switch, tail = _parse_switch(text)
        arm, explicit_lr, grid = _parse_arm(first)
        if grid is not None and grids is None:
            raise ValueError(f"--optimizers {text!r}: a list of lrs tunes the arm; give --tune-lr auto (or a list) "
                             "for the other arms too, so that no untuned arm is compared with tuned ones")
        if explicit_lr is None and grid is None and arm.spec.family != base_spec.family:
            problems.append(f"{arm.name}: no lr transfer from the recipe's {base.optimizer.name}; write {arm.name}@LR"
                            + (" (the centre of its grid) or {arm.name}@LR1|LR2|..." if grids is not None else ""))
            continue
        # adatamw, adatamw@8e-06: two arms; tuned, both are adatamw (the lr is chosen, not named)
        head = (arm.name if explicit_lr is None or grids is not None else f"{arm.name}@{explicit_lr:g}") + tail
        axes = [(k, vals) for k, vals in sweep_axes if _applies(k, arm)]
        taken.update(k for k, _ in axes)
        for combo in itertools.product(*(vals for _, vals in axes)):
            label = " ".join([head] + [f"{k.rsplit('.', 1)[-1]}={v}" for (k, _), v in zip(axes, combo)])
            if label in given:
                same = "is given twice" if given[label] == text else f"is the same arm as {given[label]!r}"
                raise ValueError(f"--optimizers: {text!r} {same} ({label}); name each arm once")
            given[label] = text
            arm_raw = copy.deepcopy(raw)
            opt = arm_raw.setdefault("optimizer", {})
            opt["name"] = arm.spec.name
            for key in list(opt):  # settings the arm's optimizer does not take (adamw has no decay_rate)
                if key != "name" and key not in arm.settings():
                    del opt[key]
            opt["lr"] = explicit_lr if explicit_lr is not None else grid[len(grid) // 2] if grid else \
                reference_lr * arm.lr_factor(settings)
            if grid is not None:
                grids[label] = grid
            if arm.fixed_damping is not None:
                opt["fixed_damping"] = arm.fixed_damping
            if switch is not None:
                opt["switch"] = dict(switch)
            overrides = [f"{k}={_as_yaml(v)}" for (k, _), v in zip(axes, combo)]
            problems += [f"{label}: {p}" for p in apply_overrides(arm_raw, overrides)]
            out.append((label, arm, arm_raw))
    arms = ", ".join(dict.fromkeys(t.strip() for t in optimizers))
    problems += [f"--sweep {key}: no arm takes it ({arms}; an optimizer key applies to the arms whose optimizer "
                 "has it, decay_rate not to a -const control); add such an arm, or check the key"
                 for key, _ in sweep_axes if key not in taken]
    return out, problems


class Plan(NamedTuple):
    labels: list[str]   # arm labels in order; the first is the baseline of the differences
    runs: list[Run]
    notes: list[str]    # what compare changed in the recipe, for the console and report.md


@dataclass
class Tuned:
    """A study with ``--tune-lr``: the tuning runs, and what the scored runs are made from once the lrs are chosen
    (:func:`final_runs`). See :mod:`tam_hf.compare.tuning` for the protocol."""

    labels: list[str]
    runs: list[Run]                       # the tuning runs (label = the arm; the lr is in the recipe)
    notes: list[str]
    grids: dict[str, list[float]]         # label -> its lrs
    metric: str                           # the selection metric, scored on the validation split
    seeds: list[int]                      # the tuning seeds
    source: str                           # where the validation split comes from, in words
    arms: list[tuple[str, Arm, dict]] = None  # (label, arm, raw recipe) for final_runs
    recipe_path: Path = None
    out: Path = None
    auto: tuple[str, ...] = ()            # the labels whose grid is auto: an edge choice is followed
    extended: dict[str, dict[str, int]] = field(default_factory=dict)  # label -> side -> lrs added


def _base(recipe_path: Path, optimizers: list[str], seeds: list[int], sets, label: str = "--seeds"):
    """(raw recipe after the overrides, the validated recipe, notes) after the checks every study shares."""
    if not [t for t in optimizers if t.strip()]:
        raise ValueError(f"--optimizers {','.join(optimizers)!r}: no optimizer; name at least one, e.g. adamw,adatamw")
    if not seeds:
        raise ValueError(f"{label}: no seed; give a count (3) or a list (0,1; one seed: 7,)")
    _once(seeds, lambda seed: f"{label}: seed {seed} is given twice (one run counted twice would shrink every "
          "interval); name each seed once")
    raw = read_recipe_file(recipe_path)
    problems = apply_overrides(raw, list(sets))
    base = validate_recipe(copy.deepcopy(raw), name=recipe_path.stem, source=str(recipe_path), problems=problems)
    return raw, base, _log_often_enough(raw, base, sets)


def _runs_of(recipe_path: Path, label: str, arm: Arm, arm_raw: dict, seeds: list[int], folder: Path,
             problems: list[str], lr: Optional[float] = None) -> list[Run]:
    """One validated run per seed in ``folder/seed<k>`` (at ``lr`` when given); problems are appended, prefixed."""
    from tam_hf.finetune.training_args import build_training_arguments

    runs = []
    for seed in seeds:
        seed_raw = copy.deepcopy(arm_raw)
        if lr is not None:
            seed_raw["optimizer"]["lr"] = lr
        directory = folder / f"seed{seed}"
        seed_raw.setdefault("training", {}).update(seed=seed, output_dir=str(directory))
        try:
            recipe = validate_recipe(seed_raw, name=recipe_path.stem, source=f"{recipe_path} [{label}]")
            if seed == seeds[0]:
                build_training_arguments(recipe)  # TrainingArguments' own checks, before any run
        except RecipeError as exc:
            problems += [f"{label}: {p}" for p in exc.problems]
            break
        runs.append(Run(label, seed, recipe, arm.fixed_damping, directory))
    return runs


def _raise(problems: list[str], recipe_path: Path) -> None:
    if problems:
        raise RecipeError(sorted(set(problems), key=problems.index), f"compare {recipe_path}")


def plan(recipe_path: str | Path, optimizers: list[str], seeds: list[int], sets: list[str] = (),
         sweeps: list[str] = (), out: str | Path = "compare") -> Plan:
    """Every run's recipe, validated here before anything trains; a RecipeError lists the problems of every arm
    at once."""
    recipe_path = Path(recipe_path)
    optimizers = [t for t in optimizers if t.strip()] or optimizers
    raw, base, notes = _base(recipe_path, optimizers, seeds, sets)
    arm_recipes, problems = expand(raw, base, optimizers, sweeps)
    runs = []
    for label, arm, arm_raw in arm_recipes:
        runs += _runs_of(recipe_path, label, arm, arm_raw, seeds, Path(out) / "runs" / _slug(label), problems)
    _raise(problems, recipe_path)
    return Plan([label for label, _, _ in arm_recipes], runs, notes)


def plan_tuned(recipe_path: str | Path, optimizers: list[str], tune_lr, tune_seeds: list[int], select: Optional[str],
               sets: list[str] = (), sweeps: list[str] = (), out: str | Path = "compare") -> Tuned:
    """The tuning runs of ``--tune-lr`` (``"auto"`` or a list of lrs; see :mod:`tam_hf.compare.tuning`), validated
    with every problem at once, like :func:`plan`."""
    from tam_hf.compare.tuning import auto_grid, default_metric

    recipe_path = Path(recipe_path)
    optimizers = [t for t in optimizers if t.strip()] or optimizers
    raw, base, notes = _base(recipe_path, optimizers, tune_seeds, sets, "--tune-seeds")
    own: dict[str, list[float]] = {}
    arm_recipes, problems = expand(raw, base, optimizers, sweeps, grids=own)
    d = base.data
    if d.validation_split is None and d.validation_file is None:
        problems.append("--tune-lr chooses each arm's lr on a validation split, never on the eval set: set "
                        "data.validation_split (e.g. --set data.validation_split=0.1) or data.validation_file")
    source = f"data.validation_split {d.validation_split:g} of the training rows" if d.validation_split else \
        f"data.validation_file {d.validation_file}"
    metric = select or default_metric(base)
    known = ["loss", *(m for m in base.eval.metrics or [] if ":" not in m and "/" not in m)]
    if metric not in known:
        problems.append(f"--select {metric}: not a metric the validation split is scored by; choose one of "
                        f"{', '.join(known)} (eval.metrics adds more)")
    grids, runs = {}, []
    for label, arm, arm_raw in arm_recipes:
        grids[label] = own.get(label) or (tune_lr if tune_lr != "auto" else auto_grid(arm_raw["optimizer"]["lr"]))
        for lr in grids[label]:
            folder = Path(out) / "tuning" / _slug(label) / f"lr{lr:.3g}"
            runs += _runs_of(recipe_path, label, arm, arm_raw, tune_seeds, folder, problems, lr=lr)
    _raise(problems, recipe_path)
    auto = tuple(label for label, _, _ in arm_recipes if tune_lr == "auto" and label not in own)
    return Tuned([label for label, _, _ in arm_recipes], runs, notes, grids, metric, list(tune_seeds), source,
                 arm_recipes, recipe_path, Path(out), auto)


def extend_tuned(tuned: Tuned, choices: list) -> list[Run]:
    """The tuning runs of one more lr past the edge of every auto-grid arm whose choice sits there
    (:func:`tam_hf.compare.tuning.beyond_edge`); added to ``tuned`` (its runs, grids and extension counts)."""
    from tam_hf.compare.tuning import beyond_edge

    problems, new = [], []
    for choice in choices:
        lr = beyond_edge(choice) if choice.label in tuned.auto else None
        if lr is None or lr in tuned.grids[choice.label]:
            continue
        label, arm, arm_raw = next(entry for entry in tuned.arms if entry[0] == choice.label)
        folder = tuned.out / "tuning" / _slug(label) / f"lr{lr:.3g}"
        new += _runs_of(tuned.recipe_path, label, arm, arm_raw, tuned.seeds, folder, problems, lr=lr)
        tuned.grids[label] = sorted([*tuned.grids[label], lr])
        sides = tuned.extended.setdefault(label, {})
        sides[choice.edge] = sides.get(choice.edge, 0) + 1
    _raise(problems, tuned.recipe_path)
    tuned.runs += new
    return new


def check_seeds(seeds: list[int], tuned: Tuned) -> None:
    """A ValueError when a scored seed is also a tuning seed: the lr would be scored on a run it was chosen on."""
    overlap = sorted(set(seeds) & set(tuned.seeds))
    if overlap:
        raise ValueError(f"--seeds and --tune-seeds share seed(s) {overlap}: the scored runs must not be runs the lr "
                         "was chosen on")


def final_runs(tuned: Tuned, chosen: dict[str, float], seeds: list[int]) -> list[Run]:
    """The scored runs: ``seeds`` of every arm with a chosen lr, at that lr, in ``out/runs`` (as without tuning)."""
    _once(seeds, lambda seed: f"--seeds: seed {seed} is given twice; name each seed once")
    check_seeds(seeds, tuned)
    problems, runs = [], []
    for label, arm, arm_raw in tuned.arms:
        if chosen.get(label) is not None:
            runs += _runs_of(tuned.recipe_path, label, arm, arm_raw, seeds, tuned.out / "runs" / _slug(label),
                             problems, lr=chosen[label])
    _raise(problems, tuned.recipe_path)
    return runs


def _log_often_enough(raw: dict, base: Recipe, sets: list[str]) -> list[str]:
    """A short run under the recipe's logging interval logs too few steps to draw a curve (max_steps=10 with
    logging_steps=25 logs none): log every max_steps / MIN_POINTS steps instead, unless the command line set the
    interval itself. Runs without max_steps (epochs) are left as they are: their length is known only once the
    data is loaded."""
    from tam_hf.finetune.training_args import build_training_arguments

    if any(s.split("=", 1)[0].strip() in ("training.logging_steps", "training.logging_strategy") for s in sets):
        return []
    try:
        args = build_training_arguments(base)
    except RecipeError:
        return []  # the per-arm checks report it
    steps, every = args.max_steps, args.logging_steps
    if steps <= 0 or args.logging_strategy != "steps" or every <= 0:
        return []
    every = every * steps if every < 1 else every  # TrainingArguments: below 1 is a fraction of the run
    if steps // every >= MIN_POINTS:
        return []
    chosen = max(1, steps // MIN_POINTS)
    raw.setdefault("training", {})["logging_steps"] = chosen
    return [f"compare logs every {chosen} step(s) (training.logging_steps={chosen}): the recipe's interval of "
            f"{every:g} logs {int(steps // every)} point(s) in a {steps}-step run, too few to draw the curves "
            "(--set training.logging_steps=N chooses another)"]
