"""The damping telemetry reaches TensorBoard and Trackio (read back with each tracker's own reader), and a
tracker that is not installed is named, with its install command, before anything loads."""

from __future__ import annotations

import importlib.util
import sys
import uuid

import pytest

import tam_hf
from hf_tiny import ArithmeticTokens, tiny_llama, training_args
from tam_hf.integrations.trackers import TRACKERS, tracker_problems
from tam_hf.trainer.callbacks import KEYS

pytestmark = pytest.mark.usefixtures("registered")

STEPS = 4


def train(tmp_path, report_to, **overrides):
    args = training_args(tmp_path / "out", optim="adatamw", max_steps=STEPS, report_to=report_to, **overrides)
    trainer = tam_hf.TAMTrainer(model=tiny_llama(), args=args, train_dataset=ArithmeticTokens())
    trainer.train()
    logged = {e["step"]: {k: e[k] for k in KEYS} for e in trainer.state.log_history if "loss" in e}
    assert sorted(logged) == list(range(1, STEPS + 1))
    return logged


def test_damping_reaches_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = train(tmp_path, ["tensorboard"])
    [event_file] = (tmp_path / "out").rglob("events.out.tfevents.*")  # under out/runs/<date_host>/
    events = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
    events.Reload()
    for key in KEYS:
        # TensorBoardCallback files training logs under train/
        scalars = {s.step: s.value for s in events.Scalars(f"train/{key}")}
        assert scalars == {step: pytest.approx(v[key], rel=1e-6) for step, v in logged.items()}, key


def test_damping_reaches_trackio(tmp_path, monkeypatch):
    # Trackio reads TRACKIO_DIR when it is imported; a test that imported it earlier fixed the constant, so set both.
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    import trackio.utils  # noqa: F401

    for module in [m for name, m in sys.modules.items() if name.startswith("trackio")]:
        if hasattr(module, "TRACKIO_DIR"):
            monkeypatch.setattr(module, "TRACKIO_DIR", tmp_path / "trackio")
    from trackio.sqlite_storage import SQLiteStorage

    project = f"tam-hf-test-{uuid.uuid4().hex[:8]}"
    logged = train(tmp_path, ["trackio"], project=project, run_name="adatamw-tiny")
    assert SQLiteStorage.get_project_db_path(project).is_relative_to(tmp_path)
    rows = {r["train/global_step"]: r for r in SQLiteStorage.get_logs(project, "adatamw-tiny")
            if "train/damping/mean" in r}
    assert sorted(rows) == sorted(logged)
    for step, values in logged.items():
        for key in KEYS:
            assert rows[step][f"train/{key}"] == pytest.approx(values[key], rel=1e-6), (step, key)


def test_installed_trackers_pass():
    assert tracker_problems(["tensorboard", "trackio", "none"]) == []
    assert tracker_problems(["all"]) == []


def test_missing_tracker_names_its_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX", "wandb") else real(name, *a))
    assert tracker_problems(["tensorboard", "wandb", "trackio"]) == [
        "report_to: tensorboard is not installed; install it with: pip install \"tam_hf[tensorboard]\"   (from a "
        "checkout: pip install -e \".[tensorboard]\")",
        "report_to: wandb is not installed; install it with: pip install wandb",
    ]


def test_unknown_tracker_gets_a_did_you_mean():
    [problem] = tracker_problems(["tensorbord"])
    assert problem.startswith("report_to: unknown tracker 'tensorbord' (did you mean 'tensorboard'?)")


def test_tracker_table_matches_transformers():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    assert set(TRACKERS) == set(INTEGRATION_TO_CALLBACK)


def test_tracker_problems_imports_nothing_heavy():
    import subprocess

    code = ("import sys; from tam_hf.integrations.trackers import tracker_problems; tracker_problems(['tensorboard']);"
            "print(sorted(m for m in ('torch', 'transformers', 'tensorboard', 'trackio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
