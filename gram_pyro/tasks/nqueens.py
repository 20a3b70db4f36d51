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

from dataclasses import dataclass
from itertools import combinations

import torch

EMPTY, QUEEN = 1, 2
VOCAB_SIZE = 3


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


@dataclass
class NQueensSplit:
    """One split of the task.

    inputs: LongTensor ``[M, n*n]`` tokens; completions: LongTensor ``[M, C_max]``
    indices into ``solutions`` padded with -1; num_completions: LongTensor ``[M]``;
    solutions: LongTensor ``[S, n*n]`` token boards (the same object in every split).
    """

    n: int
    inputs: torch.Tensor
    completions: torch.Tensor
    num_completions: torch.Tensor
    solutions: torch.Tensor

    def __len__(self) -> int:
        """Number of unique inputs."""
        return self.inputs.shape[0]

    def batch(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``x = inputs[index]`` and ``y``: one uniformly random valid completion per row, drawn with ``generator``."""
        counts = self.num_completions[index]
        u = torch.rand(counts.shape, generator=generator, device=counts.device)
        slot = torch.minimum((u * counts).long(), counts - 1)
        choice = self.completions[index, slot]
        return self.inputs[index], self.solutions[choice]


def _completion_table(inputs: torch.Tensor, solutions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[M, C_max]`` (-1 padded) and counts ``[M]`` of the solutions containing every queen of each input."""
    queens = (inputs == QUEEN).float()
    overlap = queens @ (solutions == QUEEN).float().T
    match = overlap == queens.sum(-1, keepdim=True)
    counts = match.sum(-1)
    rows, sols = match.nonzero(as_tuple=True)
    starts = torch.cumsum(counts, 0) - counts
    slots = torch.arange(rows.numel()) - starts[rows]
    table = torch.full((inputs.shape[0], int(counts.max())), -1, dtype=torch.long)
    table[rows, slots] = sols
    return table, counts


def build_nqueens(
    n: int = 8, removals=(5, 6, 7), test_fraction: float = 0.15, seed: int = 0
) -> dict[str, NQueensSplit]:
    """Build ``{'train': ..., 'test': ...}``; split 85:15 by unique input with a permutation seeded by ``seed``."""
    if not 4 <= n <= 12:
        raise ValueError(f"n must be in 4..12, got {n}")
    removals = tuple(removals)
    if not removals or any(not 1 <= k <= n for k in removals):
        raise ValueError(f"removals must be a non-empty set of k in 1..{n}, got {removals}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")

    solutions = boards_from_columns(all_solutions(n), n)
    removed = [rows for k in removals for rows in combinations(range(n), k)]
    keep_rows = torch.ones(len(removed), n, dtype=torch.bool)
    for i, rows in enumerate(removed):
        keep_rows[i, list(rows)] = False
    keep = keep_rows.repeat_interleave(n, dim=1)
    partial = torch.where((solutions == QUEEN)[:, None] & keep, QUEEN, EMPTY).to(torch.uint8)
    inputs = torch.unique(partial.flatten(0, 1), dim=0).long()
    table, counts = _completion_table(inputs, solutions)

    perm = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(inputs))
    splits = {}
    for name, idx in (("test", perm[:n_test]), ("train", perm[n_test:])):
        idx = idx.sort().values
        c = counts[idx]
        splits[name] = NQueensSplit(n, inputs[idx], table[idx, : int(c.max())], c, solutions)
    return {"train": splits["train"], "test": splits["test"]}


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


def coverage(
    x_completions: torch.Tensor, num_completions: torch.Tensor, solutions: torch.Tensor, answers: torch.Tensor
) -> torch.Tensor:
    """Float ``[M]``: distinct completions of input m among its N answers (``answers [N, M, n*n]``), over ``num_completions[m]``.

    An answer counts only if it equals one of that input's completions
    (``x_completions [M, C_max]``, -1 padded indices into ``solutions [S, n*n]``).
    Each answer is matched to a solution by queen overlap: it equals solution s
    iff all its tokens are EMPTY/QUEEN and its queen set equals that of s.
    """
    q = (answers == QUEEN).float()
    sol_q = (solutions == QUEEN).float()
    overlap = q @ sol_q.T
    legal = ((answers == EMPTY) | (answers == QUEEN)).all(-1, keepdim=True)
    same = legal & (overlap == q.sum(-1, keepdim=True)) & (overlap == sol_q.sum(-1))
    matched = torch.where(same.any(-1), same.float().argmax(-1), -1)
    found = (matched[..., None] == x_completions).any(0) & (x_completions >= 0)
    return found.sum(-1) / num_completions


class NQueensTask:
    """The N-Queens task as the trainer and evaluator use it: splits, sizes and a judge.

    ``judge(x, answer, y)`` is :func:`is_valid_completion` (any valid completion is correct; ``y`` is
    not consulted). ``score(split, index, answers [N, M, n*n])`` gives accuracy (share of the ``N x M``
    answers that are valid) and coverage@N (mean over inputs of distinct valid completions found /
    all valid completions).
    """

    def __init__(self, n: int = 8, removals=(5, 6, 7), test_fraction: float = 0.15, seed: int = 0):
        self.n, self.vocab_size, self.seq_len = n, VOCAB_SIZE, n * n
        self.splits = build_nqueens(n, removals, test_fraction, seed)

    def judge(self, x: torch.Tensor, answer: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return is_valid_completion(x, answer, self.n)

    def score(self, split: str, index: torch.Tensor, answers: torch.Tensor) -> dict[str, float]:
        data = self.splits[split]
        valid = self.judge(data.inputs[index], answers)
        covered = coverage(data.completions[index], data.num_completions[index], data.solutions, answers)
        return {"accuracy": valid.float().mean().item(), "coverage": covered.mean().item()}
