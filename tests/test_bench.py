"""The benchmark scripts run (their figures live in README, never asserted as timings here)."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).parent.parent / "bench"


def bench_table(name: str, argv: list[str], capsys) -> dict[str, list[str]]:
    """Run ``bench/<name>.py`` with ``argv``; its printed markdown table as row name -> the other cells."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]  # past the head
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in row.strip("|").split("|")] for row in rows)}


def test_optim_step_benchmark_prints_a_table(capsys):
    table = bench_table("optim_step", ["--small", "--rounds", "1", "--steps", "1"], capsys)
    assert "torch AdamW (for-loop)" in table and "tam_hf AdaTAM (default)" in table and "optimizer" not in table
    assert table["torch AdamW (fused)"][2] == "2.00"  # state bytes / param bytes
    assert float(table["tam_hf AdaTAM (default)"][2]) <= 2.01
