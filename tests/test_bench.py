"""The benchmark scripts run (their figures live in README, never asserted as timings here)."""

import importlib.util
from pathlib import Path


def test_optim_step_benchmark_prints_a_table(capsys):
    path = Path(__file__).parent.parent / "bench" / "optim_step.py"
    spec = importlib.util.spec_from_file_location("optim_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--small", "--rounds", "1", "--steps", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "optimizer" not in line]
    names = [row.split("|")[1].strip() for row in rows]
    assert "torch AdamW (fused)" in names and "tam_hf AdaTAM (default)" in names
    adamw = next(r for r in rows if "torch AdamW (fused)" in r)
    assert adamw.split("|")[4].strip() == "2.00"  # state bytes / param bytes
    adatam = next(r for r in rows if "tam_hf AdaTAM (default)" in r)
    assert float(adatam.split("|")[4]) <= 2.01
