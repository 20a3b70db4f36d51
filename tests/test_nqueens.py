"""Tests for the N-Queens completion task."""

from itertools import combinations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gram_pyro.tasks.nqueens import (
    all_solutions,
    EMPTY,
    QUEEN,
    boards_from_columns,
    build_nqueens,
    coverage,
    is_valid_completion,
)

N = 8
SOLUTIONS_8 = all_solutions(N)


@pytest.fixture(scope="module")
def splits():
    return build_nqueens(N)


def board(cols):
    """Token board for a list of columns (one per row)."""
    return boards_from_columns(torch.tensor(cols), N)


@pytest.mark.parametrize("n,count", [(4, 2), (5, 10), (6, 4), (7, 40), (8, 92), (9, 352), (10, 724)])
def test_solution_counts_match_known_totals(n, count):
    sols = all_solutions(n)
    assert sols.shape == (count, n)
    assert len({tuple(s) for s in sols.tolist()}) == count
    assert sols.tolist() == sorted(sols.tolist())


def test_n8_dataset_statistics_match_paper(splits):
    train, test = splits["train"], splits["test"]
    counts = torch.cat([train.num_completions, test.num_completions])
    assert len(train) + len(test) == 5148
    assert counts.max() == 18
    assert abs((counts == 1).float().mean().item() - 0.655) < 1e-3
    assert abs(len(test) / (len(train) + len(test)) - 0.15) < 1e-3
    train_rows = {tuple(r) for r in train.inputs.tolist()}
    assert not train_rows & {tuple(r) for r in test.inputs.tolist()}
    assert train.solutions is test.solutions


def test_build_is_deterministic_given_seed(splits):
    again = build_nqueens(N)
    assert torch.equal(again["test"].inputs, splits["test"].inputs)
    other = build_nqueens(N, seed=1)
    assert not torch.equal(other["test"].inputs, splits["test"].inputs)


@pytest.mark.parametrize("name", ["train", "test"])
def test_stored_completions_are_valid_distinct_and_exhaustive(splits, name):
    s = splits[name]
    c_max = s.completions.shape[1]
    pad = s.completions < 0
    assert torch.equal((~pad).sum(-1), s.num_completions)
    assert torch.equal(pad, torch.arange(c_max) >= s.num_completions[:, None])
    answers = s.solutions[s.completions.clamp(min=0)]
    ok = is_valid_completion(s.inputs[:, None], answers, N)
    assert (ok | pad).all()
    idx = s.completions.masked_fill(pad, -2)
    dup = (idx[:, :, None] == idx[:, None, :]) & ~pad[:, :, None] & ~torch.eye(c_max, dtype=torch.bool)
    assert not dup.any()
    sol_q = s.solutions == QUEEN
    contains = ((s.inputs == QUEEN)[:, None] & ~sol_q).any(-1).logical_not()
    num_sol = len(s.solutions)
    listed = torch.zeros(len(s), num_sol + 1, dtype=torch.bool)
    listed.scatter_(1, s.completions.masked_fill(pad, num_sol), True)
    assert torch.equal(contains, listed[:, :num_sol])


def test_original_board_is_among_completions(splits):
    table = {}
    for split in splits.values():
        for inp, comp in zip(split.inputs.tolist(), split.completions.tolist()):
            table[tuple(inp)] = set(comp)
    for index, cols in enumerate(SOLUTIONS_8.tolist()):
        for k in (5, 6, 7):
            for rows in combinations(range(N), k):
                partial = board(cols)
                partial.view(N, N)[list(rows)] = EMPTY
                assert index in table[tuple(partial.tolist())]


def test_batch_targets_are_valid_random_and_reproducible(splits):
    s = splits["train"]
    index = torch.arange(len(s))
    x, y = s.batch(index, torch.Generator().manual_seed(0))
    assert torch.equal(x, s.inputs)
    assert is_valid_completion(x, y, N).all()

    multi = int((s.num_completions > 1).nonzero()[0, 0])
    rep = torch.full((200,), multi)
    _, y1 = s.batch(rep, torch.Generator().manual_seed(3))
    assert len({tuple(r) for r in y1.tolist()}) > 1
    _, y2 = s.batch(rep, torch.Generator().manual_seed(3))
    assert torch.equal(y1, y2)


def test_is_valid_completion_rejects_each_rule_violation():
    cols = SOLUTIONS_8[0].tolist()  # [0, 4, 7, 5, 2, 6, 1, 3]
    valid = board(cols)
    x = valid.clone()
    x.view(N, N)[1:] = EMPTY  # only the queen at (0, 0) is given
    blank = torch.full((N * N,), EMPTY)
    assert is_valid_completion(x, valid, N)

    def edit(changes):
        b = valid.clone()
        for (r, c), token in changes.items():
            b[r * N + c] = token
        return b

    cases = {
        "two in a row": (blank, edit({(7, 3): EMPTY, (6, 3): QUEEN})),
        "two in a column": (blank, edit({(7, 3): EMPTY, (7, 1): QUEEN})),
        "two on a diagonal": (blank, board(list(range(N)))),
        "two on an anti-diagonal": (blank, board(list(reversed(range(N))))),
        "too few queens": (blank, edit({(7, 3): EMPTY})),
        "input queen moved": (x, board(SOLUTIONS_8[-1].tolist())),
        "pad token": (blank, edit({(2, 0): 0})),
        "illegal token": (blank, edit({(2, 0): 3})),
    }
    for name, (given_x, answer) in cases.items():
        assert not is_valid_completion(given_x, answer, N), name
    assert is_valid_completion(blank, board(SOLUTIONS_8[-1].tolist()), N)


def test_is_valid_completion_broadcasts_leading_dims():
    x = board(SOLUTIONS_8[:4].tolist())  # [B=4, L]
    answers = torch.stack([x, board(SOLUTIONS_8[4:8].tolist()), x])  # [N=3, B, L]
    ok = is_valid_completion(x, answers, N)
    assert ok.shape == (3, 4)
    assert ok[0].all() and ok[2].all() and not ok[1].any()


def test_coverage_counts_distinct_valid_completions_only():
    solutions = boards_from_columns(SOLUTIONS_8, N)
    completions = torch.tensor([[3, 5, 9, -1], [7, -1, -1, -1]])
    num = torch.tensor([3, 1])
    garbage = torch.full((N * N,), EMPTY)
    answers = torch.stack(
        [
            torch.stack([solutions[3], solutions[10]]),  # input 1: foreign solution
            torch.stack([solutions[3], garbage]),  # duplicate of 3; invalid board
            torch.stack([solutions[5], solutions[7]]),
        ]
    )
    cov = coverage(completions, num, solutions, answers)
    assert torch.allclose(cov, torch.tensor([2 / 3, 1.0]))
    superset = solutions[3].clone()
    superset[superset == EMPTY] = QUEEN
    cov = coverage(completions, num, solutions, superset.expand(1, 2, -1))
    assert torch.equal(cov, torch.zeros(2))


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"n": 3}, "n"),
        ({"n": 13}, "n"),
        ({"removals": (0,)}, "removals"),
        ({"removals": (9,)}, "removals"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
    ],
)
def test_build_rejects_bad_arguments_naming_them(kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg} "):
        build_nqueens(**kwargs)


@settings(max_examples=200, deadline=None)
@given(
    index=st.integers(0, len(SOLUTIONS_8) - 1),
    removed=st.lists(st.booleans(), min_size=N, max_size=N),
    row=st.integers(0, N - 1),
    shift=st.integers(1, N - 1),
)
def test_partial_completed_by_original_but_not_by_moved_queen(index, removed, row, shift):
    cols = SOLUTIONS_8[index]
    solution = board(cols.tolist())
    x = solution.clone()
    x.view(N, N)[torch.tensor(removed)] = EMPTY
    assert is_valid_completion(x, solution, N)
    moved = cols.clone()
    moved[row] = (moved[row] + shift) % N
    assert not is_valid_completion(x, board(moved.tolist()), N)
