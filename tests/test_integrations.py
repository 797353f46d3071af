"""tam_hf.integrations against the tools' interfaces.

axolotl (8 minutes and 4 GB to install) and LLaMA-Factory (pins transformers <= 5.6) cannot live in the test
environment, so their plugins run here against recorded interfaces: stand-in modules with the names, signatures
and call order of axolotl 0.19.0 and LLaMA-Factory 0.9.5, noted where each is defined. The real tools are run by
scripts/check_integrations.sh (README, "Inside axolotl, LLaMA-Factory and torchtune"). The torchtune logger needs
only torch: it wraps whatever metric logger torchtune instantiated, duck-typed like torchtune 0.6.1's.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import types

import pytest
import torch

import tam_hf
from hf_tiny import ArithmeticTokens, tiny_llama, training_args
from tam_hf.integrations import axolotl as tam_axolotl
from tam_hf.integrations.example import write_example
from tam_hf.integrations.torchtune import DampingLogger, HFTokenizer, damping_metrics
from tam_hf.trainer.callbacks import KEYS, DampingCallback


def _stub_modules(monkeypatch, names: dict[str, dict]) -> None:
    for name, attrs in names.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)


# ------------------------------------------------------------------------------------------------ axolotl


class RecordedBasePlugin:
    """axolotl 0.19.0's axolotl.integrations.base.BasePlugin, the hooks this integration relies on:
    cli/config.py prepare_plugins() calls ``plugin.register(cfg)`` before validating the config (whose
    ``optimizer`` must then be an OptimizerNames value) and ``on_config_validation_error(cfg)`` if validation
    fails; train.py calls ``post_trainer_create(cfg, trainer)`` once the Trainer exists."""

    def register(self, cfg):
        pass

    def on_config_validation_error(self, cfg):
        pass

    def post_trainer_create(self, cfg, trainer):
        pass


@pytest.fixture
def axolotl_stub(monkeypatch):
    _stub_modules(monkeypatch, {"axolotl": {}, "axolotl.integrations": {},
                                "axolotl.integrations.base": {"BasePlugin": RecordedBasePlugin}})
    tam_axolotl._plugin_class.cache_clear()
    yield
    tam_axolotl._plugin_class.cache_clear()
    tam_hf.unregister()


def _load_plugin(dotted: str):
    """What axolotl's load_plugin() does with a ``plugins:`` entry."""
    module_name, class_name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), class_name)()


def test_axolotl_plugin_registers_names_and_logs_damping(axolotl_stub, tmp_path):
    from transformers import Trainer
    from transformers.trainer_callback import DefaultFlowCallback
    from transformers.training_args import OptimizerNames

    plugin = _load_plugin("tam_hf.integrations.axolotl.TAMPlugin")
    assert isinstance(plugin, RecordedBasePlugin) and type(plugin).__module__ == "tam_hf.integrations.axolotl"
    cfg = {"optimizer": "adatamw", "optim_args": "decay_rate=0.9"}
    plugin.register(cfg)
    assert OptimizerNames("adatamw").value == "adatamw"

    args = training_args(tmp_path, optim="adatamw", optim_args=cfg["optim_args"], max_steps=3)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=ArithmeticTokens())  # AxolotlTrainer's base
    callbacks = trainer.callback_handler.callbacks
    callbacks[:] = [c for c in callbacks if not isinstance(c, DampingCallback)]  # as if built without it
    plugin.post_trainer_create(cfg, trainer)
    plugin.post_trainer_create(cfg, trainer)  # idempotent
    flow = next(i for i, c in enumerate(callbacks) if isinstance(c, DefaultFlowCallback))
    assert [i for i, c in enumerate(callbacks) if isinstance(c, DampingCallback)] == [flow + 1]

    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 3 and all(set(KEYS) <= set(e) for e in logged)
    assert type(trainer.optimizer.optimizer).__name__ == "AdaTAMW"


def test_axolotl_plugin_checks_optim_args_when_arguments_are_built(axolotl_stub, tmp_path):
    _load_plugin("tam_hf.integrations.axolotl.TAMPlugin").register({})
    with pytest.raises(ValueError, match="did you mean 'decay_rate'"):
        training_args(tmp_path, optim="adatamw", optim_args="decay_rat=0.9")


def test_axolotl_plugin_undoes_registration_when_the_config_is_rejected(axolotl_stub):
    from transformers.training_args import OptimizerNames

    plugin = _load_plugin("tam_hf.integrations.axolotl.TAMPlugin")
    plugin.register({})
    plugin.on_config_validation_error({})
    with pytest.raises(ValueError):
        OptimizerNames("adatamw")


def test_integration_modules_import_without_their_tools():
    code = ("import sys, tam_hf.integrations.axolotl, tam_hf.integrations.torchtune, tam_hf.integrations.llamafactory;"
            "print(sorted(m for m in ('axolotl', 'llamafactory', 'torchtune', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    with pytest.raises(ModuleNotFoundError, match="axolotl"):
        tam_axolotl.TAMPlugin


# ------------------------------------------------------------------------------------------- LLaMA-Factory


class RecordedOptimizerPlugin:
    """LLaMA-Factory 0.9.5's v1 plugin registry (llamafactory.v1.utils.plugin.BasePlugin, of which
    trainer_plugins.optimizer.OptimizerPlugin is an empty subclass): ``OptimizerPlugin(name).register()`` is a
    decorator storing the builder under ``name``; the v1 trainer calls
    ``OptimizerPlugin(optim_config.name)(model, optim_config)`` with ``optim_config`` a dict subclass."""

    _registry: dict = {}

    def __init__(self, name):
        self.name = name

    def register(self, method_name="__call__"):
        def decorator(func):
            self._registry.setdefault(self.name, {})[method_name] = func
            return func
        return decorator

    def __call__(self, *args, **kwargs):
        return self._registry[self.name]["__call__"](*args, **kwargs)


@pytest.fixture
def llamafactory_stub(monkeypatch):
    monkeypatch.setattr(RecordedOptimizerPlugin, "_registry", {})
    _stub_modules(monkeypatch, {
        "llamafactory": {}, "llamafactory.v1": {}, "llamafactory.v1.plugins": {},
        "llamafactory.v1.plugins.trainer_plugins": {},
        "llamafactory.v1.plugins.trainer_plugins.optimizer": {"OptimizerPlugin": RecordedOptimizerPlugin}})


def test_llamafactory_v1_builds_every_tam_optimizer(llamafactory_stub):
    from tam_hf.integrations.llamafactory import register
    from tam_hf.optim import registry

    assert register() == registry.torque_names() and set(RecordedOptimizerPlugin._registry) == set(
        registry.torque_names())
    model = tiny_llama()
    config = {"name": "adatamw", "lr": 2e-3, "betas": [0.8, 0.99], "weight_decay": 0.01, "decay_rate": "0.95",
              "cosine_scope": "global"}
    optimizer = RecordedOptimizerPlugin("adatamw")(model, config)
    assert type(optimizer) is tam_hf.AdaTAMW
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.01 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert (decay["lr"], decay["betas"], decay["decay_rate"], decay["cosine_scope"]) == (
        2e-3, (0.8, 0.99), 0.95, "global")
    tam = RecordedOptimizerPlugin("tam")(model, {"name": "tam", "lr": 0.05, "momentum": 0.8})
    assert type(tam) is tam_hf.TAM and tam.param_groups[0]["momentum"] == 0.8


@pytest.mark.parametrize("config, message", [
    ({"lr": 1e-3, "decay_rat": 0.9}, "unknown key 'decay_rat' (did you mean 'decay_rate'?)"),
    ({"decay_rate": 0.9}, "lr is required"),
    ({"lr": 1e-3, "decay_rate": 1.5}, "decay_rate"),
    ({"lr": 1e-3, "cosine_scope": "layer"}, "Invalid cosine_scope value: 'layer'"),
])
def test_llamafactory_v1_config_is_checked_like_optim_args(llamafactory_stub, config, message):
    from tam_hf.integrations.llamafactory import register

    register()
    with pytest.raises(ValueError, match=r"LLaMA-Factory optim_config \(name: adatamw\): .*" + re.escape(message)):
        RecordedOptimizerPlugin("adatamw")(tiny_llama(), {"name": "adatamw", **config})


# ----------------------------------------------------------------------------------------------- torchtune


class RecordingLogger:
    """torchtune 0.6.1's MetricLoggerInterface: log, log_dict, log_config, close."""

    def __init__(self):
        self.calls = []

    def log(self, name, data, step):
        self.calls.append(("log", name, data, step))

    def log_dict(self, payload, step):
        self.calls.append(("log_dict", payload, step))

    def log_config(self, config):
        self.calls.append(("log_config", config))

    def close(self):
        self.calls.append(("close",))


def _steps(optimizers, params, n=3):
    for _ in range(n):
        for p in params:
            p.grad = torch.randn_like(p)
        for o in optimizers:
            o.step()


def test_damping_logger_adds_damping_to_each_log_dict():
    inner = RecordingLogger()
    logger = DampingLogger(logger=inner)
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
    optimizer = tam_hf.AdaTAMW(params, lr=1e-2)
    logger.log_dict({"loss": 1.0}, step=0)  # before any step: nothing to add
    _steps([optimizer], params)
    logger.log_dict({"loss": 0.5, "lr": 1e-2}, step=3)
    logger.log_config({"a": 1})
    logger.log("loss", 0.4, 4)
    logger.close()
    summary = optimizer.damping_summary()
    assert inner.calls == [
        ("log_dict", {"loss": 1.0}, 0),
        ("log_dict", {"loss": 0.5, "lr": 1e-2, **{f"damping/{k}": summary[k] for k in summary}}, 3),
        ("log_config", {"a": 1}), ("log", "loss", 0.4, 4), ("close",)]
    assert {f"damping/{k}" for k in summary} == set(KEYS)  # the Trainer telemetry's keys


def test_damping_logger_pools_per_parameter_optimizers():
    """optimizer_in_bwd: one optimizer per parameter, each stepped from its gradient hook."""
    inner = RecordingLogger()
    logger = DampingLogger(logger=inner)
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(4)]
    optimizers = [tam_hf.AdaTAMW([p], lr=1e-2) for p in params]
    _steps(optimizers, params)
    logger.log_dict({}, step=1)
    logger.close()
    d = torch.cat([o.damping()["d"] for o in optimizers])
    logged = inner.calls[0][1]
    assert logged["damping/mean"] == pytest.approx(d.mean().item())
    assert (logged["damping/min"], logged["damping/max"]) == (d.min().item(), d.max().item())
    assert logged["damping/frac_below_half"] == pytest.approx((d < 0.5).double().mean().item())


def test_damping_logger_ignores_other_optimizers_and_unhooks_on_close():
    inner = RecordingLogger()
    logger = DampingLogger(logger=inner)
    params = [torch.nn.Parameter(torch.randn(3))]
    _steps([torch.optim.AdamW(params)], params)
    logger.log_dict({"loss": 1.0}, step=1)
    logger.close()
    _steps([tam_hf.AdaTAMW(params)], params)  # after close: not seen
    assert not logger._stepped
    assert inner.calls[0] == ("log_dict", {"loss": 1.0}, 1)
    assert damping_metrics([torch.optim.SGD(params, lr=0.1)]) == {}


# ------------------------------------------------------------------------------- example material, tokenizer


def test_example_checkpoint_loads_in_transformers_and_tokenizes_alike(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = write_example(tmp_path / "tam_tiny")
    model, info = AutoModelForCausalLM.from_pretrained(folder / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 168 and rows[0]["text"] == rows[0]["prompt"] + rows[0]["completion"]
    assert json.loads((folder / "dataset_info.json").read_text())["tam_demo"]["file_name"] == "train.jsonl"

    hf = AutoTokenizer.from_pretrained(folder / "model")
    tok = HFTokenizer(str(folder / "model"), max_seq_len=32)
    text = rows[0]["text"]
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids == [hf.bos_token_id] + hf(text, add_special_tokens=False)["input_ids"] + [hf.eos_token_id]
    assert tok.pad_id == hf.pad_token_id and tok.max_seq_len == 32 and tok.decode(ids[1:-1]) == text
    # the weights train: a loss near ln(vocab) at the start, as from transformers' own initialisation
    batch = hf(text, return_tensors="pt")
    assert model(**batch, labels=batch["input_ids"]).loss.item() == pytest.approx(5.87, abs=0.3)
