"""Time the data builds the tasks issue sets limits for, from an empty cache, in one run.

    python benchmarks/data_build.py            # all three; about a minute on 2 cores

Prints seconds and the limit for: the 10x10 N-Queens set (every completion of ~43,000 inputs; limit
60 s), the 8-node graph colouring set (limit 60 s) and 1,000 unique-solution 9x9 Sudoku puzzles with
their ratings (limit 120 s).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from gram_pyro.tasks.coloring import ColoringTask
from gram_pyro.tasks.nqueens import NQueensTask
from gram_pyro.tasks.sudoku_solver import generate_puzzles


def timed(build) -> tuple[float, str]:
    start = time.perf_counter()
    detail = build()
    return time.perf_counter() - start, detail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sudoku-count", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as cache:
        def nqueens() -> str:
            task = NQueensTask(n=10, removals=(7, 8, 9), cache_dir=cache)
            return f"{sum(len(s) for s in task.splits.values())} inputs"

        def coloring() -> str:
            task = ColoringTask(n=8, cache_dir=cache)
            return f"{sum(len(s) for s in task.splits.values())} graphs"

        def sudoku() -> str:
            puzzles, _, ratings = generate_puzzles(9, args.sudoku_count, 0)
            return f"{len(puzzles)} puzzles, median rating {int(np.median(ratings))}"

        rows = [("N-Queens 10x10, k in {7,8,9}", 60, nqueens), ("graph colouring, 8 nodes", 60, coloring),
                (f"Sudoku 9x9, {args.sudoku_count} puzzles + ratings", 120, sudoku)]
        print(f"{'build':40s} {'seconds':>8s} {'limit':>6s}  detail")
        for name, limit, build in rows:
            seconds, detail = timed(build)
            print(f"{name:40s} {seconds:8.1f} {limit:6d}  {detail}")


if __name__ == "__main__":
    main()
