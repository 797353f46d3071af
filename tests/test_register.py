"""register() / unregister(): genuine OptimizerNames members everywhere transformers reads `optim`, every change
undone by unregister(), registry entries added later reach --optim, --optim_args checked when TrainingArguments
is built, a pickled training_args.bin that names tam_hf, a clear error on unsupported versions.
`python -m tam_hf.run` runs an unmodified stock script (plain, under torchrun) and console scripts (trl), and
registration reaches the processes they start through the environment variable and tam_hf's .pth hook."""

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers import trainer as trainer_module
from transformers import trainer_optimizer
from transformers.training_args import OptimizerNames

import tam_hf
from tam_hf import AdaTAM
from tam_hf.optim import registry
from tam_hf.optim.registry import OptimizerSpec
from tam_hf.trainer.autoregister import ENV, PTH_LINE, PTH_NAME
from tam_hf.trainer.callbacks import KEYS, DampingCallback
from tam_hf.trainer.distributed import TorqueStatsCallback
from tam_hf.trainer.optim_args import OptimArgsError
from tam_hf.trainer.register import check_transformers_version

from hf_tiny import (ArithmeticTokens, RecordS, assert_logged_damping, summary_of_optimizer_pt, summary_of_s,
                     tiny_llama, training_args)

ROOT = Path(__file__).resolve().parents[1]
STOCK_SCRIPT = ROOT / "tests" / "scripts" / "stock_clm.py"
NAMES = registry.torque_names()  # tam, adatam, adatamw, ...: whatever the registry lists


def transformers_state() -> dict:
    """Everything register() may change, as plain copies."""
    from transformers.training_args import TrainingArguments as TA

    return {
        "members": list(OptimizerNames),
        "member_map": dict(OptimizerNames._member_map_),
        "value2member": dict(OptimizerNames._value2member_map_),
        "member_names": list(OptimizerNames._member_names_),
        "class_attrs": {k: v for k, v in vars(OptimizerNames).items() if k.isupper()},
        "handlers": dict(trainer_optimizer._OPTIMIZER_HANDLERS),
        "callbacks": list(trainer_module.DEFAULT_CALLBACKS),
        "post_init": TA.__dict__["__post_init__"],
        "meta_path": list(sys.meta_path),
    }


def test_unregister_restores_transformers_exactly():
    tam_hf.unregister()  # whatever an earlier test in this process left registered
    before = transformers_state()
    assert not set(NAMES) & set(before["value2member"]) and DampingCallback not in before["callbacks"]
    try:
        assert tam_hf.register() == NAMES
        during = transformers_state()
        assert during != before and during["post_init"] is not before["post_init"]
        assert set(during["callbacks"]) - set(before["callbacks"]) == {DampingCallback, TorqueStatsCallback}
        assert len(during["handlers"]) == len(before["handlers"]) + len(NAMES)
    finally:
        assert tam_hf.unregister() == NAMES
    assert transformers_state() == before
    with pytest.raises(ValueError, match="adatam"):
        TrainingArguments(output_dir="x", optim="adatam")
    assert tam_hf.unregister() == ()  # nothing left to undo


def test_register_on_import_is_undone_before_it_fires():
    from tam_hf.trainer.register import register_on_import

    tam_hf.unregister()
    before = transformers_state()
    register_on_import()  # every module is imported already: applied at once
    assert OptimizerNames("adatam") is OptimizerNames.ADATAM
    tam_hf.unregister()
    assert transformers_state() == before


@pytest.mark.usefixtures("registered")
def test_register_is_idempotent():
    members = [OptimizerNames(n) for n in NAMES]
    count = len(OptimizerNames)
    assert tam_hf.register() == NAMES
    assert tam_hf.register() == NAMES
    assert all(a is OptimizerNames(n) for a, n in zip(members, NAMES))
    assert len(OptimizerNames) == count
    assert trainer_module.DEFAULT_CALLBACKS.count(DampingCallback) == 1
    assert trainer_module.DEFAULT_CALLBACKS.count(TorqueStatsCallback) == 1
    assert all(trainer_optimizer._OPTIMIZER_HANDLERS.get(m) is not None for m in members)


def test_members_keep_their_identity_across_unregister_and_register(registered):
    args = TrainingArguments(output_dir="x", optim="adatam")
    tam_hf.unregister()
    tam_hf.register()
    assert args.optim is OptimizerNames.ADATAM


@pytest.mark.usefixtures("registered")
def test_names_are_genuine_enum_members():
    member = OptimizerNames("adatam")
    assert member is OptimizerNames.ADATAM and member is OptimizerNames["ADATAM"]
    assert isinstance(member, OptimizerNames) and member == "adatam" and member.value == "adatam"
    assert member.name == "ADATAM" and member in list(OptimizerNames)
    assert [m.value for m in OptimizerNames][-len(NAMES):] == list(NAMES)
    assert {"tam", "adatam", "adatamw"} <= set(NAMES)
    assert TrainingArguments(output_dir="x", optim="adatamw").optim is OptimizerNames.ADATAMW


@pytest.mark.usefixtures("registered")
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


class MyTAM(AdaTAM):
    """A registry entry added after import, known to nothing else in tam_hf."""


def test_registry_entries_added_later_reach_optim_and_the_trainer(registered, request, tmp_path):
    registry.add(OptimizerSpec("mytam", MyTAM, "adam", torque=True))
    request.addfinalizer(lambda: registry.OPTIMIZERS.pop("mytam", None))
    with pytest.raises(ValueError, match="mytam"):  # not before register() runs again
        TrainingArguments(output_dir=str(tmp_path), optim="mytam")
    assert "mytam" in tam_hf.register()
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "mytam",
                                                  "--optim_args", "decay_rate=0.8", "--adam_beta1", "0.85",
                                                  "--use_cpu", "--report_to", "none"])
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=ArithmeticTokens())
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is MyTAM
    assert optimizer.param_groups[0]["decay_rate"] == 0.8 and optimizer.param_groups[0]["betas"][0] == 0.85
    with pytest.raises(OptimArgsError, match="did you mean 'decay_rate'"):
        TrainingArguments(output_dir=str(tmp_path), optim="mytam", optim_args="decay_rat=0.8")
    assert "mytam" in tam_hf.unregister()
    assert "mytam" not in OptimizerNames._value2member_map_


@pytest.mark.usefixtures("registered")
@pytest.mark.parametrize("optim, optim_args, message", [
    ("adatam", "decay_rat=0.95", "unknown key 'decay_rat' (did you mean 'decay_rate'?)"),
    ("adatam", "decay_rate=abc", "decay_rate: 'abc' is not a valid float"),
    ("adatam", "decay_rate=1.5", "Invalid decay_rate value: 1.5"),
    ("adatam", "lr=0.1", "'lr' is set by --learning_rate"),
    ("adatam", "betas=0.8", "'betas' is set by --adam_beta1 / --adam_beta2"),
    ("tam", "momentum=0.5", "'momentum' is set by --adam_beta1"),
])
def test_bad_optim_args_fail_when_training_arguments_are_parsed(tmp_path, optim, optim_args, message):
    parser = HfArgumentParser(TrainingArguments)
    with pytest.raises(OptimArgsError) as err:
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", optim,
                                            "--optim_args", optim_args])
    assert message in str(err.value) and "Valid --optim_args keys: " in str(err.value)
    assert "cosine_scope" in str(err.value).split("Valid --optim_args keys: ")[1]


@pytest.mark.usefixtures("registered")
def test_other_optimizers_keep_their_own_optim_args(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), optim="sgd", optim_args="nesterov=true,momentum=0.9")
    assert args.optim_args == "nesterov=true,momentum=0.9"


@pytest.mark.usefixtures("registered")
def test_plain_trainer_logs_the_optimizers_damping_at_each_logged_step(tmp_path):
    record = RecordS()
    args = training_args(tmp_path, optim="adatam", adam_beta1=0.85, max_steps=6, logging_steps=2,
                         save_strategy="steps", save_steps=6)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=ArithmeticTokens(), callbacks=[record])
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("DampingCallback") == names.index("DefaultFlowCallback") + 1
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert type(opt) is AdaTAM and opt.param_groups[0]["betas"] == (0.85, 0.999)

    saved = json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    logged = [e for e in saved if "loss" in e]
    assert [e["step"] for e in logged] == [2, 4, 6]
    for entry in logged:
        assert_logged_damping(entry, summary_of_s(record.by_step[entry["step"]]))
    assert_logged_damping(logged[-1], summary_of_optimizer_pt(tmp_path / "checkpoint-6" / "optimizer.pt"))
    assert len({e["damping/mean"] for e in logged}) == 3  # it moves: a stale value would not match


def test_training_args_bin_refers_to_tam_hf(registered, tmp_path):
    args = training_args(tmp_path, optim="adatam")
    torch.save(args, tmp_path / "training_args.bin")
    tam_hf.unregister()  # a fresh process: loading registers the names by itself
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


# ----------------------------------------------------------------------------------- python -m tam_hf.run


def _env(**extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop(ENV, None)
    return {**env, **extra}


def _run(cmd, tmp_path, **env):
    return subprocess.run(cmd, cwd=tmp_path, env=_env(**env), capture_output=True, text=True, timeout=300)


STOCK_ARGS = ["--optim", "adatam", "--optim_args", "decay_rate=0.95", "--learning_rate", "5e-4",
              "--max_steps", "4", "--logging_steps", "2", "--per_device_train_batch_size", "4",
              "--save_strategy", "steps", "--save_steps", "4", "--report_to", "none", "--use_cpu",
              "--disable_tqdm", "true"]


def _check_result(out_dir, proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out_dir / "result.json").read_text())
    assert result["optimizer"] == "AdaTAM"
    assert result["param_groups"][0]["decay_rate"] == 0.95
    steps = [e for e in result["log_history"] if "loss" in e]
    assert [e["step"] for e in steps] == [2, 4]
    # The last logged damping is the one the checkpoint's optimizer state gives (rank 0's, = every rank's: DDP)
    assert_logged_damping(steps[-1], summary_of_optimizer_pt(out_dir / "checkpoint-4" / "optimizer.pt"))
    assert set(KEYS) <= set(steps[0]) and steps[0]["damping/mean"] != steps[-1]["damping/mean"]
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


def test_bad_optim_args_stop_the_stock_script_before_its_model_with_exit_2(tmp_path):
    args = [a if a != "decay_rate=0.95" else "decay_rat=0.95" for a in STOCK_ARGS]
    proc = _run([sys.executable, "-m", "tam_hf.run", str(STOCK_SCRIPT), "--output_dir", str(tmp_path / "out"),
                 *args], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "stock_clm: model built" not in proc.stdout
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == [
        "stock_clm.py: error: invalid --optim_args 'decay_rat=0.95' for --optim adatam: unknown key 'decay_rat' "
        "(did you mean 'decay_rate'?). Valid --optim_args keys: bias_correction, cosine_scope, damping_eps, "
        "decay_rate, decoupled_weight_decay, fixed_damping, maximize, moment_dtype"]


@pytest.mark.usefixtures("registered")
@pytest.mark.parametrize("optim_args, message", [
    ("decay_rat=0.95", "unknown key 'decay_rat' (did you mean 'decay_rate'?)"),
    ("damping_eps=-1", "damping_eps"),
    ("eps=1e-6", "'eps' is set by --adam_epsilon"),
])
def test_run_turns_bad_optim_args_into_one_line_and_exit_2(tmp_path, monkeypatch, capsys, optim_args, message):
    import transformers.models.llama.modeling_llama as modeling_llama

    from tam_hf.run import main

    built = []
    monkeypatch.setattr(modeling_llama.LlamaForCausalLM, "__init__", lambda self, *a, **k: built.append(1))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv(ENV, "0")  # main() sets it; restored after
    with pytest.raises(SystemExit) as exit_:
        main([str(STOCK_SCRIPT), "--output_dir", str(tmp_path), "--optim", "adatam", "--optim_args", optim_args])
    assert exit_.value.code == 2 and not built
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and err[0].startswith("stock_clm.py: error: ") and message in err[0]


def test_run_without_a_script_prints_usage(capsys):
    from tam_hf.run import main

    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2 and "usage: python -m tam_hf.run SCRIPT.py" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["no-such-script-or-command"])
    assert exit_.value.code == 2 and "neither a file nor a console script" in capsys.readouterr().err


PROBE = """
import json, sys
from transformers.training_args import OptimizerNames
json.dump({"argv": sys.argv, "name": __name__, "path0": sys.path[0], "adatam": "adatam" in [m.value for m in OptimizerNames]},
          open(sys.argv[-1], "w"))
"""


@pytest.mark.usefixtures("registered")
@pytest.mark.parametrize("form", ["script", "module"])
def test_run_sets_argv_and_path_like_python_does(tmp_path, monkeypatch, form):
    from tam_hf.run import main

    tam_hf.unregister()  # main() registers by itself
    (tmp_path / "probe_mod.py").write_text(PROBE)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path] if form == "module" else list(sys.path))
    monkeypatch.setenv(ENV, "0")  # main() sets it; restored after
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
    assert os.environ[ENV] == "1"  # for the processes the script starts


@pytest.mark.usefixtures("registered")
@pytest.mark.parametrize("form", ["name", "path"])
def test_run_takes_a_console_script_by_name_or_path(monkeypatch, capsys, form):
    from tam_hf.run import main

    trl = shutil.which("trl", path=os.path.dirname(sys.executable))
    assert trl, "trl's console script is installed with the dev extras"
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv(ENV, "0")  # main() sets it; restored after
    with pytest.raises(SystemExit) as exit_:
        main(["trl" if form == "name" else trl, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: trl" in out and "sft" in out
    assert os.path.basename(sys.argv[0]) == "trl"


# ----------------------------------------------------------------- child processes: env variable + .pth hook


LAZY_PROBE = """
import sys
{arm}
assert "transformers" not in sys.modules and "torch" not in sys.modules, "imported at start"
from transformers import Trainer  # imports training_args half-way through trainer.py
from transformers import trainer, trainer_optimizer
from transformers.training_args import OptimizerNames
print(sorted(m.value for m in OptimizerNames if m.value in {names!r}),
      [c.__name__ for c in trainer.DEFAULT_CALLBACKS],
      sum(k in {names!r} for k in trainer_optimizer._OPTIMIZER_HANDLERS))
"""


@pytest.mark.parametrize("value, registers", [("1", True), (None, False)])
def test_the_child_hook_registers_lazily_and_only_when_the_variable_is_set(tmp_path, value, registers):
    arm = "from tam_hf.trainer.autoregister import activate; activate()"
    proc = _run([sys.executable, "-c", LAZY_PROBE.format(arm=arm, names=list(NAMES))], tmp_path,
                **({ENV: value} if value else {}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    if registers:
        assert proc.stdout.split("\n")[0] == (
            f"{sorted(NAMES)} ['DefaultFlowCallback', 'DampingCallback', 'TorqueStatsCallback'] {len(NAMES)}")
    else:
        assert proc.stdout.split("\n")[0] == "[] ['DefaultFlowCallback'] 0"


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def test_the_pth_hook_is_installed_with_the_package():
    """The build (setup.py) writes tam_hf/trainer/tam_hf-register.pth into site-packages; without it, `trl sft`
    and launchers started under `python -m tam_hf.run` fail with "invalid choice: 'adatam'"."""
    shipped = ROOT / "tam_hf" / "trainer" / PTH_NAME
    assert shipped.read_text() == PTH_LINE
    installed = _site_packages() / PTH_NAME
    assert installed.is_file(), f"{installed} is missing: reinstall tam_hf (pip install -e .)"
    assert installed.read_text() == PTH_LINE


def test_the_pth_hook_arms_registration_at_interpreter_start(tmp_path):
    if not (_site_packages() / PTH_NAME).is_file():
        pytest.fail(f"{PTH_NAME} is not installed (see test_the_pth_hook_is_installed_with_the_package)")
    proc = _run([sys.executable, "-c", LAZY_PROBE.format(arm="", names=list(NAMES))], tmp_path, **{ENV: "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"{sorted(NAMES)} ['DefaultFlowCallback', 'DampingCallback'")


def _tiny_llama_dir(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    assets = ROOT / "tam_hf" / "assets" / "tiny-llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig.from_pretrained(assets)).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(assets / name, path / name)
    return path


def test_trl_sft_console_script_trains_with_adatam_in_its_relaunched_process(tmp_path):
    """`trl sft` parses its arguments, then re-launches its script through `accelerate launch` in a NEW process:
    that process must know --optim adatam too (before: `sft.py: error: argument --optim: invalid choice`)."""
    model = _tiny_llama_dir(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(ROOT / "tam_hf" / "assets" / "demo_train.jsonl", data / "train.jsonl")  # prompt / completion
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tam_hf.run", "trl", "sft", "--model_name_or_path", str(model),
           "--dataset_name", str(data), "--optim", "adatam", "--optim_args", "decay_rate=0.8",
           "--learning_rate", "5e-4", "--max_steps", "3", "--logging_steps", "1", "--per_device_train_batch_size",
           "4", "--save_strategy", "steps", "--save_steps", "3", "--report_to", "none", "--use_cpu",
           "--output_dir", str(out)]
    proc = _run(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Training completed" in proc.stdout
    log = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    logged = [e for e in log if "loss" in e]
    assert [e["step"] for e in logged] == [1, 2, 3] and all(set(KEYS) <= set(e) for e in logged)
    assert_logged_damping(logged[-1], summary_of_optimizer_pt(out / "checkpoint-3" / "optimizer.pt"))
    groups = torch.load(out / "checkpoint-3" / "optimizer.pt", weights_only=True)["param_groups"]
    assert groups[0]["decay_rate"] == 0.8 and "damping_eps" in groups[0]  # AdaTAM's groups, --optim_args applied
