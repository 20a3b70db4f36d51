"""Sudoku completion and unconditional Sudoku generation (docs/paper.md, "Tasks, data and metrics").

Encoding: a grid of side ``n`` (4, 6 or 9; boxes 2x2, 2x3 = 2 rows by 3 columns, 3x3) is ``S = n*n``
tokens in row-major order, ``0`` = pad (unused), ``1`` = blank, ``2..n+1`` = digits ``1..n``;
``vocab_size = n + 2`` (11 for 9x9). Token = digit value of :mod:`gram_pyro.tasks.sudoku_solver` + 1.

* :class:`SudokuTask`: x = a puzzle with a unique solution (generated, see the solver module) or a
  user's puzzle (``source``), y = its solution. Splits ``train`` (``num_train``), ``test`` and, for
  generated data, ``extreme``: the ``num_extreme`` highest rated puzzles of a further pool of
  ``extreme_pool``. Metrics per input: ``accuracy`` (share of the N answers that are valid solutions
  keeping every clue), ``exact`` (share equal to a stored solution) and ``cells`` (share of the blank
  cells an answer fills as a stored solution does, the closest one where there are several, averaged
  over the N answers: how far a model that solves no puzzle got).
* :class:`UnconditionalSudokuTask`: x = all blank, y = a complete grid (4x4: all 288, of which a
  ``train_fraction`` trains; larger: ``num_grids`` random grids). ``score`` over all ``N*M`` answers:
  ``validity``, ``uniqueness`` (distinct valid grids / valid answers), ``equal_pairs`` (pairs of valid
  answers that are the same grid: ``C(n, 2) / equal_pairs`` estimates the number of equally likely grids
  that would repeat as often, the sampler's effective support) and, for 4x4, ``coverage`` (distinct valid
  grids / 288).

Shapes: ``inputs [M, S]``; ``targets [M, C, S]`` with ``target_counts [M]`` valid rows per input (the
training target is drawn among them); answers ``[N, M, S]``.

Augmentation (``augment: true``, training split only), drawn per access and the same for x and y: a
digit permutation, a permutation of the bands (groups of box rows) and of the rows inside each band, of
the stacks (groups of box columns) and of the columns inside each stack, and a transpose with
probability 1/2 when boxes are square (not for 6x6, whose 2x3 boxes would become 3x2). Each keeps
valid pairs valid. They are gathers with per-example index tensors, no loop over examples.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from gram_pyro.config import UserError
from gram_pyro.tasks import sudoku_solver as solver
from gram_pyro.tasks.base import (Batch, Task, a_fraction, an_integer, check_arguments, coverage_at_n, data_error,
                                  data_lines, is_int, most_likely, random_slot, same_input_groups,
                                  solutions_histogram)
from gram_pyro.tasks.cache import cached, progress

PAD, BLANK, FIRST_DIGIT = 0, 1, 2
GENERATOR_VERSION = 1
"""Part of every cache key: bump it when the solver or generator changes what a build stores."""
MAX_SOLUTIONS = 64
"""A user puzzle may have up to this many solutions (all are stored); more is an error."""
GROUP_NAMES = ("row", "column", "box")


def to_tokens(values) -> torch.Tensor:
    """Digit values (0 = blank, 1..n) -> tokens (1 = blank, 2..n+1), LongTensor."""
    return torch.as_tensor(np.asarray(values)).long() + 1


@lru_cache(maxsize=None)
def group_cells(size: int) -> torch.Tensor:
    """LongTensor ``[3n, n]``: cell indices of the rows, then the columns, then the boxes."""
    return torch.tensor(solver.geometry(size).groups)


def digit_counts(grid: torch.Tensor, size: int) -> torch.Tensor:
    """``[..., 3n, n]``: how often each digit occurs in each group of ``grid [..., S]``."""
    cells = grid[..., group_cells(size).to(grid.device)]
    digits = torch.arange(FIRST_DIGIT, FIRST_DIGIT + size, device=grid.device)
    return (cells[..., None] == digits).sum(-2)


def is_valid_solution(x: torch.Tensor, answer: torch.Tensor, size: int) -> torch.Tensor:
    """Bool ``[...]`` (x and answer broadcast, ``[..., S]``): every row, column and box of ``answer``
    holds each digit once (so no blank, pad or other token) and every clue of ``x`` is kept."""
    complete = (digit_counts(answer, size) == 1).all(-1).all(-1)
    keeps_clues = ((x < FIRST_DIGIT) | (x == answer)).all(-1)
    return complete & keeps_clues


def _grouped_permutation(batch: int, groups: int, per_group: int, generator: torch.Generator) -> torch.Tensor:
    """``[B, groups*per_group]``: random permutations of lines that move whole groups of ``per_group``
    lines (bands or stacks) and permute the lines inside each group."""
    group_order = torch.rand(batch, groups, generator=generator).argsort(-1)
    within = torch.rand(batch, groups, per_group, generator=generator).argsort(-1)
    return (group_order[..., None] * per_group + within).flatten(1)


def random_symmetry(batch: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(source [B, S], token_map [B, n+2])``: the augmented grid's cell ``i`` holds old cell
    ``source[b, i]``, and token ``t`` becomes ``token_map[b, t]`` (pad and blank fixed, digits permuted)."""
    box_rows, box_cols = solver.BOX_SHAPES[size]
    rows = _grouped_permutation(batch, size // box_rows, box_rows, generator)
    cols = _grouped_permutation(batch, size // box_cols, box_cols, generator)
    source = rows[:, :, None] * size + cols[:, None, :]
    if box_rows == box_cols:
        transpose = torch.rand(batch, generator=generator) < 0.5
        source = torch.where(transpose[:, None, None], source.transpose(1, 2), source)
    digits = torch.rand(batch, size, generator=generator).argsort(-1) + FIRST_DIGIT
    token_map = torch.cat([torch.arange(FIRST_DIGIT).expand(batch, -1), digits], -1)
    return source.flatten(1), token_map


def apply_symmetry(grid: torch.Tensor, source: torch.Tensor, token_map: torch.Tensor) -> torch.Tensor:
    """``grid [B, S]`` moved by ``source`` and relabelled by ``token_map`` (from :func:`random_symmetry`)."""
    return token_map.gather(1, grid.gather(1, source))


@dataclass
class SudokuSplit:
    """One split: ``inputs [M, S]``, ``targets [M, C, S]`` with ``target_counts [M]`` rows in use,
    ``num_solutions [M]`` (None for blank inputs, whose solutions are all grids), ``ratings [M]`` (None
    for blank inputs) and whether :meth:`batch` augments."""

    size: int
    inputs: torch.Tensor
    targets: torch.Tensor
    target_counts: torch.Tensor
    num_solutions: torch.Tensor | None
    ratings: torch.Tensor | None
    augment: bool
    puzzles: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def batch(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        """``x = inputs[index]``, ``y`` a uniformly drawn target of each, both augmented alike."""
        slot = random_slot(self.target_counts[index], generator)
        x, y = self.inputs[index], self.targets[index, slot]
        if self.augment:
            source, token_map = random_symmetry(len(index), self.size, generator)
            x, y = apply_symmetry(x, source, token_map), apply_symmetry(y, source, token_map)
        return Batch(x, y)


def _summary(values: torch.Tensor) -> dict[str, float]:
    return {"min": int(values.min()), "median": float(np.median(values.numpy())), "max": int(values.max())}


def read_puzzle_lines(path: str | Path, size: int) -> tuple[list[int], torch.Tensor]:
    """``(line numbers, tokens [M, size*size])`` of a puzzle file: one puzzle a line, ``size*size``
    characters, ``0`` or ``.`` for a blank and ``1..size`` for a digit, optionally followed by a ``#``
    comment. A wrong length, a bad character or clues that already conflict is a one-line
    ``UserError`` naming ``file:line``."""
    cells = size * size
    values = {"0": 0, ".": 0, **{str(d): d for d in range(1, size + 1)}}
    numbers, rows = [], []
    for number, text in data_lines(path):
        line = text.split("#", 1)[0].rstrip()
        if len(line) != cells:
            raise data_error(path, number, f"expected {cells} characters for a {size}x{size} sudoku, got {len(line)}")
        bad = next((i for i, char in enumerate(line) if char not in values), None)
        if bad is not None:
            raise data_error(path, number, f"bad character {line[bad]!r} at position {bad + 1}; "
                                           f"use 1-{size} for digits and 0 or . for blanks")
        numbers.append(number)
        rows.append([values[char] for char in line])
    tokens = to_tokens(rows)
    repeated = digit_counts(tokens, size) > 1
    if repeated.any():
        line, group, digit = repeated.nonzero()[0].tolist()
        kind, which = GROUP_NAMES[group // size], group % size + 1
        raise data_error(path, numbers[line], f"the clues conflict: digit {digit + 1} twice in {kind} {which}")
    return numbers, tokens


def read_puzzles(path: str | Path, size: int) -> torch.Tensor:
    """LongTensor ``[M, size*size]`` of the puzzles in a user file (see :func:`read_puzzle_lines`)."""
    return read_puzzle_lines(path, size)[1]


def format_answer(answer_row: torch.Tensor) -> str:
    """One grid ``[S]`` as a line of digits (``.`` where the token is not a digit), readable back."""
    return "".join(str(t - 1) if t >= FIRST_DIGIT else "." for t in answer_row.tolist())


class SudokuRules(Task):
    """What both Sudoku tasks share: sizes, the judge (:func:`is_valid_solution`) and the answer line
    (:func:`format_answer`: the bare grid, so that other tools read it; ``solve`` writes the verdicts
    to a file of their own)."""

    verdict_in_answer = False

    def __init__(self, size: int, family: str):
        """``family``: ``sudoku`` or ``uncond_sudoku``, the start of the task's name and of its errors."""
        check_arguments(family, {"size": (size, is_int(size) and size in solver.BOX_SHAPES,
                                          f"one of {', '.join(map(str, sorted(solver.BOX_SHAPES)))}")})
        self.size, self.name, self.box = size, f"{family}{size}x{size}", solver.BOX_SHAPES[size]
        self.vocab_size, self.seq_len = size + 2, size * size

    def judge(self, x: torch.Tensor, answer: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return is_valid_solution(x, answer, self.size)

    def format_answer(self, x: torch.Tensor, answer: torch.Tensor) -> str:
        return format_answer(answer)


def solve_source(path: str | Path, size: int) -> tuple[dict[str, np.ndarray], dict]:
    """Every puzzle of a user file with all its solutions (at most :data:`MAX_SOLUTIONS`) and rating:
    arrays ``puzzles [M, S]``, ``solutions [M, C, S]`` (digit values, zero padded), ``num_solutions [M]``,
    ``ratings [M]``. A puzzle without solution or with too many is an error naming its line."""
    numbers, tokens = read_puzzle_lines(path, size)
    puzzles = (tokens - 1).tolist()
    found = []
    for number, puzzle in zip(numbers, progress(puzzles, desc=f"solving {Path(path).name}")):
        solutions = solver.find_solutions(puzzle, size, MAX_SOLUTIONS + 1)
        if not solutions:
            raise data_error(path, number, "the puzzle has no solution")
        if len(solutions) > MAX_SOLUTIONS:
            raise data_error(path, number, f"the puzzle has more than {MAX_SOLUTIONS} solutions")
        found.append(solutions)
    padded = np.zeros((len(found), max(map(len, found)), size * size), dtype=np.int8)
    for row, solutions in enumerate(found):
        padded[row, :len(solutions)] = solutions
    arrays = {"puzzles": np.array(puzzles, dtype=np.int8), "solutions": padded,
              "num_solutions": np.array([len(s) for s in found], dtype=np.int64),
              "ratings": np.array([solver.rating(p, size) for p in puzzles], dtype=np.int64)}
    return arrays, {"puzzles": len(found)}


class SudokuTask(SudokuRules):
    """Sudoku completion: generated unique-solution puzzles, or the puzzles of ``source`` (split by
    ``test_fraction``; then ``num_train``, ``num_test``, ``extreme_pool`` and ``num_extreme`` are not used)."""

    def __init__(self, size: int = 9, num_train: int = 1000, num_test: int = 1000, extreme_pool: int = 2000,
                 num_extreme: int = 200, augment: bool = True, source: str | None = None,
                 test_fraction: float = 0.15, cache_dir: str | None = None, seed: int = 0):
        super().__init__(size, "sudoku")
        check_arguments("sudoku", {"num_train": an_integer(num_train, 1), "num_test": an_integer(num_test, 1),
                                   "extreme_pool": an_integer(extreme_pool, 0),
                                   "test_fraction": a_fraction(test_fraction)})
        check_arguments("sudoku", {"num_extreme": an_integer(num_extreme, 0, extreme_pool)})
        if source:
            self.splits = self._source_splits(source, augment, test_fraction, cache_dir, seed)
        else:
            self.splits = self._generated_splits(num_train, num_test, extreme_pool, num_extreme, augment,
                                                 cache_dir, seed)

    def _split(self, arrays: dict[str, np.ndarray], rows: torch.Tensor, augment: bool) -> SudokuSplit:
        """The split of ``rows`` of the arrays made by :func:`solve_source` (or the generator, alike)."""
        counts = torch.as_tensor(arrays["num_solutions"])[rows]
        return SudokuSplit(self.size, to_tokens(arrays["puzzles"])[rows], to_tokens(arrays["solutions"])[rows],
                           counts, counts, torch.as_tensor(arrays["ratings"])[rows], augment)

    def _generated_splits(self, num_train, num_test, extreme_pool, num_extreme, augment, cache_dir, seed) -> dict:
        total = num_train + num_test + extreme_pool
        params = {"size": self.size, "count": total, "seed": seed}

        def build():
            puzzles, solutions, ratings = solver.generate_puzzles(self.size, total, seed)
            arrays = {"puzzles": puzzles, "solutions": solutions[:, None], "ratings": ratings,
                      "num_solutions": np.ones(total, dtype=np.int64)}
            return arrays, {"puzzles": total}

        arrays, _ = cached("sudoku", params, GENERATOR_VERSION, build, cache_dir)
        first_extreme = num_train + num_test
        pool_ratings = torch.as_tensor(arrays["ratings"][first_extreme:])
        hardest = pool_ratings.argsort(descending=True, stable=True)[:num_extreme].sort().values + first_extreme
        splits = {"train": self._split(arrays, torch.arange(num_train), augment),
                  "test": self._split(arrays, torch.arange(num_train, first_extreme), False)}
        if num_extreme:
            splits["extreme"] = self._split(arrays, hardest, False)
        return splits

    def _source_splits(self, source, augment, test_fraction, cache_dir, seed) -> dict:
        path = Path(source).expanduser()
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as error:
            raise UserError(f"cannot read data file {path}: {error.strerror}") from None
        params = {"size": self.size, "source": str(path.resolve()), "sha256": digest}
        arrays, meta = cached("sudoku-source", params, GENERATOR_VERSION, lambda: solve_source(path, self.size),
                              cache_dir)
        if meta["puzzles"] < 2:
            raise UserError(f"data file {path} needs at least 2 puzzles (one to train on, one to test)")
        order = torch.randperm(meta["puzzles"], generator=torch.Generator().manual_seed(seed))
        num_test = min(max(round(test_fraction * meta["puzzles"]), 1), meta["puzzles"] - 1)
        return {"train": self._split(arrays, order[num_test:].sort().values, augment),
                "test": self._split(arrays, order[:num_test].sort().values, False)}

    def read_inputs(self, path) -> torch.Tensor:
        return read_puzzles(path, self.size)

    def per_input(self, split: str, index: torch.Tensor, answers: torch.Tensor) -> dict[str, torch.Tensor]:
        data = self.splits[split]
        stored = data.targets[index]  # [M, C, S]
        in_use = torch.arange(stored.shape[1]) < data.target_counts[index, None]  # [M, C]
        same = answers[:, :, None] == stored  # [N, M, C, S]
        exact = (same.all(-1) & in_use).any(-1)
        blank = (data.inputs[index] == BLANK)[:, None]  # [M, 1, S]
        filled = (same & blank).sum(-1) / blank.sum(-1).clamp(min=1)  # [N, M, C]
        cells = filled.masked_fill(~in_use, 0).amax(-1)
        return {"accuracy": self.judge(data.inputs[index], answers).float().mean(0),
                "exact": exact.float().mean(0), "cells": cells.float().mean(0)}

    def stats(self) -> dict:
        splits = {name: {"inputs": len(s), "solutions_per_input": solutions_histogram(s.num_solutions),
                         "clues": _summary((s.inputs >= FIRST_DIGIT).sum(-1)), "rating": _summary(s.ratings)}
                  for name, s in self.splits.items()}
        return {"task": self.name, "vocab_size": self.vocab_size, "seq_len": self.seq_len, "splits": splits}


class UnconditionalSudokuTask(SudokuRules):
    """Unconditional Sudoku: blank inputs, complete grids as targets. The grid set is all 288 grids for
    4x4 and ``num_grids`` distinct random grids otherwise; ``train`` holds a seeded ``train_fraction`` of
    it (one blank input per grid), ``test`` holds ``num_test`` blank inputs to sample from."""

    unconditional = True

    def __init__(self, size: int = 9, num_grids: int = 50000, train_fraction: float = 1.0, num_test: int = 256,
                 augment: bool = True, cache_dir: str | None = None, seed: int = 0):
        super().__init__(size, "uncond_sudoku")
        check_arguments("uncond_sudoku", {"num_grids": an_integer(num_grids, 1),
                                          "train_fraction": a_fraction(train_fraction, one=True),
                                          "num_test": an_integer(num_test, 1)})
        enumerated = size == 4
        params = {"size": size, "num_grids": None if enumerated else num_grids, "seed": seed}

        def build():
            grids = (np.array(solver.find_solutions([0] * 16, 4, 289), dtype=np.int8) if enumerated
                     else solver.random_grids(size, num_grids, seed))
            return {"grids": grids}, {"grids": len(grids)}

        arrays, _ = cached("uncond-sudoku", params, GENERATOR_VERSION, build, cache_dir)
        self.grids = to_tokens(arrays["grids"])
        self.num_all_grids = len(self.grids) if enumerated else None
        order = torch.randperm(len(self.grids), generator=torch.Generator().manual_seed(seed))
        train = self.grids[order[:max(1, round(train_fraction * len(self.grids)))].sort().values]
        self.splits = {"train": self._blank_split(train, len(train), augment),
                       "test": self._blank_split(train, num_test, False)}

    def _blank_split(self, grids: torch.Tensor, num_inputs: int, augment: bool) -> SudokuSplit:
        """``num_inputs`` blank inputs; input ``i`` has target ``grids[i % len(grids)]``."""
        targets = grids[torch.arange(num_inputs) % len(grids), None]
        return SudokuSplit(self.size, torch.full((num_inputs, self.seq_len), BLANK), targets,
                           torch.ones(num_inputs, dtype=torch.long), None, None, augment)

    def per_input(self, split: str, index: torch.Tensor, answers: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"accuracy": self.judge(self.splits[split].inputs[index], answers).float().mean(0)}

    def score(self, split: str, index: torch.Tensor, answers: torch.Tensor) -> dict[str, float]:
        """``accuracy`` = ``validity`` (share of the N*M answers that are valid grids), ``uniqueness``
        (distinct valid grids / valid answers), ``equal_pairs`` (pairs of valid answers holding the same
        grid, ``sum_g C(count_g, 2)``) and, for 4x4, ``coverage`` (distinct valid grids / 288)."""
        valid = self.judge(self.splits[split].inputs[index], answers)
        ids = torch.full(valid.shape, -1, device=valid.device)  # each valid grid solves the blank input
        ids[valid] = torch.unique(answers[valid], dim=0, return_inverse=True)[1]  # which distinct grid it is
        distinct = int(ids.max()) + 1 if ids.numel() else 0
        copies = torch.bincount(ids[valid], minlength=distinct)  # valid answers per distinct grid
        scores = {"accuracy": valid.float().mean().item(), "validity": valid.float().mean().item(),
                  "uniqueness": distinct / max(int(valid.sum()), 1),
                  "equal_pairs": int((copies * (copies - 1) // 2).sum())}
        if self.num_all_grids:  # all N*M answers pooled: one blank input with num_all_grids solutions
            all_grids = torch.tensor([self.num_all_grids], dtype=torch.float64)
            scores["coverage"] = coverage_at_n(ids.reshape(-1, 1), all_grids).item()
        return scores

    def nearest_solution(self, x: torch.Tensor, logits: torch.Tensor, distinct: bool = False) -> torch.Tensor:
        """A valid grid that ``logits [B, S, V]`` make likely, ``[B, S]`` tokens (``x``, blank, is read
        only for ``distinct``: rows with equal inputs then get different grids). 4x4: the most likely of
        the 288 grids (:func:`most_likely`). Larger grids are not enumerated: the greedy completion
        :func:`sudoku_solver.guided_grid` decides the cells from the most to the least confident (highest
        digit probability first) and tries each cell's digits from the most likely down, so a grid the
        logits already spell out is returned as it is; with ``distinct`` the rows search in order of
        their logits' confidence, each passing over the grids earlier rows of its input took."""
        groups = same_input_groups(x) if distinct else None
        if self.num_all_grids:
            return most_likely(logits, self.grids, groups=groups)
        log_p = logits.detach().float()[..., FIRST_DIGIT:FIRST_DIGIT + self.size].log_softmax(-1).cpu()
        confidence = log_p.amax(-1)  # [B, S]
        cell_orders = confidence.argsort(dim=-1, descending=True, stable=True).tolist()  # [B, S]
        digit_orders = (log_p.argsort(dim=-1, descending=True, stable=True) + 1).tolist()  # [B, S, n] values 1..n
        grids: list[list[int]] = [[] for _ in cell_orders]
        taken: dict[int, set[tuple[int, ...]]] = {}
        for row in confidence.sum(-1).argsort(descending=True, stable=True).tolist():
            exclude = taken.setdefault(int(groups[row]), set()) if distinct else set()
            grids[row] = solver.guided_grid(cell_orders[row], digit_orders[row], self.size, exclude)
            exclude.add(tuple(grids[row]))
        return to_tokens(grids).to(logits.device)

    def stats(self) -> dict:
        splits = {name: {"inputs": len(s), "solutions_per_input": None} for name, s in self.splits.items()}
        return {"task": self.name, "vocab_size": self.vocab_size, "seq_len": self.seq_len, "splits": splits,
                "grids": len(self.grids)}
