"""`tam-finetune --nproc N` and `distributed.accelerate_config`: the launcher command, the CPU guard, a real
2-process run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tam_hf import cli
from tam_hf.finetune.launch import launch_command
from tam_hf.finetune.config.load import load_recipe

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "recipes" / "examples" / "demo_tiny.yaml"


@pytest.fixture(autouse=True)
def not_launched(monkeypatch):
    for var in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(var, raising=False)


def test_nproc_on_cpu_without_use_cpu_is_refused_before_loading(capsys):
    assert cli.main([str(DEMO), "--nproc", "2", "training.max_steps=1"]) == 2
    assert "training.use_cpu: true" in capsys.readouterr().err


def test_launcher_commands():
    recipe = load_recipe(DEMO, ["training.use_cpu=true"])
    cmd = launch_command(recipe, str(DEMO), ["training.max_steps=3"], 2)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert cmd[-4:] == ["-m", "tam_hf.cli", str(DEMO), "training.max_steps=3"]
    assert launch_command(recipe, str(DEMO), [], None) is None  # one process: train here
    zero2 = ROOT / "recipes" / "accelerate" / "zero2.yml"
    recipe = load_recipe(DEMO, ["training.use_cpu=true", f"distributed.accelerate_config={zero2}"])
    cmd = launch_command(recipe, str(DEMO), [], 2)
    assert cmd[1:5] == ["-m", "accelerate.commands.launch", "--config_file", str(zero2)]
    assert cmd[5:7] == ["--num_processes", "2"]


def test_inside_a_launched_process_it_trains_itself(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe = load_recipe(DEMO, ["training.use_cpu=true"])
    assert launch_command(recipe, str(DEMO), [], 2) is None


def test_two_processes_train_and_print_one_summary(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "tam_hf.cli", str(DEMO), "--nproc", "2", "training.max_steps=4",
         "training.use_cpu=true", f"training.output_dir={out}", "eval.metrics=[perplexity]"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.distributed.run --standalone --nproc_per_node 2" in proc.stderr
    assert proc.stdout.count("== tam-finetune summary ==") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["damping"]["mean"] > 0 and summary["status"] == "completed"
    assert not (out / ".tam_hf.lock").exists()  # rank 0 held the output directory's lock and released it
