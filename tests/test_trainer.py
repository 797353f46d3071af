"""TAMTrainer: the optimizer asked for with the parent's groups, typed optim_args, exact resume, damping
telemetry in log_history (the optimizer's own values at each logged step), LoRA leaves the base untouched. Tiny
Llama on CPU; each test trains a few steps."""

import pytest
import torch
from transformers import Trainer, TrainerCallback
from transformers import trainer as trainer_module

from tam_hf import TAM, AdaTAM, AdaTAMW, TAMTrainer
from tam_hf.trainer.callbacks import KEYS, DampingCallback
from tam_hf.trainer.optim_args import OptimArgsError

from hf_tiny import (ArithmeticTokens, RecordS, assert_logged_damping, losses, summary_of_s, tiny_llama,
                     training_args)


def unwrap(trainer):
    return trainer.optimizer.optimizer  # accelerate's AcceleratedOptimizer


def group_names(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


@pytest.mark.usefixtures("registered")
def test_trains_with_adatamw_and_the_parents_decay_groups(tmp_path):
    model = tiny_llama()
    args = training_args(tmp_path, optim="adatamw", weight_decay=0.1, adam_beta2=0.99, adam_epsilon=1e-7, max_steps=12)
    trainer = TAMTrainer(model=model, args=args, train_dataset=ArithmeticTokens())
    trainer.train()

    opt = unwrap(trainer)
    assert type(opt) is AdaTAMW
    decay, no_decay = group_names(model, opt)
    assert decay and no_decay
    assert not any("norm" in n or "bias" in n for n in decay)
    assert all(n in no_decay for n, _ in model.named_parameters() if "norm" in n)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    for g in opt.param_groups:
        assert g["betas"] == (0.9, 0.99) and g["eps"] == 1e-7 and g["lr"] == 5e-4
    loss = list(losses(trainer.state.log_history).values())
    assert len(loss) == 12 and sum(loss[-3:]) < sum(loss[:3])


@pytest.mark.usefixtures("registered")
def test_optim_args_are_typed_to_the_constructor(tmp_path):
    args = training_args(tmp_path, optim="adatam",
                         optim_args="decay_rate=0.95, cosine_scope=global,maximize=false,damping_eps=1e-6,"
                                    "bias_correction=yes,fixed_damping=none")
    trainer = TAMTrainer(model=tiny_llama(), args=args, train_dataset=ArithmeticTokens())
    opt = trainer.create_optimizer()
    assert type(opt) is AdaTAM
    g = opt.param_groups[0]
    assert g["decay_rate"] == 0.95 and isinstance(g["decay_rate"], float)
    assert g["cosine_scope"] == "global" and g["maximize"] is False and g["damping_eps"] == 1e-6
    assert g["bias_correction"] is True and g["fixed_damping"] is None
    assert g["decoupled_weight_decay"] is False


@pytest.mark.usefixtures("registered")
def test_tam_momentum_comes_from_adam_beta1(tmp_path):
    opt = TAMTrainer(model=tiny_llama(), args=training_args(tmp_path, optim="tam", adam_beta1=0.8, learning_rate=0.01)).create_optimizer()
    assert type(opt) is TAM and opt.param_groups[0]["momentum"] == 0.8


@pytest.mark.usefixtures("registered")
@pytest.mark.parametrize("trainer_cls", [TAMTrainer, Trainer])
def test_optim_args_changed_after_parsing_fail_before_the_first_step(tmp_path, trainer_cls):
    """register() checks --optim_args when TrainingArguments is built (test_register.py); arguments edited
    afterwards are checked again when the optimizer is built, before any step."""
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = training_args(tmp_path, optim="adatam", optim_args="decay_rate=0.9")
    args.optim_args = "decay_rat=0.95"
    trainer = trainer_cls(model=model, args=args, train_dataset=ArithmeticTokens())
    with pytest.raises(OptimArgsError, match="unknown key 'decay_rat' .did you mean 'decay_rate'.*Valid --optim_args keys"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_other_optimizers_and_optimizer_cls_and_kwargs_pass_through_without_register(tmp_path):
    defaults = list(trainer_module.DEFAULT_CALLBACKS)
    model = tiny_llama()
    opt = TAMTrainer(model=model, args=training_args(tmp_path, optim="adamw_torch")).create_optimizer()
    assert type(opt) is torch.optim.AdamW

    args = training_args(tmp_path, optim="adamw_torch", weight_decay=0.1)
    trainer = TAMTrainer(model=model, args=args, optimizer_cls_and_kwargs=(AdaTAM, {"lr": 5e-4, "decay_rate": 0.8}))
    assert sum(isinstance(c, DampingCallback) for c in trainer.callback_handler.callbacks) == 1
    opt = trainer.create_optimizer()
    assert type(opt) is AdaTAM
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["decay_rate"] == 0.8
    assert trainer_module.DEFAULT_CALLBACKS == defaults  # TAMTrainer changes no global


class RecordLogs(TrainerCallback):
    """Stands in for a reporter (TensorBoard, W&B): it must see the damping keys in `logs`."""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


@pytest.mark.usefixtures("registered")
def test_damping_reaches_log_history_and_reporters_on_logging_steps_only(tmp_path):
    recorder, record = RecordLogs(), RecordS()
    args = training_args(tmp_path, optim="adatam", max_steps=6, logging_steps=2)
    trainer = TAMTrainer(model=tiny_llama(), args=args, train_dataset=ArithmeticTokens(), callbacks=[recorder, record])
    assert sum(isinstance(c, DampingCallback) for c in trainer.callback_handler.callbacks) == 1
    trainer.train()

    step_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in step_logs] == [2, 4, 6]
    for entry in step_logs:  # the optimizer's state at that step, read here from its raw "s" values
        assert_logged_damping(entry, summary_of_s(record.by_step[entry["step"]]))
    assert len({e["damping/mean"] for e in step_logs}) == 3
    assert not any(k in trainer.state.log_history[-1] for k in KEYS)  # the end-of-training summary
    reported = [logs for logs in recorder.seen if "loss" in logs]
    assert [{k: r[k] for k in KEYS} for r in reported] == [{k: e[k] for k in KEYS} for e in step_logs]


@pytest.mark.usefixtures("registered")
def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tmp_path):
    data = ArithmeticTokens()
    common = dict(optim="adatamw", weight_decay=0.1, max_steps=8, save_strategy="steps", save_steps=4,
                  lr_scheduler_type="linear", warmup_steps=2, optim_args="decay_rate=0.8")
    full = TAMTrainer(model=tiny_llama(), args=training_args(tmp_path / "full", **common), train_dataset=data)
    full.train()

    resumed = TAMTrainer(model=tiny_llama(seed=1), args=training_args(tmp_path / "resumed", **common), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))

    full_loss, resumed_loss = losses(full.state.log_history), losses(resumed.state.log_history)
    assert sorted(resumed_loss) == list(range(1, 9))  # 1-4 come from the checkpoint's trainer_state.json
    assert resumed_loss == full_loss
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(unwrap(full).damping()["s"], unwrap(resumed).damping()["s"])


@pytest.mark.usefixtures("registered")
def test_lora_trains_only_adapters_and_leaves_the_base_bit_identical(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    args = training_args(tmp_path, optim="adatamw", weight_decay=0.1, learning_rate=2e-3, max_steps=6)
    trainer = TAMTrainer(model=model, args=args, train_dataset=ArithmeticTokens())
    trainer.train()

    in_optimizer = {id(p) for g in unwrap(trainer).param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if "lora_" in n}
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert not torch.equal(p, adapters[n]), f"adapter {n} did not train"
        else:
            assert torch.equal(p, base[n]), f"base weight {n} changed"
