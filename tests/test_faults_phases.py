"""Faults outside the training loop: every phase of a run (plan, build, train, save, evaluate, lm-eval,
publish) ends cleanly. A full disk or a file-size limit while saving, a signal during the final save or the
evaluation, SIGHUP, an error no one foresaw: one message naming the phase and what was kept, ``summary.json``
saying so, what was half-written removed, the lock released, and a rerun with ``resume: true`` that continues.
Resume never mixes runs: another optimizer, learning rate or training data is refused before anything loads,
and so is continuing a checkpoint inside another run's directory."""

import json
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch
from hf_tiny import complete, read_summary, run_raw, run_recipe, set_fields
from transformers import Trainer, TrainerCallback

from tam_hf.finetune.errors import ModelError, OutputDirError, ResumeError, RunFailed, WriteError
from tam_hf.finetune.outputs import LOCK_NAME
from tam_hf.finetune.pipeline import finetune
from tam_hf.finetune.config.load import validate_recipe


def _signal_at(monkeypatch, cls, method, signum, when=lambda *args, **kwargs: True):
    """Send `signum` to this process when `cls.method` starts (once, the first time `when` holds), then let it run."""
    real = getattr(cls, method)
    sent = []

    def wrapped(self, *args, **kwargs):
        if not sent and when(*args, **kwargs):
            sent.append(signum)
            signal.raise_signal(signum)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, wrapped)


# ---------------------------------------------------------------------------------------------- writing


def test_a_full_disk_while_saving_a_checkpoint_is_named_and_the_half_checkpoint_removed(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f) and str(f).endswith("optimizer.pt"):  # what a 600 KiB tmpfs did
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1088 vs 1024")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(WriteError) as info:
        finetune(run_recipe(out, max_steps=6, save_steps=2))
    message = str(info.value)
    assert info.value.exit_code == 1 and "\n" not in message
    assert "no space left" in message and "while saving checkpoint-4" in message and "checkpoint-2" in message
    assert not (out / "checkpoint-4").exists() and complete(out / "checkpoint-2")
    summary = read_summary(out)
    assert summary["status"] == "failed" and summary["phase"] == "train" and "checkpoint-4" in summary["reason"]
    assert not (out / LOCK_NAME).exists()
    monkeypatch.undo()
    resumed = finetune(set_fields(run_recipe(out, max_steps=6, save_steps=2), resume=True))
    assert resumed["status"] == "completed" and resumed["resumed_from"] == str(out / "checkpoint-2")


def test_a_file_size_limit_hit_by_the_final_save_keeps_the_checkpoint_and_removes_the_partial_model(tmp_path):
    out = tmp_path / "out"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # The checkpoint's files stay under the limit except its optimizer state: save none, only the model.
    recipe = run_recipe(out, max_steps=2, save_strategy="no")
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        with pytest.raises(WriteError) as info:
            finetune(recipe)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(info.value)
    assert "file too large" in message and "while saving the model" in message, message
    assert not (out / "model.safetensors").exists()  # the partial weights are gone, never mistaken for a model
    summary = read_summary(out)
    assert summary["status"] == "failed" and summary["phase"] == "save" and summary["steps"] == 2
    assert not (out / LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------- signals


@pytest.mark.parametrize("method, signum, phase, model_saved", [
    ("save_model", signal.SIGTERM, "evaluate", True),  # during the final save: the save finishes
    ("evaluate", signal.SIGINT, "lm-eval", True),  # the first Ctrl-C during evaluation
])
def test_a_signal_after_training_finishes_the_phase_then_stops_and_resume_completes(
        tmp_path, monkeypatch, method, signum, phase, model_saved):
    out = tmp_path / "out"
    raw = run_raw(out, max_steps=4, save_steps=4)
    raw["data"]["eval_file"] = "embedded:demo_eval.jsonl"
    # The final save only (checkpoints are saved through save_model too); evaluation runs after training here.
    _signal_at(monkeypatch, Trainer, method, signum, when=lambda *a, **k: method != "save_model" or a[0] == str(out))
    summary = finetune(validate_recipe(raw))
    assert summary["status"] == "interrupted" and summary["signal"] == signal.Signals(signum).name
    assert summary["phase"] == phase and summary["steps"] == 4
    assert (out / "model.safetensors").is_file() == model_saved and complete(out / "checkpoint-4")
    assert "trained to step 4" in summary["kept"] and read_summary(out)["status"] == "interrupted"
    assert not (out / LOCK_NAME).exists()
    monkeypatch.undo()
    resumed = finetune(set_fields(validate_recipe(raw), resume=True))
    assert resumed["status"] == "completed" and resumed["steps"] == 4 and "loss" in resumed["eval"]


class _SignalAtStep(TrainerCallback):
    def __init__(self, step, signum):
        self.step, self.signum = step, signum

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            signal.raise_signal(self.signum)


def test_sighup_stops_training_like_sigterm(tmp_path):
    out = tmp_path / "out"
    summary = finetune(run_recipe(out, max_steps=6, save_strategy="no"), callbacks=[_SignalAtStep(2, signal.SIGHUP)])
    steps = summary["steps"]  # the stop is seen at the end of step 2 or 3 (callback order)
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGHUP" and steps in (2, 3)
    assert complete(out / f"checkpoint-{steps}") and summary["checkpoint"] == str(out / f"checkpoint-{steps}")


PROBE = """\
import signal, sys
from transformers import Trainer
from tam_hf.cli import main
real = Trainer.evaluate
def evaluate(self, *a, **k):
    signal.raise_signal(signal.{name})
    return real(self, *a, **k)
Trainer.evaluate = evaluate
sys.exit(main(sys.argv[1:]))
"""


def test_the_cli_exits_128_plus_the_signal_after_a_signal_in_evaluation(tmp_path):
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    raw = run_raw(out, max_steps=2, save_steps=2)
    raw["data"]["eval_file"] = "embedded:demo_eval.jsonl"
    recipe.write_text(json.dumps(raw))
    proc = subprocess.run([sys.executable, "-c", PROBE.format(name="SIGHUP"), str(recipe)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 128 + signal.SIGHUP, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "SIGHUP: finishing the evaluate step in progress" in proc.stderr
    assert "interrupted (SIGHUP) in the lm-eval phase: trained to step 2" in proc.stdout
    assert read_summary(out)["status"] == "interrupted" and not (out / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------ any phase


def test_an_unforeseen_error_in_evaluation_is_one_message_with_the_phase_and_a_saved_traceback(tmp_path, monkeypatch):
    out = tmp_path / "out"
    raw = run_raw(out, max_steps=2, save_strategy="no")
    raw["data"]["eval_file"] = "embedded:demo_eval.jsonl"

    def broken(self, *args, **kwargs):
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setattr(Trainer, "evaluate", broken)
    with pytest.raises(RunFailed) as info:
        finetune(validate_recipe(raw))
    message = str(info.value)
    assert message.startswith("evaluate failed: ZeroDivisionError: float division by zero") and "\n" not in message
    assert "the model is saved" in message and (out / "model.safetensors").is_file()
    assert "ZeroDivisionError" in (out / "traceback.txt").read_text()
    summary = read_summary(out)
    assert summary["status"] == "failed" and summary["phase"] == "evaluate" and not (out / LOCK_NAME).exists()


def test_a_model_directory_without_weights_is_one_line(tmp_path):
    model = tmp_path / "model"
    finetune(run_recipe(model, max_steps=1, save_strategy="no"))
    (model / "model.safetensors").unlink()  # config and tokenizer only
    raw = run_raw(tmp_path / "out", max_steps=1)
    raw["model"] = {"name": str(model)}
    with pytest.raises(ModelError) as info:
        finetune(validate_recipe(raw))
    message = str(info.value)
    assert info.value.exit_code == 1 and "\n" not in message and str(model) in message and "model.safetensors" in message
    assert read_summary(tmp_path / "out")["phase"] == "build"


# ------------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("change, named", [
    ({"name": "adamw", "lr": 1e-3}, "optimizer.name"),
    ({"name": "adatamw", "lr": 5e-4}, "optimizer.lr"),
])
def test_resuming_with_another_optimizer_or_lr_is_refused_before_loading(tmp_path, change, named):
    out = tmp_path / "out"
    finetune(run_recipe(out, max_steps=2, save_steps=2))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    raw = run_raw(out, max_steps=4, save_steps=2)
    raw["optimizer"] = change
    with pytest.raises(ResumeError) as info:
        finetune(set_fields(validate_recipe(raw), resume=True))
    message = str(info.value)
    assert info.value.exit_code == 2 and named in message and "overwrite: true" in message
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched


def test_resuming_on_other_training_data_is_refused(tmp_path):
    out = tmp_path / "out"
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f" a{i}"}) + "\n" for i in range(16)))
    raw = run_raw(out, max_steps=2, save_steps=2)
    raw["data"]["train_file"] = str(data)
    finetune(validate_recipe(raw))
    data.write_text(data.read_text().replace("q3", "Q3"))  # same path, other rows
    with pytest.raises(ResumeError, match="training data"):
        finetune(set_fields(validate_recipe({**raw, "training": {**raw["training"], "max_steps": 4}}), resume=True))


def test_resume_path_into_another_finished_runs_directory_is_refused(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    finetune(run_recipe(first, max_steps=2, save_steps=2))
    finetune(run_recipe(second, max_steps=2, save_steps=2))
    before = read_summary(second)
    with pytest.raises(OutputDirError) as info:
        finetune(set_fields(run_recipe(second, max_steps=4, save_steps=2), resume=str(first / "checkpoint-2")))
    assert info.value.exit_code == 2 and "another run's outputs" in str(info.value)
    assert read_summary(second) == before
    fresh = tmp_path / "third"  # into an empty directory it continues the first run there
    resumed = finetune(set_fields(run_recipe(fresh, max_steps=4, save_steps=2), resume=str(first / "checkpoint-2")))
    assert resumed["steps"] == 4 and (first / "model.safetensors").is_file()


def test_a_truncated_manifest_claims_nothing(tmp_path):
    out = tmp_path / "out"
    finetune(run_recipe(out, max_steps=1, save_strategy="no"))
    (out / ".tam_hf_run.json").write_text('{"owned": ["mod')
    with pytest.raises(OutputDirError, match="nothing was removed"):
        finetune(set_fields(run_recipe(out, max_steps=1, save_strategy="no"), overwrite=True))
    assert (out / "model.safetensors").is_file()

