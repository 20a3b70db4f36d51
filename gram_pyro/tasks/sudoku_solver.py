"""Sudoku solving, rating and generation on bitmasks, in pure Python.

A grid of side ``n`` (4, 6 or 9; boxes of 2x2, 2x3 = 2 rows by 3 columns, and 3x3) is a sequence of
``n*n`` digit values in row-major order, ``0`` for a blank and ``1..n`` for a digit (the token encoding
of :mod:`gram_pyro.tasks.sudoku` is this value plus one).

The search state is a list of ``n*n`` candidate masks: bit ``d-1`` of ``masks[cell]`` is set when digit
``d`` may still go there. :func:`propagate` applies naked singles: a cell left with one candidate removes
that digit from its 3 groups' other cells, repeatedly; a cell left with none is a contradiction.
:func:`search` is depth-first search on top of it: it branches on the unsolved cell with the fewest
candidates (the first in row-major order on ties), tries its digits in increasing order (or in a random
order for generation) and counts its **dead ends**: branches whose propagation ends in a contradiction.

* :func:`find_solutions` lists up to ``limit`` solutions of a puzzle (``limit=2`` tells unique from not).
* :func:`rating` is the difficulty of a puzzle: the dead ends the fixed deterministic search meets
  before its first solution (Sudoku-Extreme rates puzzles by a solver's backtracks in the same way).
* :func:`guided_grid` fills the empty grid along a given order of cells and of digits per cell, the
  same search with the branching order fixed by the caller (the greedy completion a decoder's logits
  prefer: :meth:`gram_pyro.tasks.sudoku.UnconditionalSudokuTask.nearest_solution`).
* :func:`random_grid` draws a complete grid by randomized backtracking; :func:`remove_clues` blanks its
  cells in random order, keeping a blank only while the solution stays unique, which leaves a minimal
  puzzle; :func:`generate_puzzles` makes ``count`` distinct puzzles this way, with their solutions and ratings;
  :func:`random_grids` makes ``count`` distinct complete grids.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Container

import numpy as np

from gram_pyro.tasks.cache import progress

BOX_SHAPES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}
"""Side -> (rows, columns) of a box."""

POPCOUNT = [bin(mask).count("1") for mask in range(1 << 9)]
"""Number of candidates in a mask (sides up to 9)."""

MAX_TRIES_PER_ITEM = 20
"""Draws allowed per distinct item asked for before giving up (4x4 has few distinct puzzles)."""


@dataclass(frozen=True)
class Geometry:
    """``size``; ``box`` = (rows, columns) of a box; ``groups``: the ``3*size`` rows, columns and boxes as
    tuples of cell indices; ``peers[cell]``: the other cells sharing a group with ``cell``."""

    size: int
    box: tuple[int, int]
    groups: tuple[tuple[int, ...], ...]
    peers: tuple[tuple[int, ...], ...]

    @property
    def full(self) -> int:
        return (1 << self.size) - 1


@lru_cache(maxsize=None)
def geometry(size: int) -> Geometry:
    if size not in BOX_SHAPES:
        raise ValueError(f"size must be one of {sorted(BOX_SHAPES)}, got {size}")
    box_rows, box_cols = BOX_SHAPES[size]
    cells = range(size * size)
    rows = [tuple(c for c in cells if c // size == r) for r in range(size)]
    cols = [tuple(c for c in cells if c % size == k) for k in range(size)]
    box_of = [(c // size) // box_rows * box_rows + (c % size) // box_cols for c in cells]
    boxes = [tuple(c for c in cells if box_of[c] == b) for b in range(size)]
    groups = tuple(rows + cols + boxes)
    peers = tuple(tuple(sorted({p for g in groups if c in g for p in g} - {c})) for c in cells)
    return Geometry(size, (box_rows, box_cols), groups, peers)


def propagate(masks: list[int], todo: list[int], peers) -> bool:
    """Naked singles in place: every cell in ``todo`` (each with one candidate) and every cell that comes
    down to one candidate removes its digit from its peers. False on a contradiction (an empty mask)."""
    while todo:
        cell = todo.pop()
        bit = masks[cell]
        for peer in peers[cell]:
            mask = masks[peer]
            if mask & bit:
                mask ^= bit
                if not mask:
                    return False
                masks[peer] = mask
                if not mask & (mask - 1):
                    todo.append(peer)
    return True


def initial_masks(grid, geo: Geometry) -> list[int] | None:
    """Candidate masks of a puzzle after propagating its clues; None when the clues conflict."""
    masks = [geo.full if value == 0 else 1 << (value - 1) for value in grid]
    clues = [cell for cell, value in enumerate(grid) if value]
    return masks if propagate(masks, clues, geo.peers) else None


def search(masks: list[int], geo: Geometry, limit: int, rng: random.Random | None = None,
           digit_order: list[list[int]] | None = None, exclude: Container[tuple[int, ...]] = frozenset()
           ) -> tuple[list, int]:
    """``(solutions, dead_ends)``: up to ``limit`` solved mask lists below ``masks`` (already propagated),
    digits tried in increasing order, shuffled with ``rng``, or for cell ``c`` in the order
    ``digit_order[c]`` (values ``1..n``, all of them); a solution whose grid is in ``exclude`` counts as
    a dead end."""
    solutions: list[list[int]] = []
    dead_ends = 0

    def descend(masks: list[int]) -> None:
        nonlocal dead_ends
        best, fewest = -1, geo.size + 1
        for cell, mask in enumerate(masks):
            count = POPCOUNT[mask]
            if 1 < count < fewest:
                best, fewest = cell, count
                if count == 2:
                    break
        if best < 0:
            if tuple(masks_to_grid(masks)) in exclude:
                dead_ends += 1
            else:
                solutions.append(masks)
            return
        digits = digit_order[best] if digit_order is not None else range(1, geo.size + 1)
        bits = [1 << (d - 1) for d in digits if masks[best] >> (d - 1) & 1]
        if rng is not None:
            rng.shuffle(bits)
        for bit in bits:
            child = masks.copy()
            child[best] = bit
            if not propagate(child, [best], geo.peers):
                dead_ends += 1
                continue
            descend(child)
            if len(solutions) >= limit:
                return

    descend(masks)
    return solutions, dead_ends


def masks_to_grid(masks: list[int]) -> list[int]:
    """Digit values of a solved mask list."""
    return [mask.bit_length() for mask in masks]


def find_solutions(grid, size: int, limit: int) -> list[list[int]]:
    """Up to ``limit`` solutions (digit lists) of a puzzle; none when its clues conflict."""
    geo = geometry(size)
    masks = initial_masks(grid, geo)
    if masks is None:
        return []
    return [masks_to_grid(m) for m in search(masks, geo, limit)[0]]


def rating(grid, size: int) -> int:
    """Dead ends of the deterministic search (fewest-candidates cell, increasing digits) before it finds
    the first solution of the puzzle (0: naked singles alone solve it)."""
    geo = geometry(size)
    masks = initial_masks(grid, geo)
    if masks is None:
        raise ValueError("the clues conflict")
    return search(masks, geo, 1)[1]


MAX_GUIDED_DEAD_ENDS = 200
"""Dead ends :func:`guided_grid` accepts before it gives up its fixed order for the fewest-candidates one."""


def guided_grid(cell_order: list[int], digit_order: list[list[int]], size: int,
                exclude: Container[tuple[int, ...]] = frozenset()) -> list[int]:
    """A complete grid by depth-first search from the empty grid that decides the cells in ``cell_order``
    (cells left with one candidate are skipped) and tries the digits of cell ``c`` in the order
    ``digit_order[c]`` (values ``1..size``, all of them); a complete grid in ``exclude`` counts as a dead
    end. After ``MAX_GUIDED_DEAD_ENDS`` dead ends it starts again with :func:`search`'s order of cells
    (fewest candidates first), which rarely meets one, and the same digit orders; a grid in ``exclude``
    comes back only when every grid is in it."""
    geo = geometry(size)
    dead_ends = 0

    def descend(masks: list[int], position: int) -> list[int] | None:
        nonlocal dead_ends
        while position < len(cell_order) and POPCOUNT[masks[cell_order[position]]] == 1:
            position += 1
        if position == len(cell_order):
            if tuple(masks_to_grid(masks)) not in exclude:
                return masks
            dead_ends += 1
            return None
        cell = cell_order[position]
        for digit in digit_order[cell]:
            bit = 1 << (digit - 1)
            if not masks[cell] & bit:
                continue
            child = masks.copy()
            child[cell] = bit
            if propagate(child, [cell], geo.peers):
                found = descend(child, position + 1)
                if found is not None or dead_ends > MAX_GUIDED_DEAD_ENDS:
                    return found
            else:
                dead_ends += 1
        return None

    found = descend([geo.full] * (size * size), 0)
    if found is None:
        empty = [geo.full] * (size * size)
        found = (search(empty, geo, 1, digit_order=digit_order, exclude=exclude)[0]
                 or search(empty, geo, 1, digit_order=digit_order)[0])[0]
    return masks_to_grid(found)


def random_grid(size: int, rng: random.Random) -> list[int]:
    """A complete grid by randomized backtracking from the empty grid."""
    geo = geometry(size)
    return masks_to_grid(search([geo.full] * (size * size), geo, 1, rng)[0][0])


def remove_clues(solution: list[int], size: int, rng: random.Random) -> list[int]:
    """A minimal puzzle whose unique solution is ``solution``: cells are blanked in random order, each
    kept blank only if no other grid fits the remaining clues (a search with the blanked cell's old
    digit excluded finds nothing: the same test as counting solutions up to 2, with one fewer branch)."""
    geo = geometry(size)
    puzzle = list(solution)
    order = list(range(size * size))
    rng.shuffle(order)
    for cell in order:
        digit, puzzle[cell] = puzzle[cell], 0
        masks = initial_masks(puzzle, geo)
        masks[cell] &= ~(1 << (digit - 1))
        if masks[cell] and propagate(masks, [cell] if POPCOUNT[masks[cell]] == 1 else [], geo.peers) \
                and search(masks, geo, 1)[0]:
            puzzle[cell] = digit
    return puzzle


def draw_distinct(draw: Callable[[], tuple], count: int, what: str) -> list[tuple]:
    """``count`` results of ``draw()`` whose first entries (digit lists) are all different, with a
    progress bar; ValueError when too many draws repeat (the space is smaller than asked for)."""
    seen: set[tuple[int, ...]] = set()
    items = []
    with progress(desc=what, total=count) as bar:
        for _ in range(MAX_TRIES_PER_ITEM * count):
            if len(items) == count:
                break
            item = draw()
            if tuple(item[0]) not in seen:
                seen.add(tuple(item[0]))
                items.append(item)
                bar.update(1)
    if len(items) < count:
        raise ValueError(f"found only {len(items)} distinct {what}; ask for fewer than {count}")
    return items


def generate_puzzles(size: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` distinct unique-solution puzzles: ``(puzzles, solutions, ratings)`` with puzzles and
    solutions int8 ``[count, size*size]`` digit values (0 = blank) and ratings int64 ``[count]``."""
    rng = random.Random(seed)

    def draw() -> tuple[list[int], list[int]]:
        solution = random_grid(size, rng)
        return remove_clues(solution, size, rng), solution

    pairs = draw_distinct(draw, count, f"{size}x{size} sudoku puzzles")
    puzzles = np.array([p for p, _ in pairs], dtype=np.int8).reshape(count, size * size)
    solutions = np.array([s for _, s in pairs], dtype=np.int8).reshape(count, size * size)
    return puzzles, solutions, np.array([rating(p, size) for p in puzzles.tolist()], dtype=np.int64)


def random_grids(size: int, count: int, seed: int) -> np.ndarray:
    """``count`` distinct complete grids, int8 ``[count, size*size]`` digit values."""
    rng = random.Random(seed)
    grids = draw_distinct(lambda: (random_grid(size, rng),), count, f"{size}x{size} sudoku grids")
    return np.array([g for g, in grids], dtype=np.int8).reshape(count, size * size)
