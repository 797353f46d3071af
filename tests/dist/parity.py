"""1-process vs 2-process parity of TAM under DDP and DeepSpeed ZeRO-1/2/3, through transformers.Trainer.

    python tests/dist/parity.py OUT ref                                   # 1 process, batch 8
    torchrun --standalone --nproc_per_node 2 tests/dist/parity.py OUT ddp dtensor       # 2 processes, batch 4
    torchrun --standalone --nproc_per_node 2 tests/dist/parity.py OUT zero1 zero2 zero3 zero2-naive \
        zero2-offload:tam-full guard                                      # the same under DeepSpeed

A backend may name its cases (``zero1:adatam-full+adatam-lora``); ``guard`` builds Trainers with the two
configurations that would silently replace TAM and records the errors; ``dtensor`` runs dtensor_check.py (the
DTensor unit check and a real FSDP2 model). ``*-tamtrainer`` backends use the project's TAMTrainer with
``optim="adatam"`` and the ``attach`` hook instead of the test's own Trainer subclass.

For every backend and case (AdaTAM / TAM, full / LoRA) it trains a tiny Llama for STEPS steps on fixed-length
integer tokens and writes OUT/{backend}-{case}-rank{r}.pt with the full fp32 parameters, the damping of every
tensor (per fragment on ZeRO), the stats all-reduces counted inside each optimizer.step() call and the number
of step() calls per training step. ``zero2-naive`` is ZeRO-2 WITHOUT the statistics layer (the control: it must
train all its steps and drift). tests/test_distributed.py runs the three launches side by side (the DeepSpeed one
only where deepspeed is installed) and compares the files.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from tam_hf.trainer.distributed import attach, find_torque_optimizer
from tam_hf.optim import TAM, AdaTAM

STEPS, SEQ, GLOBAL_BATCH = 4, 16, 8
ACCELERATE_DIR = Path(__file__).resolve().parents[2] / "recipes" / "accelerate"
# AdaTAM's lrs follow the transfer rule (0.2x AdamW's: 5e-4 full, 1e-3 for LoRA's usual 5e-3). At 5x that,
# AdaTAM's un-bias-corrected early steps (~16x lr each) make 4 LoRA steps chaotic: float32 reduction-order noise
# grows to ~2e-5 under ZeRO-3 (1.6e-6 at 1e-3, 3e-7 at 5e-4; torch's AdamW at 5e-3 stays at 2e-7), the size of
# PARAM_ATOL, while the damping still matches to 3e-8. The test then measures the step size, not exactness.
CASES = {  # name: (optimizer class, kwargs, lora)
    "adatam-full": (AdaTAM, dict(lr=5e-4, weight_decay=0.01), False),
    "tam-full": (TAM, dict(lr=5e-2, momentum=0.9, weight_decay=0.01), False),
    "adatam-lora": (AdaTAM, dict(lr=1e-3), True),
    "tam-lora": (TAM, dict(lr=5e-1, momentum=0.9), True),
    "adatam-global": (AdaTAM, dict(lr=5e-4, cosine_scope="global"), False),
}


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=GLOBAL_BATCH * STEPS):
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, 96, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build_model(lora: bool):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"]))
    return model


class ParityTrainer(Trainer):
    """What TAMTrainer does, reduced to the test's needs: our optimizer, decay/no-decay groups, attach()."""

    def __init__(self, *a, opt_cls, opt_kwargs, install=True, **kw):
        self.opt_cls, self.opt_kwargs = opt_cls, dict(opt_kwargs)
        super().__init__(*a, **kw)
        if install:
            assert attach(self, force=True) is not None
        else:  # the control: nothing registered (the tamtrainer runs unregister), so no statistics layer anywhere
            from tam_hf.trainer.distributed import TorqueStatsCallback

            assert not any(isinstance(c, TorqueStatsCallback) for c in self.callback_handler.callbacks)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model
            decay = set(self.get_decay_parameter_names(model))
            wd = self.opt_kwargs.pop("weight_decay", 0.0)
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            groups = [{"params": [p for n, p in named if n in decay], "weight_decay": wd},
                      {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
            self.optimizer = self.opt_cls([g for g in groups if g["params"]], **self.opt_kwargs)
        return self.optimizer


def tam_trainer_class():
    """The project's TAMTrainer (``--optim adatam``) plus the one-line hook it is meant to carry."""
    from tam_hf.trainer.tam_trainer import TAMTrainer

    class AttachedTAMTrainer(TAMTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            assert attach(self) is not None  # args.optim names AdaTAM: attach must not skip it

    return AttachedTAMTrainer


class CountCollectives(TrainerCallback):
    """Counts torch.distributed.all_reduce calls made inside the TAM optimizer's step() calls."""

    def __init__(self):
        self.in_step, self.calls, self.steps_per_train_step, self.allreduces = False, 0, [], []
        self._pending_steps = 0
        original = dist.all_reduce

        def counting(*args, **kwargs):
            if self.in_step:
                self.calls += 1
            return original(*args, **kwargs)

        self.original, dist.all_reduce = original, counting

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        tam, _ = find_torque_optimizer(optimizer)
        tam.register_step_pre_hook(lambda *a: self._enter())
        tam.register_step_post_hook(lambda *a: setattr(self, "in_step", False))

    def _enter(self):
        self.in_step = True
        self._pending_steps += 1

    def on_step_end(self, args, state, control, **kwargs):
        self.steps_per_train_step.append(self._pending_steps)
        self.allreduces.append(self.calls)
        self._pending_steps, self.calls = 0, 0

    def restore(self):
        dist.all_reduce = self.original


def ds_config(stage: int, offload: bool = False) -> dict:
    """The shipped DeepSpeed config (recipes/accelerate/ds_zero{stage}[_offload].json): the tests run what users
    launch. Offload ones carry "zero_force_ds_cpu_optimizer": false, without which accelerate swaps TAM out."""
    path = ACCELERATE_DIR / f"ds_zero{stage}{'_offload' if offload else ''}.json"
    return json.loads(path.read_text())


def backend_ds_config(backend: str, stage: int) -> dict:
    cfg = ds_config(stage, offload="offload" in backend)
    if "subgroups" in backend:  # ZeRO-3 split into many sub-groups, each stepped (and reduced) on its own
        cfg["zero_optimization"]["sub_group_size"] = 3000
    return cfg


def full_params(model, zero: bool) -> dict:
    inner = getattr(model, "module", model)
    out = {}
    for name, p in inner.named_parameters():
        if not p.requires_grad:
            continue
        if zero:
            from deepspeed.utils import safe_get_full_fp32_param

            out[name] = safe_get_full_fp32_param(p).detach().clone().cpu()
        elif hasattr(p, "full_tensor"):  # FSDP2 DTensor
            out[name] = p.full_tensor().detach().clone().cpu()
        else:
            out[name] = p.detach().clone().cpu()
    return out


def full_state(model, tam, key: str, zero: bool) -> dict:
    """Each tensor's whole optimizer state ``key``; under ZeRO through DeepSpeed's own API (what universal
    checkpoints and users call), which maps the flat state back through each parameter's fragments."""
    inner = getattr(model, "module", model)
    out = {}
    for name, p in inner.named_parameters():
        if not p.requires_grad:
            continue
        if zero:
            from deepspeed.utils import safe_get_full_optimizer_state

            out[name] = safe_get_full_optimizer_state(p, key).detach().clone().cpu()
        elif key in tam.state.get(p, {}):
            out[name] = tam.state[p][key].detach().clone().cpu()
    return out


def reference_damping(tam, model) -> dict:
    names = {id(p): n for n, p in getattr(model, "module", model).named_parameters()}
    d = tam.damping()["d"].tolist()
    ps = [p for g in tam.param_groups for p in g["params"] if "s" in tam.state[p]]
    return {names[id(p)]: [x] for p, x in zip(ps, d)}


def run(backend: str, case: str, out_dir: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))  # the process group starts with TrainingArguments
    stage = int(backend[4]) if backend.startswith("zero") else None  # zero{1,2,3}[-offload|-naive|...]
    accum = 2 if "accum" in backend else 1  # zero2-accum: batch 2 x 2 accumulation steps per rank
    if "tamtrainer" in backend:
        import tam_hf

        tam_hf.register()  # before TrainingArguments(optim="adatam"); undone at the end of this run
        try:
            return _run(backend, case, out_dir, world, stage, accum)
        finally:
            tam_hf.unregister()
    return _run(backend, case, out_dir, world, stage, accum)


def _run(backend, case, out_dir, world, stage, accum) -> None:
    opt_cls, opt_kwargs, lora = CASES[case]
    tmp = os.path.join(out_dir, "work", f"{backend}-{case}")  # shared by the ranks: checkpoints live here

    def make_args(max_steps, **extra):
        extra = {"save_strategy": "no", **extra}
        return TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=GLOBAL_BATCH // world // accum, max_steps=max_steps,
            gradient_accumulation_steps=accum,
            learning_rate=opt_kwargs["lr"], lr_scheduler_type="constant", use_cpu=True, report_to=[],
            logging_strategy="no", seed=0, data_seed=0,
            train_sampling_strategy="sequential", disable_tqdm=True, dataloader_num_workers=0,
            deepspeed=backend_ds_config(backend, stage) if stage else None,
            **(dict(optim=case.split("-")[0], weight_decay=opt_kwargs.get("weight_decay", 0.0))
               if "tamtrainer" in backend else {}),
            **extra,
        )

    def make_trainer(args, callbacks):
        model = build_model(lora)
        if "tamtrainer" in backend:  # the real TAMTrainer, optimizer chosen by args.optim
            assert case in ("adatam-full", "adatam-lora"), case
            return tam_trainer_class()(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)
        return ParityTrainer(model=model, args=args, train_dataset=Tokens(), opt_cls=opt_cls,
                             opt_kwargs=opt_kwargs, install=not backend.endswith("naive"), callbacks=callbacks)

    resume = None
    if "resume" in backend:  # 2 steps, checkpoint, then a fresh Trainer resumes to STEPS
        first = make_trainer(make_args(STEPS // 2, save_strategy="steps", save_steps=STEPS // 2), [])
        first.train()
        resume = os.path.join(tmp, f"checkpoint-{STEPS // 2}")
        _release(first, stage)
    counter = CountCollectives()
    trainer = make_trainer(make_args(STEPS), [counter])
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        counter.restore()
    tam, _ = find_torque_optimizer(trainer.optimizer)
    sharded = tam.stats_reducer
    gathered = {}
    if sharded is not None:
        damping = sharded.local_damping()
        gathered = sharded.gathered_damping()
    elif stage:  # the naive control: one "tensor" per flat partition
        damping = {"__flat__": tam.damping()["d"].tolist()}
    else:
        damping = reference_damping(tam, trainer.model_wrapped)
    result = {
        "params": full_params(trainer.model_wrapped, zero=stage is not None),
        "exp_avg": full_state(trainer.model_wrapped, tam, "exp_avg", zero=stage is not None)
        if "exp_avg" in tam.state_buffers and "naive" not in backend else {},
        "damping": damping,
        "allreduces": counter.allreduces,
        "steps_per_train_step": counter.steps_per_train_step,
        "n_groups": len(tam.param_groups),
        "installed": sharded is not None,
        "gathered_damping": gathered,
        "world": world,
        "global_step": trainer.state.global_step,
    }
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(result, os.path.join(out_dir, f"{backend}-{case}-rank{rank}.pt"))
    _release(trainer, stage)


def _release(trainer, stage) -> None:
    """Lets the next Trainer of this process start clean (another DeepSpeed config, or none)."""
    from accelerate.state import AcceleratorState

    engine = getattr(trainer, "deepspeed", None)
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()
    if stage:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    AcceleratorState._reset_state()


def guard(out_dir: str) -> None:
    """A Trainer built with each silently-swapping DeepSpeed config must refuse to start."""
    from tam_hf.trainer.distributed import DistributedConfigError

    bad = {
        "optimizer-block": {**ds_config(2), "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}},
        "offload-without-flag": {k: v for k, v in ds_config(2, offload=True).items()
                                 if k != "zero_force_ds_cpu_optimizer"},
    }
    messages = {}
    for name, cfg in bad.items():
        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(output_dir=tmp, use_cpu=True, report_to=[], max_steps=1, deepspeed=cfg,
                                     per_device_train_batch_size=4)
            try:
                ParityTrainer(model=build_model(False), args=args, train_dataset=Tokens(), opt_cls=AdaTAM,
                              opt_kwargs=dict(lr=5e-4))
                messages[name] = None
            except DistributedConfigError as e:
                messages[name] = str(e)
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
        from accelerate.state import AcceleratorState

        unset_hf_deepspeed_config()
        AcceleratorState._reset_state()
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(messages, os.path.join(out_dir, f"guard-rank{rank}.pt"))


def main() -> None:
    out_dir, backends = sys.argv[1], sys.argv[2:]
    cases = os.environ.get("PARITY_CASES", ",".join(CASES)).split(",")
    # In the order given: the first Trainer fixes accelerate's PartialState for the process (a DeepSpeed one
    # stays DeepSpeed), so put ddp first and guard after the runs.
    for backend in backends:
        if backend == "guard":
            guard(out_dir)
            continue
        if backend == "dtensor":  # last: needs the process group the Trainer runs started
            from dtensor_check import check, fsdp2_check

            if not dist.is_initialized():
                dist.init_process_group("gloo")
            check(out_dir)
            fsdp2_check(out_dir)
            continue
        backend, _, only = backend.partition(":")  # "zero3:tam-full+adatam-lora" runs only those cases
        for case in only.split("+") if only else cases:
            if backend.endswith("naive") and case != "adatam-full":
                continue
            run(backend, case, out_dir)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
