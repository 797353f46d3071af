"""register(): genuine OptimizerNames members everywhere transformers reads `optim`, idempotent, a clear error
on unsupported versions, a pickled training_args.bin that names tam_hf; `python -m tam_hf.run` runs an
unmodified stock script with --optim adatam (plain, and under torchrun)."""

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers import trainer as trainer_module
from transformers import trainer_optimizer
from transformers.training_args import OptimizerNames

import tam_hf
from tam_hf import AdaTAM
from tam_hf.trainer.callbacks import KEYS, DampingCallback
from tam_hf.trainer.register import check_transformers_version

from hf_tiny import ArithmeticTokens, tiny_llama, training_args

ROOT = Path(__file__).resolve().parents[1]
STOCK_SCRIPT = ROOT / "tests" / "scripts" / "stock_clm.py"
NAMES = ("tam", "adatam", "adatamw")

tam_hf.trainer.register()


def test_register_is_idempotent():
    members = [OptimizerNames(n) for n in NAMES]
    count = len(OptimizerNames)
    assert tam_hf.trainer.register() == NAMES
    assert tam_hf.trainer.register() == NAMES
    assert [OptimizerNames(n) for n in NAMES] == members and all(a is b for a, b in zip(members, [OptimizerNames(n) for n in NAMES]))
    assert len(OptimizerNames) == count
    assert trainer_module.DEFAULT_CALLBACKS.count(DampingCallback) == 1
    assert all(trainer_optimizer._OPTIMIZER_HANDLERS.get(m) is not None for m in members)


def test_names_are_genuine_enum_members():
    member = OptimizerNames("adatam")
    assert member is OptimizerNames.ADATAM and member is OptimizerNames["ADATAM"]
    assert isinstance(member, OptimizerNames) and member == "adatam" and member.value == "adatam"
    assert member.name == "ADATAM" and member in list(OptimizerNames)
    assert list(OptimizerNames)[-3:] == [OptimizerNames.TAM, OptimizerNames.ADATAM, OptimizerNames.ADATAMW]
    assert TrainingArguments(output_dir="x", optim="adatamw").optim is OptimizerNames.ADATAMW


def test_argparse_choices_and_json_yaml_parsing_accept_the_names(tmp_path):
    parser = HfArgumentParser(TrainingArguments)
    action = next(a for a in parser._actions if a.dest == "optim")
    assert set(NAMES) <= set(action.choices)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "adatam"])
    assert args.optim is OptimizerNames.ADATAM
    (args,) = parser.parse_dict({"output_dir": str(tmp_path), "optim": "tam"})
    assert args.optim is OptimizerNames.TAM
    (tmp_path / "a.json").write_text(json.dumps({"output_dir": str(tmp_path), "optim": "adatamw"}))
    assert parser.parse_json_file(str(tmp_path / "a.json"))[0].optim is OptimizerNames.ADATAMW
    (tmp_path / "a.yaml").write_text(f"output_dir: {tmp_path}\noptim: adatam\n")
    assert parser.parse_yaml_file(str(tmp_path / "a.yaml"))[0].optim is OptimizerNames.ADATAM
    assert json.loads(args.to_json_string())["optim"] == "tam"  # JSON stores the plain string


def test_plain_trainer_builds_adatam_and_logs_damping(tmp_path):
    args = training_args(tmp_path, optim="adatam", adam_beta1=0.85, max_steps=3)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=ArithmeticTokens())
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("DampingCallback") == names.index("DefaultFlowCallback") + 1
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert type(opt) is AdaTAM and opt.param_groups[0]["betas"] == (0.85, 0.999)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0] and len(opt.param_groups) == 2
    assert all(set(KEYS) <= set(e) for e in trainer.state.log_history if "loss" in e)


def test_training_args_bin_refers_to_tam_hf(tmp_path):
    args = training_args(tmp_path, optim="adatam")
    torch.save(args, tmp_path / "training_args.bin")
    loaded = torch.load(tmp_path / "training_args.bin", weights_only=False)
    assert loaded.optim is OptimizerNames.ADATAM

    raw = pickle.dumps(args)
    assert b"tam_hf.trainer.register" in raw and b"restore_optim_name" in raw

    class WithoutTamHF(pickle.Unpickler):  # what an environment without tam_hf sees
        def find_class(self, module, name):
            if module.split(".")[0] == "tam_hf":
                raise ModuleNotFoundError(f"No module named {module!r}")
            return super().find_class(module, name)

    with pytest.raises(ModuleNotFoundError, match="tam_hf"):
        WithoutTamHF(io.BytesIO(raw)).load()
    # Built-in names are untouched: they still pickle as OptimizerNames("adamw_torch").
    assert b"tam_hf" not in pickle.dumps(training_args(tmp_path, optim="adamw_torch"))


@pytest.mark.parametrize("version, ok", [("5.1.0", False), ("5.2.0", True), ("5.24.0", True), ("5.30.0.dev0", True), ("6.0.0", False), ("4.57.1", False)])
def test_unsupported_transformers_versions_fail_clearly(version, ok):
    if ok:
        check_transformers_version(version)
    else:
        with pytest.raises(RuntimeError, match=rf"transformers>=5\.2\.0,<6\.0\.0 \(found {version}\)"):
            check_transformers_version(version)


def _run(cmd, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)


STOCK_ARGS = ["--optim", "adatam", "--optim_args", "decay_rate=0.95", "--learning_rate", "5e-4",
              "--max_steps", "4", "--logging_steps", "2", "--per_device_train_batch_size", "4",
              "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true"]


def _check_result(out_dir, proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out_dir / "result.json").read_text())
    assert result["optimizer"] == "AdaTAM"
    assert result["param_groups"][0]["decay_rate"] == 0.95
    steps = [e for e in result["log_history"] if "loss" in e]
    assert [e["step"] for e in steps] == [2, 4] and all(set(KEYS) <= set(e) for e in steps)
    return result


def test_stock_script_runs_with_adatam_through_tam_hf_run(tmp_path):
    code = STOCK_SCRIPT.read_text().split('"""', 2)[2]  # after the docstring
    assert "tam_hf" not in code and "HfArgumentParser(TrainingArguments)" in code and "Trainer(" in code

    out = tmp_path / "out"
    proc = _run([sys.executable, "-m", "tam_hf.run", str(STOCK_SCRIPT), "--output_dir", str(out), *STOCK_ARGS], tmp_path)
    assert _check_result(out, proc)["world_size"] == 1


def test_stock_script_under_torchrun_m_tam_hf_run(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tam_hf.run", str(STOCK_SCRIPT), "--output_dir", str(out), *STOCK_ARGS]
    assert _check_result(out, _run(cmd, tmp_path))["world_size"] == 2


def test_run_without_a_script_prints_usage(capsys):
    from tam_hf.run import main

    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2 and "usage: python -m tam_hf.run SCRIPT.py" in capsys.readouterr().err


PROBE = """
import json, sys
from transformers.training_args import OptimizerNames
json.dump({"argv": sys.argv, "name": __name__, "path0": sys.path[0], "adatam": "adatam" in [m.value for m in OptimizerNames]},
          open(sys.argv[-1], "w"))
"""


@pytest.mark.parametrize("form", ["script", "module"])
def test_run_sets_argv_and_path_like_python_does(tmp_path, monkeypatch, form):
    from tam_hf.run import main

    (tmp_path / "probe_mod.py").write_text(PROBE)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path] if form == "module" else list(sys.path))
    out = str(tmp_path / "probe.json")
    if form == "script":
        main([str(tmp_path / "probe_mod.py"), "--flag", out])
    else:
        main(["-m", "probe_mod", "--flag", out])
    seen = json.loads(Path(out).read_text())
    assert seen["name"] == "__main__" and seen["adatam"]
    assert seen["argv"][1:] == ["--flag", out] and seen["argv"][0].endswith("probe_mod.py")
    if form == "script":
        assert seen["path0"] == str(tmp_path)
