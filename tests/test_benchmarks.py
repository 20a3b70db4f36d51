"""The benchmark scripts run end to end at tiny sizes and print their ratios (each in its own process:
they switch Pyro's validation off and set torch's thread count)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.dim=16", "model.ffn_hidden=32", "model.n_sup=2"]


def run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script, args, expected", [
    ("step_overhead.py", ["--dim", "16", "--batch", "4", "--repeats", "2", "--threads", "1"], "overhead ratio"),
    ("training_speed.py", ["--dims", "16", "--batches", "4", "--repeats", "1", "--matmul-size", "64",
                           "--threads", "1", "model.n_sup=2"], "utilisation"),
    ("sampling.py", ["--batch", "2", "--repeats", "1", "--widths", "1", "3", "--threads", "1", *TINY_MODEL],
     "one by one"),
    ("posterior_schemes.py", ["--batch", "4", "--repeats", "1", "--particles", "2", "--threads", "1",
                              *TINY_MODEL, "--schemes", "truncated", "iwae"], "K=1 at batch 8 "),
    ("solve_size.py", ["--boards", "20", "--threads", "1", *TINY_MODEL], "first answer on disk:"),
])
def test_benchmark_prints_its_table(script, args, expected):
    result = run_benchmark(script, *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in result.stdout


def test_sampling_benchmark_rejects_widths_without_the_baseline():
    result = run_benchmark("sampling.py", "--widths", "2", "4")
    assert result.returncode == 2 and "--widths must include 1" in result.stderr
