"""Optimizer switch (TAM as a warm-up): the switched optimizer is K steps of the first + the documented handover +
the second, bit for bit; the handover's values by hand; resume across and after the switch is exact (the
optimizer alone, and a Trainer run); config errors at once; a switched arm in compare."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import yaml

from tam_hf.compare import study
from tam_hf.finetune.config.load import validate_recipe
from tam_hf.finetune.errors import RecipeError
from tam_hf.optim.switch import SwitchOptimizer, convert_state
from tam_hf.optim.tam import TAM, AdaTAMW
from tam_hf.trainer.optim_args import OptimArgsError

from hf_tiny import ArithmeticTokens, losses, run_raw, tiny_llama, training_args

SHAPES = [(4, 3), (5,), (2, 2)]


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in SHAPES]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)


def _groups(params):
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]


PAIRS = {
    # first, to, first kwargs, the reference classes, the handover written out here (the module docstring's rule)
    "adatamw>adamw": ("adatamw", "adamw", {"lr": 1e-2}, AdaTAMW, torch.optim.AdamW, lambda lr: lr / ((1 - 0.9) / 0.5)),
    "tam>sgd": ("tam", "sgd", {"lr": 5e-2}, TAM, torch.optim.SGD, lambda lr: lr / (1 / 0.5)),
}


def _handover(kind, st, group):
    d = max((1.0 + float(st["s"])) / 2.0 + group["damping_eps"], 0.05)
    if kind == "adamw":
        return {"step": torch.tensor(float(st["step"])), "exp_avg": st["exp_avg"] * ((1 - group["betas"][0]) / d),
                "exp_avg_sq": st["exp_avg_sq"].clone()}
    return {"momentum_buffer": st["momentum_buffer"] * (1 / d)}


@pytest.mark.parametrize("pair", PAIRS)
def test_switch_is_k_steps_of_the_first_then_the_handover_then_the_second(pair):
    first, to, kwargs, first_cls, second_cls, lr_rule = PAIRS[pair]
    k, n = 3, 7
    params = _params()
    switch = SwitchOptimizer(_groups(params), first=first, to=to, at_step=k, first_kwargs=kwargs)
    for t in range(n):
        _grads(params, t)
        switch.step()

    ref = _params()
    opt = first_cls(_groups(ref), **kwargs)
    for t in range(k):
        _grads(ref, t)
        opt.step()
    extra = {"momentum": 0.9} if to == "sgd" else {}
    second = second_cls(_groups(ref), lr=lr_rule(kwargs["lr"]), **extra)
    for group in opt.param_groups:
        for p in group["params"]:
            second.state[p] = _handover(to, opt.state[p], group)
    for t in range(k, n):
        _grads(ref, t)
        second.step()

    assert lr_rule(kwargs["lr"]) == pytest.approx(kwargs["lr"] * (5 if to == "adamw" else 0.5))
    for a, b in zip(params, ref):
        assert torch.equal(a, b)
    assert type(switch.optimizer) is second_cls and switch.switched_at_step == k
    assert not switch.first.state  # TAM's s and moments are gone
    assert all("s" not in st for st in switch.second.state.values())
    for p, q in zip(params, ref):
        for key, value in second.state[q].items():
            assert torch.equal(switch.second.state[p][key], value), key


def test_handover_values_by_hand():
    p = torch.zeros(2, dtype=torch.float64)
    group = {"betas": (0.9, 0.999), "damping_eps": 0.0}
    entry = {"exp_avg": torch.tensor([2.0, -4.0], dtype=torch.float64), "exp_avg_sq": torch.tensor([1.0, 9.0],
             dtype=torch.float64), "s": torch.tensor(0.6), "step": torch.tensor(7.0)}
    new = convert_state("adam", p, entry, group)  # d = (1 + 0.6) / 2 = 0.8; (1 - 0.9) / 0.8 = 0.125
    assert new["exp_avg"].tolist() == pytest.approx([0.25, -0.5])
    assert new["exp_avg_sq"].tolist() == [1.0, 9.0] and new["exp_avg_sq"] is not entry["exp_avg_sq"]
    assert float(new["step"]) == 7.0 and set(new) == {"step", "exp_avg", "exp_avg_sq"}

    tam = {"momentum_buffer": torch.tensor([1.0, -3.0], dtype=torch.float64), "s": torch.tensor(0.0)}
    assert convert_state("sgd", p, tam, {"damping_eps": 0.0})["momentum_buffer"].tolist() == [2.0, -6.0]  # d 0.5
    opposed = {**tam, "s": torch.tensor(-1.0)}  # d = 0: the floor 0.05 divides instead
    assert convert_state("sgd", p, opposed, {"damping_eps": 1e-8})["momentum_buffer"].tolist() == \
        pytest.approx([20.0, -60.0])


def _roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("saved_at", [2, 5])  # before the switch (resume crosses it) and after it
def test_resume_is_exact_before_and_after_the_switch(saved_at):
    k, n, kwargs = 3, 8, dict(first="adatamw", to="adamw", at_step=3, lr=3e-2, first_kwargs={"lr": 1e-2})
    params = _params()
    full = SwitchOptimizer(_groups(params), **kwargs)
    saved = None
    for t in range(n):
        _grads(params, t)
        full.step()
        if t + 1 == saved_at:
            saved = (_roundtrip(full.state_dict()), [p.detach().clone() for p in params])

    resumed_params = [p.requires_grad_() for p in saved[1]]
    resumed = SwitchOptimizer(_groups(resumed_params), **kwargs)
    resumed.load_state_dict(saved[0])
    assert resumed.switched == (saved_at > k) and resumed.steps == saved_at
    for t in range(saved_at, n):
        _grads(resumed_params, t)
        resumed.step()
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
    assert resumed.optimizer.param_groups[0]["lr"] == 3e-2

    other = SwitchOptimizer(_groups(_params()), **{**kwargs, "at_step": 4})
    with pytest.raises(ValueError, match="saved by adatamw>adamw@3"):
        other.load_state_dict(saved[0])
    with pytest.raises(ValueError, match="not saved by a SwitchOptimizer"):
        other.load_state_dict(AdaTAMW(_params(), lr=1e-2).state_dict())


@pytest.mark.usefixtures("registered")
def test_trainer_resumes_across_the_switch_and_reports_damping_only_before_it(tmp_path):
    data = ArithmeticTokens()
    common = dict(optim="adatamw", weight_decay=0.1, max_steps=7, save_strategy="steps", save_steps=5,
                  lr_scheduler_type="linear", warmup_steps=2, optim_args="decay_rate=0.8,switch_to=adamw,switch_at_step=3")
    from tam_hf import TAMTrainer

    full = TAMTrainer(model=tiny_llama(), args=training_args(tmp_path / "full", **common), train_dataset=data)
    full.train()
    resumed = TAMTrainer(model=tiny_llama(seed=1), args=training_args(tmp_path / "resumed", **common),
                         train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-5"))  # saved after the switch

    assert losses(resumed.state.log_history) == losses(full.state.log_history)
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    switch = full.optimizer.optimizer
    assert type(switch) is SwitchOptimizer and type(switch.optimizer) is torch.optim.AdamW
    assert switch.first.param_groups[0]["decay_rate"] == 0.8
    damped = [e["step"] for e in full.state.log_history if "damping/mean" in e]
    assert damped == [1, 2, 3]


@pytest.mark.usefixtures("registered")
def test_optim_args_switch_errors_are_listed_together(tmp_path):
    with pytest.raises(OptimArgsError) as err:
        training_args(tmp_path, optim="adatamw", optim_args="switch_to=sgd,switch_at_step=0,switch_lr=-1")
    text = str(err.value)
    assert "adatamw -> sgd is not a supported switch" in text and "switch_at_step: 0" in text
    assert "switch_lr: -1" in text


def test_recipe_switch_errors_at_once(tmp_path):
    raw = run_raw(tmp_path / "out")
    raw["optimizer"].update(lr=0, switch={"to": "adam", "at_step": 0, "lr": -1.0, "when": 3})
    with pytest.raises(RecipeError) as err:
        validate_recipe(raw)
    assert len(err.value.problems) == 5
    text = "\n".join(err.value.problems)
    for part in ("optimizer.switch.at_step: 0 must be >= 1", "optimizer.switch.lr: -1.0 must be > 0",
                 "optimizer.switch.when: unknown key", "unknown optimizer 'adam' (did you mean 'adamw'?)",
                 "optimizer.lr: 0 with optimizer.switch"):
        assert part in text

    raw["optimizer"].update(lr=1e-3, switch={"to": "sgd", "at_step": 2})
    with pytest.raises(RecipeError, match="supported: adatamw -> adamw, adatam -> adamw, tam -> sgd"):
        validate_recipe(raw)

    raw["optimizer"]["switch"] = {"to": "adamw", "at_step": 4}  # max_steps is 4
    raw["training"]["fsdp"] = "full_shard"
    with pytest.raises(RecipeError) as err:
        validate_recipe(raw)
    text = "\n".join(err.value.problems)
    assert "optimizer.switch.at_step: 4 must be below training.max_steps (4)" in text
    assert "optimizer.switch with training.fsdp" in text


def test_recipe_run_records_the_switch_and_resume_refuses_another(tmp_path):
    from tam_hf.finetune.pipeline import finetune
    from tam_hf.finetune.resume import resume_problems

    raw = run_raw(tmp_path / "out")
    raw["optimizer"]["switch"] = {"to": "adamw", "at_step": 2}
    recipe = validate_recipe(raw)
    assert "switch" not in recipe.optimizer.kwargs()
    summary = finetune(recipe)
    assert summary["switch"] == {"from": "adatamw", "to": "adamw", "at_step": 2, "lr": pytest.approx(5e-3),
                                 "switched_at_step": 2}
    assert summary["damping"] is None  # AdamW took the last steps: no damping to report as current
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert resume_problems(validate_recipe(raw), checkpoint) == []
    raw["optimizer"]["switch"]["at_step"] = 3
    assert any("optimizer.switch.at_step" in p for p in resume_problems(validate_recipe(raw), checkpoint))
    del raw["optimizer"]["switch"]
    assert resume_problems(validate_recipe(raw), checkpoint)  # without the switch: refused too


def test_compare_plans_a_switched_arm(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(run_raw(tmp_path / "out", max_steps=6)))
    labels, runs, _ = study.plan(recipe, ["adamw", "adatamw>adamw@3", " adatamw@4e-4 > adamw@2"], [0],
                                 out=tmp_path / "cmp")
    assert labels == ["adamw", "adatamw>adamw@3", "adatamw@0.0004>adamw@2"]
    by = {r.label: r.recipe.optimizer for r in runs}
    assert by["adamw"].switch is None
    assert by["adatamw>adamw@3"].lr == pytest.approx(1e-3)  # the recipe's adatamw lr: same optimizer
    assert (by["adatamw>adamw@3"].switch.to, by["adatamw>adamw@3"].switch.at_step) == ("adamw", 3)
    assert by["adatamw>adamw@3"].switch.lr is None  # the transfer rule from the first lr
    assert by["adatamw@0.0004>adamw@2"].lr == 4e-4 and by["adatamw@0.0004>adamw@2"].switch.at_step == 2
    assert Path(runs[1].directory).parts[-2] == "adatamw_adamw_3"
    with pytest.raises(ValueError, match="NAME\\[@LR\\]>TO@K"):
        study.plan(recipe, ["adatamw>adamw"], [0], out=tmp_path / "cmp")
    with pytest.raises(ValueError, match="unknown optimizer 'adamx' \\(did you mean 'adamw'\\?\\)"):
        study.plan(recipe, ["adatamw>adamx@3"], [0], out=tmp_path / "cmp")
    with pytest.raises(RecipeError, match="adamw>adatamw@3: optimizer.switch.to: adamw -> adatamw is not a supported"):
        study.plan(recipe, ["adamw>adatamw@3"], [0], out=tmp_path / "cmp")


def test_sharded_runs_refuse_a_switch():
    from types import SimpleNamespace

    from tam_hf.trainer.distributed import DistributedConfigError, check_training_args

    args = SimpleNamespace(optim="adatamw", optim_args="switch_to=adamw,switch_at_step=3",
                           deepspeed={"zero_optimization": {"stage": 2}}, fsdp=None)
    with pytest.raises(DistributedConfigError, match="optimizer switch .* cannot run under DeepSpeed ZeRO"):
        check_training_args(args)
    check_training_args(SimpleNamespace(**{**vars(args), "optim_args": "decay_rate=0.8"}))  # no switch: fine


def test_compare_tunes_the_first_lr_of_a_switched_arm(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(run_raw(tmp_path / "out", max_steps=6)))
    tuned = study.plan_tuned(recipe, ["adamw", "adatamw>adamw@3"], "auto", [100], None,
                             ["data.validation_split=0.2"], out=tmp_path / "cmp")
    switched = [r for r in tuned.runs if r.label == "adatamw>adamw@3"]
    assert len(switched) == len(tuned.grids["adatamw>adamw@3"]) >= 5
    assert sorted(r.recipe.optimizer.lr for r in switched) == pytest.approx(sorted(tuned.grids["adatamw>adamw@3"]))
    assert all(r.recipe.optimizer.switch.at_step == 3 and r.recipe.optimizer.switch.lr is None for r in switched)
