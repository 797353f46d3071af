"""One registry entry reaches every layer: a new optimizer added with ``registry.add`` is accepted by recipes
(with its keys read from its constructor), by ``--optim`` / ``--optim_args`` through ``register()``, and is an
arm (with its constant-damping control) of ``compare`` — with no other edit."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tam_hf.optim import registry
from tam_hf.optim.registry import OptimizerSpec
from tam_hf.optim.hyperparams import variant_init
from tam_hf.optim.tam import AdaTAMW

DEMO = Path(__file__).parents[1] / "recipes" / "examples" / "demo_tiny.yaml"


class SlowTAMW(AdaTAMW):
    """AdaTAMW with one extra setting, to show that new constructor keys flow through too."""

    @variant_init(AdaTAMW.__init__, extra={"lr_scale": (float, 1.0)})
    def __init__(self, lr_scale: float, lr: float, **kwargs):
        if not lr_scale > 0:
            raise ValueError(f"Invalid lr_scale value: {lr_scale}")
        super().__init__(lr=lr * lr_scale, **kwargs)


@pytest.fixture
def slowtamw():
    spec = registry.add(OptimizerSpec("slowtamw", SlowTAMW, "adam", torque=True, help="test entry"))
    yield spec
    registry.OPTIMIZERS.pop("slowtamw")


def test_a_new_registry_entry_reaches_recipes_optim_and_compare(slowtamw, tmp_path):
    import tam_hf
    from transformers import Trainer, TrainingArguments

    from tam_hf.compare import study
    from tam_hf.finetune.config.load import load_recipe
    from tam_hf.finetune.errors import RecipeError

    recipe = load_recipe(DEMO, ["optimizer.name=slowtamw", "optimizer.lr_scale=0.5",
                                f"training.output_dir={tmp_path / 'run'}"])
    assert recipe.optimizer.name == "slowtamw" and recipe.optimizer.kwargs()["lr_scale"] == 0.5
    with pytest.raises(RecipeError, match="lr_scale"):  # the constructor's own check, through the recipe
        load_recipe(DEMO, ["optimizer.name=slowtamw", "optimizer.lr_scale=-1"])

    tam_hf.register()
    try:
        args = TrainingArguments(str(tmp_path / "out"), optim="slowtamw", learning_rate=1e-3,
                                 optim_args="lr_scale=0.25,decay_rate=0.5", use_cpu=True, report_to="none")
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        assert cls is SlowTAMW and kwargs["lr_scale"] == 0.25 and kwargs["decay_rate"] == 0.5
        opt = cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)
        assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-4)
    finally:
        tam_hf.unregister()

    labels, runs, _ = study.plan(DEMO, ["adamw", "slowtamw", "slowtamw-const"], [0], out=tmp_path / "cmp")
    assert labels == ["adamw", "slowtamw", "slowtamw-const"]
    by_label = {r.label: r for r in runs}
    # the transfer rule from the registry: 0.2x the AdamW reference, and the control holds d at 0.5
    assert by_label["slowtamw"].recipe.optimizer.lr == pytest.approx(0.2 * by_label["adamw"].recipe.optimizer.lr)
    assert by_label["slowtamw-const"].fixed_damping == registry.MEAN_DAMPING


def test_validating_a_tam_optimizer_imports_no_torch():
    # `tam-finetune RECIPE --validate` must not pay for torch (2.5 s to import here): the registry and the TAM
    # optimizers' declared arguments and checks are torch-free; the classes load on first use of `.cls`.
    code = textwrap.dedent("""
        import sys
        from tam_hf.optim import registry
        spec = registry.get("adatamw")
        spec.check({"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.1})
        assert "betas" in spec.accepted_keys() and spec.defaults()["weight_decay"] == 0.01
        assert spec.lr_factor() > 0 and spec.class_name == "AdaTAMW"
        try:
            spec.check({"betas": (0.9, 1.5)})
        except ValueError as e:
            assert str(e) == "Invalid beta parameter at index 1: 1.5", e
        else:
            raise AssertionError("betas[1] = 1.5 accepted")
        for name in registry.torque_names():
            registry.get(name).accepted_keys()
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "triton", "transformers", "numpy"))
        assert not heavy, heavy
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", registry.torque_names())
def test_declared_arguments_are_the_constructors(name):
    """One source: the class's signature is its declaration, and check() says what the constructor says."""
    spec = registry.get(name)
    if name.endswith("_8bit"):
        pytest.importorskip("bitsandbytes")
    assert inspect.signature(spec.cls) == spec.arguments.signature
    params = [torch.nn.Parameter(torch.zeros(2))]
    for bad, error in (({"lr": -1.0}, ValueError), ({"decay_rate": 1.0}, ValueError), ({"nope": 1}, TypeError),
                       ({"cosine_scope": "layer"}, ValueError)):
        with pytest.raises(error) as from_check:
            spec.check({"lr": 1e-3, **bad})
        with pytest.raises(error) as from_constructor:
            spec.cls(params, **{"lr": 1e-3, **bad})
        assert str(from_check.value) == str(from_constructor.value)
