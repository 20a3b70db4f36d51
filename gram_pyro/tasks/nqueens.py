"""N-Queens completion task (GRAM).

Every n-queens solution has k queens removed (k from a removal set); the
partial board is the input x and any n-queens solution containing all of its
queens is a correct answer.

Encoding: a board is ``n*n`` tokens in row-major order, vocabulary 3:
``0`` = pad (unused), ``1`` = EMPTY, ``2`` = QUEEN.

Shapes, with ``L = n*n``, ``M`` unique inputs in a split, ``S`` solutions:

* ``all_solutions(n)``: LongTensor ``[S, n]``, queen column of each row.
* ``NQueensSplit.inputs``: ``[M, L]`` tokens, one row per unique partial board.
* ``NQueensSplit.completions``: ``[M, C_max]`` indices into ``solutions``,
  padded with ``-1``; ``num_completions``: ``[M]``.
* ``NQueensSplit.solutions``: ``[S, L]`` token boards (shared by all splits).
"""

import json
from dataclasses import dataclass
from itertools import combinations

import torch

from gram_pyro.config import UserError
from gram_pyro.tasks.base import (Batch, Task, a_fraction, an_integer, check_arguments, coverage_at_n, data_error,
                                  data_lines, is_int, most_likely, random_slot, same_input_groups,
                                  solutions_histogram)
from gram_pyro.tasks.cache import cached, progress

EMPTY, QUEEN = 1, 2
VOCAB_SIZE = 3
TARGETS = ("random", "original")
SPLIT_ARRAYS = ("inputs", "completions", "num_completions", "original")


def all_solutions(n: int) -> torch.Tensor:
    """All n-queens solutions as LongTensor ``[S, n]`` (queen column per row), sorted lexicographically.

    Bitmask backtracking; columns are tried lowest first, so the output is
    already in lexicographic order.
    """
    full = (1 << n) - 1
    cols = [0] * n
    out = []

    def place(row: int, used: int, diag: int, anti: int) -> None:
        if row == n:
            out.append(cols.copy())
            return
        free = full & ~(used | diag | anti)
        while free:
            bit = free & -free
            free ^= bit
            cols[row] = bit.bit_length() - 1
            place(row + 1, used | bit, ((diag | bit) << 1) & full, (anti | bit) >> 1)

    place(0, 0, 0, 0)
    return torch.tensor(out, dtype=torch.long).reshape(-1, n)


def boards_from_columns(cols: torch.Tensor, n: int) -> torch.Tensor:
    """Column indices ``[..., n]`` -> token boards ``[..., n*n]`` (EMPTY/QUEEN)."""
    one_hot = torch.nn.functional.one_hot(cols, n)
    return (EMPTY + (QUEEN - EMPTY) * one_hot).flatten(-2)


def dihedral_permutations(n: int) -> torch.Tensor:
    """LongTensor ``[8, n*n]``: for each of the 8 symmetries of the square, the source cell of every
    cell (``board[..., perm]`` applies the symmetry). Row 0 is the identity. Symmetries map n-queens
    solutions to solutions and partial boards to partial boards."""
    cells = torch.arange(n * n).view(n, n)
    grids = [cells.rot90(k, (0, 1)) for k in range(4)]
    grids += [g.flip(1) for g in grids]
    return torch.stack([g.flatten() for g in grids])


@dataclass
class NQueensSplit:
    """One split of the task.

    inputs: LongTensor ``[M, n*n]`` tokens; completions: LongTensor ``[M, C_max]`` indices into
    ``solutions`` padded with -1; num_completions: LongTensor ``[M]``; original: LongTensor ``[M]`` one
    fixed completion per input (the target when ``target='original'``); solutions: LongTensor
    ``[S, n*n]`` token boards (the same object in every split).
    """

    n: int
    inputs: torch.Tensor
    completions: torch.Tensor
    num_completions: torch.Tensor
    original: torch.Tensor
    solutions: torch.Tensor
    target: str = "random"
    augment: bool = False
    puzzles = None

    @property
    def num_solutions(self) -> torch.Tensor:
        return self.num_completions

    def __len__(self) -> int:
        """Number of unique inputs."""
        return self.inputs.shape[0]

    def batch(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        """``x = inputs[index]`` and ``y``: a uniformly random valid completion per row (``target='random'``)
        or the row's fixed original board, both under one random dihedral symmetry per row when
        ``augment``; all randomness from ``generator``."""
        counts = self.num_completions[index]
        slot = random_slot(counts, generator)  # drawn for either target: one generator sequence for both
        choice = self.completions[index, slot] if self.target == "random" else self.original[index]
        x, y = self.inputs[index], self.solutions[choice]
        if self.augment:
            symmetry = torch.randint(8, counts.shape, generator=generator)
            perm = dihedral_permutations(self.n)[symmetry]
            x, y = x.gather(-1, perm), y.gather(-1, perm)
        return Batch(x, y)


def _completion_table(inputs: torch.Tensor, solutions: torch.Tensor, chunk: int = 4096
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[M, C_max]`` (-1 padded) and counts ``[M]`` of the solutions containing every queen of
    each input; computed ``chunk`` inputs at a time to bound memory (``chunk x S`` overlaps)."""
    sol_q = (solutions == QUEEN).float().T
    rows, sols = [], []
    for begin in range(0, len(inputs), chunk):
        queens = (inputs[begin:begin + chunk] == QUEEN).float()
        match = (queens @ sol_q) == queens.sum(-1, keepdim=True)
        r, c = match.nonzero(as_tuple=True)
        rows.append(r + begin)
        sols.append(c)
    rows, sols = torch.cat(rows), torch.cat(sols)
    counts = torch.bincount(rows, minlength=len(inputs))
    starts = torch.cumsum(counts, 0) - counts
    slots = torch.arange(rows.numel()) - starts[rows]
    table = torch.full((inputs.shape[0], max(int(counts.max()), 1)), -1, dtype=torch.long)
    table[rows, slots] = sols
    return table, counts


def _check_args(n: int, removals, test_fraction: float) -> tuple[int, ...] | None:
    """The removal set as a tuple (``None`` stays ``None``: no removals to check, the boards come from a
    file); a bad argument is a :class:`UserError` naming it (:func:`check_arguments`)."""
    check_arguments("nqueens", {"n": an_integer(n, 4, 12)})
    if removals is not None:
        removals = tuple(removals)
        ok = bool(removals) and all(is_int(k) and 1 <= k <= n for k in removals)
        check_arguments("nqueens", {"removals": (removals, ok, f"a non-empty set of integers k in 1..{n}")})
    check_arguments("nqueens", {"test_fraction": a_fraction(test_fraction)})
    return removals


def _partial_boards(n: int, removals: tuple[int, ...], columns: torch.Tensor) -> torch.Tensor:
    """The unique partial boards ``[M, n*n]`` left by removing ``k`` queens (rows) from each solution
    (``columns [S, n]``). Deduplicated as column vectors (-1 = removed row), ``n`` bytes per board."""
    removed = [rows for k in removals for rows in combinations(range(n), k)]
    partial = columns.to(torch.int8).repeat(len(removed), 1).view(len(removed), -1, n)
    for i, rows in enumerate(progress(removed, desc=f"{n}-queens partial boards")):
        partial[i, :, list(rows)] = -1
    unique = torch.unique(partial.flatten(0, 1), dim=0).long()
    queens = torch.nn.functional.one_hot(unique.clamp(min=0), n) * (unique >= 0)[..., None]
    return (EMPTY + (QUEEN - EMPTY) * queens).flatten(-2)


def _split(n: int, inputs: torch.Tensor, solutions: torch.Tensor, test_fraction: float, seed: int
           ) -> dict[str, NQueensSplit]:
    """Enumerate the completions of ``inputs`` and split them ``1 - test_fraction : test_fraction`` by
    unique input, with a permutation seeded by ``seed``; the fixed original of each input is one of its
    completions drawn with the same seed."""
    table, counts = _completion_table(inputs, solutions)
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(inputs), generator=generator)
    original = table[torch.arange(len(inputs)), random_slot(counts, generator)]
    n_test = round(test_fraction * len(inputs))
    splits = {}
    for name, idx in (("train", perm[n_test:]), ("test", perm[:n_test])):
        idx = idx.sort().values
        c = counts[idx]
        splits[name] = NQueensSplit(n, inputs[idx], table[idx, : int(c.max())], c, original[idx], solutions)
    return splits


def build_nqueens(
    n: int = 8, removals=(5, 6, 7), test_fraction: float = 0.15, seed: int = 0
) -> dict[str, NQueensSplit]:
    """Build ``{'train': ..., 'test': ...}`` from every solution with ``k in removals`` queens removed;
    split 85:15 by unique input with a permutation seeded by ``seed``."""
    removals = _check_args(n, removals, test_fraction)
    columns = all_solutions(n)
    solutions = boards_from_columns(columns, n)
    return _split(n, _partial_boards(n, removals, columns), solutions, test_fraction, seed)


def is_valid_completion(x: torch.Tensor, answer: torch.Tensor, n: int) -> torch.Tensor:
    """Bool ``[...]``: ``answer`` (broadcast against ``x``, both ``[..., n*n]``) is a valid completion of ``x``.

    Valid means: every token is EMPTY or QUEEN, exactly one queen per row and
    column, at most one per diagonal and anti-diagonal, and every queen of x is
    a queen of answer. Checks the rules only, never a stored target.
    """
    x, answer = torch.broadcast_tensors(x, answer)
    legal = ((answer == EMPTY) | (answer == QUEEN)).all(-1)
    q = answer == QUEEN
    grid = q.unflatten(-1, (n, n))
    rows_ok = (grid.sum(-1) == 1).all(-1)
    cols_ok = (grid.sum(-2) == 1).all(-1)
    r = torch.arange(n, device=answer.device).repeat_interleave(n)
    c = torch.arange(n, device=answer.device).repeat(n)
    one_hot = torch.nn.functional.one_hot
    lines = torch.cat([one_hot(r - c + n - 1, 2 * n - 1), one_hot(r + c, 2 * n - 1)], -1).float()
    diags_ok = ((q.float() @ lines) <= 1).all(-1)
    keeps_input = ~((x == QUEEN) & ~q).any(-1)
    return legal & rows_ok & cols_ok & diags_ok & keeps_input


def solution_ids(x_completions: torch.Tensor, solutions: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Long ``[N, M]``: for each answer (``answers [N, M, n*n]``) the index into ``solutions [S, n*n]``
    of the solution it equals when that solution is one of its input's completions (``x_completions
    [M, C_max]``, -1 padded indices into ``solutions``), else -1: the ids of :func:`coverage_at_n`.

    Each answer is matched to a solution by queen overlap: it equals solution s
    iff all its tokens are EMPTY/QUEEN and its queen set equals that of s.
    """
    q = (answers == QUEEN).float()
    sol_q = (solutions == QUEEN).float()
    overlap = q @ sol_q.T
    legal = ((answers == EMPTY) | (answers == QUEEN)).all(-1, keepdim=True)
    same = legal & (overlap == q.sum(-1, keepdim=True)) & (overlap == sol_q.sum(-1))
    matched = torch.where(same.any(-1), same.float().argmax(-1), -1)
    completes = ((matched[..., None] == x_completions) & (x_completions >= 0)).any(-1)
    return torch.where(completes, matched, -1)


BOARD_FORMAT = 'expected {"n": <int>, "queens": [[row, col], ...]}'


def parse_board(text: str, n: int) -> list[tuple[int, int]]:
    """The queens ``(row, col)`` of one line ``{"n": n, "queens": [[row, col], ...]}``; ``ValueError``
    saying what is wrong with a line that is not such an object, has a wrong or non-integer ``n``, a
    coordinate that is not an integer (``0.7`` or ``1e400`` are refused, not truncated), a queen off the
    board or two queens attacking each other."""
    try:
        record = json.loads(text)
    except ValueError as error:
        raise ValueError(f"invalid JSON ({getattr(error, 'msg', error)}); {BOARD_FORMAT}") from None
    if not isinstance(record, dict) or "n" not in record or "queens" not in record:
        raise ValueError(BOARD_FORMAT)
    size, queens = record["n"], record["queens"]
    if not is_int(size):
        raise ValueError(f"n={json.dumps(size)} is not an integer; {BOARD_FORMAT}")
    if size != n:
        raise ValueError(f"board size n={size}, but the task has n={n}")
    if not isinstance(queens, list) or not all(isinstance(q, list) and len(q) == 2 for q in queens):
        raise ValueError(BOARD_FORMAT)
    for row, col in queens:
        if not (is_int(row) and is_int(col)):
            raise ValueError(f"queen {json.dumps([row, col])}: row and column must be integers in 0..{n - 1}")
        if not (0 <= row < n and 0 <= col < n):
            raise ValueError(f"queen ({row}, {col}) is off the {n}x{n} board")
    lines = ({r for r, _ in queens}, {c for _, c in queens}, {r - c for r, c in queens}, {r + c for r, c in queens})
    if any(len(line) < len(queens) for line in lines):
        raise ValueError("two queens attack each other")
    return [(row, col) for row, col in queens]


def read_boards(path, n: int) -> torch.Tensor:
    """Partial boards ``[M, n*n]`` from a JSON Lines file, one board per line (:func:`parse_board`); a
    bad line is a one-line error naming the file and line. Parsed in plain Python, the boards built
    with one scatter: 100,000 lines take about a second."""
    boards, cells = 0, []
    for line, text in data_lines(path):
        try:
            queens = parse_board(text, n)
        except ValueError as problem:
            raise data_error(path, line, str(problem)) from None
        cells.extend(boards * n * n + row * n + col for row, col in queens)
        boards += 1
    tokens = torch.full((boards * n * n,), EMPTY)
    tokens[torch.tensor(cells, dtype=torch.long)] = QUEEN
    return tokens.view(boards, n * n)


def format_answer(x: torch.Tensor, answer: torch.Tensor, n: int) -> str:
    """One JSON line for a solved board: the given queens, the answer's queens and its validity."""
    given = (x.view(n, n) == QUEEN).nonzero().tolist()
    queens = (answer.view(n, n) == QUEEN).nonzero().tolist()
    valid = bool(is_valid_completion(x, answer, n))
    return json.dumps({"n": n, "queens": given, "answer": queens, "valid": valid})


class NQueensTask(Task):
    """The N-Queens task: splits (built once into the cache), a rule-based judge and the metrics.

    ``judge(x, answer, y)`` is :func:`is_valid_completion` (any valid completion is correct; ``y`` is not
    consulted). ``per_input`` gives per input the share of its ``N`` answers that are valid
    (``accuracy``) and coverage@N (distinct valid completions found / all valid completions).

    ``source``: a JSON Lines file of partial boards (:func:`read_boards`) to use instead of the generated
    ones; every input needs at least one completion. ``target``: ``random`` (a random valid completion
    per access, the default) or ``original`` (one fixed completion per input). ``augment``: a random
    dihedral symmetry per training access.
    """

    name = "nqueens"
    VERSION = 2

    def __init__(self, n: int = 8, removals=(5, 6, 7), test_fraction: float = 0.15, seed: int = 0,
                 target: str = "random", augment: bool = False, source: str | None = None,
                 cache_dir: str | None = None):
        check_arguments(self.name, {"target": (target, target in TARGETS, f"one of {', '.join(TARGETS)}")})
        removals = _check_args(n, None if source else removals, test_fraction)
        self.n, self.vocab_size, self.seq_len = n, VOCAB_SIZE, n * n
        solutions = boards_from_columns(all_solutions(n), n)
        if source:
            inputs = read_boards(source, n)
            _, counts = _completion_table(inputs, solutions)
            if (counts == 0).any():
                first = int((counts == 0).nonzero()[0, 0])
                raise UserError(f"{source}: board {first + 1} has no valid completion")
            splits = _split(n, inputs, solutions, test_fraction, seed)
        else:
            params = {"n": n, "removals": sorted(removals), "test_fraction": test_fraction, "seed": seed}
            arrays, _ = cached("nqueens", params, self.VERSION, lambda: self._build(params), cache_dir)
            splits = {name: NQueensSplit(n, *(torch.from_numpy(arrays[f"{name}/{key}"]) for key in SPLIT_ARRAYS),
                                         solutions) for name in ("train", "test")}
        for split in splits.values():
            split.target = target
        splits["train"].augment = augment
        self.splits = splits

    @staticmethod
    def _build(params: dict) -> tuple[dict, dict]:
        splits = build_nqueens(params["n"], params["removals"], params["test_fraction"], params["seed"])
        arrays = {f"{name}/{key}": getattr(split, key).numpy() for name, split in splits.items()
                  for key in SPLIT_ARRAYS}
        meta = {"vocab_size": VOCAB_SIZE, "seq_len": params["n"] ** 2,
                "counts": {name: len(split) for name, split in splits.items()}}
        return arrays, meta

    def judge(self, x: torch.Tensor, answer: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return is_valid_completion(x, answer, self.n)

    def per_input(self, split: str, index: torch.Tensor, answers: torch.Tensor) -> dict[str, torch.Tensor]:
        data = self.splits[split]
        valid = self.judge(data.inputs[index], answers)
        ids = solution_ids(data.completions[index], data.solutions, answers)
        return {"accuracy": valid.float().mean(0), "coverage": coverage_at_n(ids, data.num_completions[index])}

    def nearest_solution(self, x: torch.Tensor, logits: torch.Tensor, distinct: bool = False) -> torch.Tensor:
        """Among all n-queens solutions holding every queen of ``x [B, S]``, the most likely under
        ``logits [B, S, V]`` (:func:`most_likely`; with ``distinct``, different ones for equal inputs)."""
        solutions = self.splits["train"].solutions.to(x.device)
        queens = (x == QUEEN).float()
        allowed = queens @ (solutions == QUEEN).float().T == queens.sum(-1, keepdim=True)
        return most_likely(logits, solutions, allowed, same_input_groups(x) if distinct else None)

    def read_inputs(self, path) -> torch.Tensor:
        return read_boards(path, self.n)

    def format_answer(self, x: torch.Tensor, answer: torch.Tensor) -> str:
        return format_answer(x, answer, self.n)

    def stats(self) -> dict:
        splits = {name: {"inputs": len(split), "solutions_per_input": solutions_histogram(split.num_completions)}
                  for name, split in self.splits.items()}
        return {"task": self.name, "n": self.n, "vocab_size": self.vocab_size, "seq_len": self.seq_len,
                "total_solutions": len(self.splits["train"].solutions), "splits": splits}
