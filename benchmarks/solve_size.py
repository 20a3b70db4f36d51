"""Inputs of any size: time ``gram-pyro solve`` on a file of N N-Queens 8x8 boards.

Builds a run directory of the demo's model (the train config and its overrides; untrained weights,
``trainer.max_batches=0``, answer as fast as trained ones) unless ``--run`` names one, writes N partial
boards (the task's train and test inputs, cycled) to a JSON Lines file, and runs ``gram-pyro solve`` on
it as a child process while watching the output file. Printed: the seconds to read and check the file
(in this process, as ``solve`` does first), to the first answer on disk, in all, the boards per second,
and the child's peak RSS.

    python benchmarks/solve_size.py [--boards 100000] [--samples 1] [--select first] [--threads T]
                                    [--precision fp32] [--compile none] [--run DIR] [--out DIR]
                                    [override ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gram_pyro.config import build, compose_config
from gram_pyro.tasks.nqueens import QUEEN, read_boards
from gram_pyro.training import train

import harness

POLL_SECONDS = 0.05


def write_boards(path: Path, count: int, overrides: list[str]) -> None:
    """``count`` partial boards of the configured N-Queens task (train and test inputs, cycled)."""
    task = build(compose_config("train", overrides).task, "task")
    inputs = [board for split in ("train", "test") for board in task.splits[split].inputs]
    n = task.n
    lines = []
    for board in inputs:
        queens = [[cell // n, cell % n] for cell in (board == QUEEN).nonzero().flatten().tolist()]
        lines.append(json.dumps({"n": n, "queens": queens}))
    path.write_text("\n".join(lines[i % len(lines)] for i in range(count)) + "\n")


def make_run(run_dir: Path, overrides: list[str]) -> Path:
    """A run directory of the configured model with untrained weights."""
    cfg = compose_config("train", ["trainer.max_batches=0", "trainer.shortcut_action=off", *overrides])
    return train(cfg, run_dir, quiet=True, overwrite=True)


def solve(run: Path, source: Path, output: Path, args: argparse.Namespace) -> dict:
    """Run ``gram-pyro solve`` as a child; seconds to the first answer on disk and in all, peak RSS."""
    env = {**os.environ, "GRAM_PYRO_QUIET": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    command = [sys.executable, "-m", "gram_pyro.cli", "solve", f"run={run}", f"input={source}",
               f"output={output}", f"samples={args.samples}", f"select={args.select}",
               f"precision={args.precision}", f"compile={args.compile}"]
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = None
    while child.poll() is None:
        if first is None and output.is_file() and output.stat().st_size:
            first = time.perf_counter() - start
        time.sleep(POLL_SECONDS)
    total = time.perf_counter() - start
    out, err = child.communicate()
    if child.returncode:
        raise SystemExit(f"solve failed ({child.returncode}): {err.strip()[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    return {"first": first if first is not None else total, "total": total, "peak": peak, "said": out.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boards", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--select", default="first")
    parser.add_argument("--precision", default="fp32", help="solve's precision: fp32 | bf16 | auto")
    parser.add_argument("--compile", default="none", help="solve's compile mode: none | default | max")
    parser.add_argument("--run", type=Path, default=None, help="a trained run (default: an untrained one)")
    parser.add_argument("--out", type=Path, default=None, help="where the files go (default: a temporary folder)")
    harness.add_threads_argument(parser)
    parser.add_argument("overrides", nargs="*", help="train-config overrides (model size, task.n)")
    args = parser.parse_args()
    harness.setup(args)
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        run = args.run or make_run(out / "run", args.overrides)
        source, output = out / "boards.jsonl", out / "boards.answers.jsonl"
        write_boards(source, args.boards, args.overrides)
        start = time.perf_counter()
        boards = read_boards(source, compose_config("train", args.overrides).task.n)
        parse = time.perf_counter() - start
        result = solve(run, source, output, args)
        answered = len(output.read_text().splitlines())
    print(f"solve of {args.boards} boards, samples={args.samples}, select={args.select}, "
          f"precision={args.precision}, compile={args.compile}, threads={args.threads or 'default'}: "
          f"{result['said']}")
    rows = [(f"read and check the file ({len(boards)} boards)", f"{parse:8.2f} s"),
            ("first answer on disk", f"{result['first']:8.2f} s"),
            (f"all {answered} answers", f"{result['total']:8.2f} s ({answered / result['total']:.0f} boards/s)"),
            ("peak RSS of the solve process", f"{result['peak'] / 2**20:8.0f} MB")]
    for label, value in rows:
        print(f"{label + ':':42s}{value}")

if __name__ == "__main__":
    harness.run(main)
