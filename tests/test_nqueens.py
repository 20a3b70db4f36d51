"""Tests for the N-Queens completion task."""

import re
from itertools import combinations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gram_pyro.config import UserError
from gram_pyro.tasks.nqueens import (
    EMPTY,
    QUEEN,
    NQueensTask,
    all_solutions,
    boards_from_columns,
    build_nqueens,
    dihedral_permutations,
    format_answer,
    is_valid_completion,
    read_boards,
    solution_ids,
)
from gram_pyro.tasks.base import coverage_at_n

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
    batch = s.batch(index, torch.Generator().manual_seed(0))
    x, y = batch.x, batch.y
    assert torch.equal(x, s.inputs)
    assert is_valid_completion(x, y, N).all()

    multi = int((s.num_completions > 1).nonzero()[0, 0])
    rep = torch.full((200,), multi)
    y1 = s.batch(rep, torch.Generator().manual_seed(3)).y
    assert len({tuple(r) for r in y1.tolist()}) > 1
    y2 = s.batch(rep, torch.Generator().manual_seed(3)).y
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
    ids = solution_ids(completions, solutions, answers)
    assert ids.tolist() == [[3, -1], [3, -1], [5, 7]]
    cov = coverage_at_n(ids, num)
    assert torch.allclose(cov, torch.tensor([2 / 3, 1.0]))
    superset = solutions[3].clone()
    superset[superset == EMPTY] = QUEEN
    cov = coverage_at_n(solution_ids(completions, solutions, superset.expand(1, 2, -1)), num)
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
    with pytest.raises(UserError, match=rf"^nqueens: {arg} must be "):
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


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return NQueensTask(n=6, removals=(2, 3), cache_dir=str(tmp_path_factory.mktemp("cache")))


def test_task_is_built_once_into_the_cache(tmp_path, monkeypatch):
    first = NQueensTask(n=6, removals=(2, 3), cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("nqueens-*.npz"))) == 1
    monkeypatch.setattr(NQueensTask, "_build", staticmethod(lambda params: pytest.fail("rebuilt")))
    again = NQueensTask(n=6, removals=(2, 3), cache_dir=str(tmp_path))
    assert torch.equal(again.splits["test"].inputs, first.splits["test"].inputs)
    assert torch.equal(again.splits["train"].completions, first.splits["train"].completions)


def test_changed_config_rebuilds_and_corrupt_cache_is_rebuilt(tmp_path, capsys):
    NQueensTask(n=6, removals=(2, 3), cache_dir=str(tmp_path))
    NQueensTask(n=6, removals=(3,), cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("nqueens-*.npz"))) == 2
    for npz in tmp_path.glob("nqueens-*.npz"):
        npz.write_bytes(b"not an archive")
    rebuilt = NQueensTask(n=6, removals=(3,), cache_dir=str(tmp_path))
    assert "damaged or foreign" in capsys.readouterr().err
    assert len(rebuilt.splits["train"]) + len(rebuilt.splits["test"]) > 0


def test_stats_count_inputs_and_solutions(tmp_path):
    stats = NQueensTask(cache_dir=str(tmp_path)).stats()
    assert stats["total_solutions"] == 92 and stats["seq_len"] == 64 and stats["vocab_size"] == 3
    hist = [stats["splits"][s]["solutions_per_input"] for s in ("train", "test")]
    assert sum(stats["splits"][s]["inputs"] for s in ("train", "test")) == 5148
    assert sum(h.get("1", 0) for h in hist) == round(0.655 * 5148)
    assert max(int(k) for h in hist for k in h) == 18


def test_original_target_is_fixed_and_valid(task):
    split = task.splits["train"]
    split.target = "original"
    try:
        index = torch.arange(len(split))
        y1 = split.batch(index, torch.Generator().manual_seed(0)).y
        y2 = split.batch(index, torch.Generator().manual_seed(1)).y
    finally:
        split.target = "random"
    assert torch.equal(y1, y2)
    assert is_valid_completion(split.inputs, y1, 6).all()


def test_dihedral_symmetries_are_distinct_and_keep_pairs_valid(task):
    perms = dihedral_permutations(6)
    assert torch.equal(perms[0], torch.arange(36))
    assert len({tuple(p) for p in perms.tolist()}) == 8
    split = task.splits["train"]
    split.augment = True
    try:
        batch = split.batch(torch.arange(len(split)), torch.Generator().manual_seed(0))
    finally:
        split.augment = False
    assert is_valid_completion(batch.x, batch.y, 6).all()
    assert not torch.equal(batch.x, split.inputs)


def test_per_input_metrics_have_one_value_per_input(task):
    split = task.splits["test"]
    index = torch.arange(4)
    answers = split.solutions[split.completions[index, 0]].expand(3, -1, -1)
    metrics = task.per_input("test", index, answers)
    assert torch.equal(metrics["accuracy"], torch.ones(4))
    assert torch.allclose(metrics["coverage"], 1 / split.num_completions[index].float())


def test_user_boards_are_read_and_bad_lines_named(tmp_path):
    good = tmp_path / "boards.jsonl"
    good.write_text('# two boards\n{"n": 6, "queens": [[0, 1]]}\n\n{"n": 6, "queens": []}\n')
    boards = read_boards(good, 6)
    assert boards.shape == (2, 36) and boards[0, 1] == QUEEN and (boards[1] == EMPTY).all()
    task = NQueensTask(n=6, source=str(good), test_fraction=0.5)
    assert len(task.splits["train"]) + len(task.splits["test"]) == 2
    cases = {
        '{"n": 6, "queens": [[0, 1]]}\n{"n": 6, queens: []}': ":2: invalid JSON (Expecting property name",
        '{"n": 8, "queens": []}': ":1: board size n=8",
        '{"n": 6, "queens": [[6, 0]]}': ":1: queen (6, 0) is off",
        '{"n": 6, "queens": [[0, 0], [1, 1]]}': ":1: two queens attack",
        '{"n": 6, "queens": [[0.7, 0]]}': ":1: queen [0.7, 0]: row and column must be integers in 0..5",
        '{"n": 6, "queens": [[1e400, 0]]}': ":1: queen [Infinity, 0]: row and column must be integers",
        '{"n": 6, "queens": [[true, 0]]}': ":1: queen [true, 0]: row and column must be integers",
        '{"n": 6.0, "queens": []}': ":1: n=6.0 is not an integer",
        '{"n": 6, "queens": [[0, 1, 2]]}': ':1: expected {"n": <int>, "queens": [[row, col], ...]}',
        '[1, 2]': ':1: expected {"n": <int>',
    }
    for text, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(UserError, match=re.escape(f"bad.jsonl{message}")):
            read_boards(bad, 6)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + good.read_bytes())  # a byte-order mark, as some editors write
    assert torch.equal(read_boards(bom, 6), boards)
    line = format_answer(boards[0], task.splits["train"].solutions[0], 6)
    assert '"valid"' in line
