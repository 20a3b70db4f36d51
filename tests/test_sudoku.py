"""Tests for the Sudoku tasks: solver, generator, rating, judge, augmentation, user files, metrics, cache."""

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import get_class
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from gram_pyro.config import UserError
from gram_pyro.tasks import sudoku_solver as solver
from gram_pyro.tasks.sudoku import (
    BLANK,
    PAD,
    SudokuTask,
    UnconditionalSudokuTask,
    apply_symmetry,
    format_answer,
    is_valid_solution,
    random_symmetry,
    read_puzzles,
    to_tokens,
)

CONFIGS = Path(__file__).parents[1] / "experiments" / "configs" / "task"
EASY = "003020600900305001001806400008102900700000008006708200002609500800203009005010300"
HARD = "800000000003600000070090200050007000000045700000100030001000068008500010090000400"
GRID_4 = "1234341221434321"


def values(text: str) -> list[int]:
    return [0 if char in ".0" else int(char) for char in text]


def tokens(text: str) -> torch.Tensor:
    return to_tokens(values(text))


@pytest.fixture(scope="module")
def generated():
    """Small generated sets: {size: (puzzles, solutions, ratings)} as digit arrays."""
    return {size: solver.generate_puzzles(size, count, seed=0) for size, count in ((4, 20), (6, 20), (9, 5))}


def test_4x4_has_exactly_288_complete_grids():
    grids = solver.find_solutions([0] * 16, 4, limit=1000)
    assert len(grids) == 288 == len({tuple(g) for g in grids})
    assert is_valid_solution(torch.full((16,), BLANK), to_tokens(grids), 4).all()


def test_box_shapes_follow_the_side():
    assert solver.geometry(4).groups[8] == (0, 1, 4, 5)
    assert solver.geometry(6).groups[12] == (0, 1, 2, 6, 7, 8)  # 2 rows x 3 columns
    assert solver.geometry(9).groups[18 + 4] == (30, 31, 32, 39, 40, 41, 48, 49, 50)
    assert all(len(p) == 20 for p in solver.geometry(9).peers)


@pytest.mark.parametrize("size", [4, 6, 9])
def test_generated_puzzles_have_exactly_one_solution(generated, size):
    puzzles, solutions, ratings = generated[size]
    assert puzzles.shape == solutions.shape == (len(ratings), size * size)
    assert len({tuple(p) for p in puzzles.tolist()}) == len(puzzles)
    assert is_valid_solution(to_tokens(puzzles), to_tokens(solutions), size).all()
    for puzzle, solution in zip(puzzles.tolist(), solutions.tolist()):
        assert solver.find_solutions(puzzle, size, limit=2) == [solution]
    assert (ratings >= 0).all()


@pytest.mark.parametrize("size", [4, 6])
def test_generated_puzzles_are_minimal(generated, size):
    for puzzle in generated[size][0].tolist():
        for cell in np.flatnonzero(puzzle):
            fewer = list(puzzle)
            fewer[cell] = 0
            assert len(solver.find_solutions(fewer, size, limit=2)) == 2


def test_generation_is_seeded(generated):
    again = solver.generate_puzzles(6, 20, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(again, generated[6]))
    assert not np.array_equal(solver.generate_puzzles(6, 20, seed=1)[0], generated[6][0])


def test_asking_for_more_distinct_items_than_exist_is_an_error():
    with pytest.raises(ValueError, match="found only 288 distinct"):
        solver.random_grids(4, 289, seed=0)


def test_rating_counts_dead_ends_of_the_fixed_search():
    assert solver.rating(values(EASY), 9) == 0  # naked singles solve it
    solution = solver.find_solutions(values(EASY), 9, limit=2)[0]
    assert solver.rating([0] + solution[1:], 9) == 0
    # pins the fixed search: changing it changes stored ratings, so GENERATOR_VERSION must move with it
    assert solver.rating(values(HARD), 9) == 922
    with pytest.raises(ValueError, match="conflict"):
        solver.rating([1, 1] + [0] * 79, 9)


def test_judge_rejects_each_rule_violation_and_accepts_valid_grids():
    solution = to_tokens(solver.find_solutions(values(EASY), 9, limit=2)[0])
    x = tokens(EASY)
    assert is_valid_solution(x, solution, 9)

    def swapped(a, b):
        grid = solution.clone()
        grid[[a, b]] = grid[[b, a]]
        return grid

    relabelled = solution.clone()
    relabelled[solution == 2], relabelled[solution == 3] = 3, 2
    cyclic = torch.tensor([(r + c) % 9 + 2 for r in range(9) for c in range(9)])
    blank_left, pad, clue_changed = solution.clone(), solution.clone(), relabelled
    blank_left[40], pad[40] = BLANK, PAD
    cases = {
        "column duplicates (rows and boxes fine)": swapped(0, 1),
        "row duplicates (columns and boxes fine)": swapped(0, 9),
        "box duplicates (a Latin square)": cyclic,
        "blank left": blank_left,
        "pad token": pad,
    }
    blank = torch.full((81,), BLANK)
    for name, answer in cases.items():
        assert not is_valid_solution(blank, answer, 9), name
    assert is_valid_solution(blank, clue_changed, 9)
    assert not is_valid_solution(x, clue_changed, 9), "clue changed"


def test_judge_broadcasts_answers_over_inputs(generated):
    puzzles, solutions, _ = generated[6]
    x, y = to_tokens(puzzles[:3]), to_tokens(solutions[:3])
    answers = torch.stack([y, y.roll(1, 0), x])  # [N=3, M=3, S]
    ok = is_valid_solution(x, answers, 6)
    assert ok.shape == (3, 3)
    assert ok[0].all() and not ok[1].any() and not ok[2].any()


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), size=st.sampled_from([4, 6, 9]))
def test_augmentation_maps_valid_pairs_to_valid_pairs(generated, seed, size):
    puzzles, solutions, _ = generated[size]
    x, y = to_tokens(puzzles), to_tokens(solutions)
    source, token_map = random_symmetry(len(x), size, torch.Generator().manual_seed(seed))
    assert torch.equal(source.sort(-1).values, torch.arange(size * size).expand_as(source))
    new_x, new_y = apply_symmetry(x, source, token_map), apply_symmetry(y, source, token_map)
    assert torch.equal((new_x == BLANK).sum(-1), (x == BLANK).sum(-1))
    assert is_valid_solution(new_x, new_y, size).all()
    for puzzle, solution in zip((new_x - 1).tolist(), (new_y - 1).tolist()):
        assert solver.find_solutions(puzzle, size, limit=2) == [solution]


@pytest.mark.parametrize("size,transposes", [(9, True), (6, False)])
def test_augmentation_draws_every_kind_of_move(size, transposes):
    source, token_map = random_symmetry(2000, size, torch.Generator().manual_seed(0))
    rows, cols = source // size, source % size
    # new cells 0 and 1 share a row: they come from one old row unless the draw transposes
    assert ((rows[:, 1] != rows[:, 0]).any()).item() is transposes
    assert len(torch.unique(rows[:, 0])) == size and len(torch.unique(cols[:, 0])) == size
    assert len(torch.unique(token_map[:, 2])) == size
    assert torch.equal(token_map[:, :2], torch.tensor([[PAD, BLANK]]).expand(2000, 2))


def write(tmp_path, lines) -> Path:
    path = tmp_path / "puzzles.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@settings(max_examples=50, deadline=None)
@given(data=st.data(), size=st.sampled_from([4, 6, 9]))
def test_text_format_round_trips(tmp_path_factory, generated, data, size):
    solutions = to_tokens(generated[size][1])
    blanks = torch.tensor(data.draw(st.lists(st.booleans(), min_size=size * size, max_size=size * size)))
    grids = torch.stack([solutions[0].masked_fill(blanks, BLANK), solutions[1]])
    lines = [format_answer(g) for g in grids]
    assert all(len(line) == size * size for line in lines)
    assert lines[1].isdigit()
    path = write(tmp_path_factory.mktemp("round_trip"), ["# a comment", lines[0], "", lines[1]])
    assert torch.equal(read_puzzles(path, size), grids)


def test_task_answer_lines_are_bare_grids_that_read_back(tmp_path):
    task = SudokuTask(size=4, num_train=2, num_test=1, extreme_pool=0, num_extreme=0, cache_dir=str(tmp_path))
    x, y = task.splits["test"].inputs[0], task.splits["test"].targets[0, 0]
    lines = [task.format_answer(x, y), task.format_answer(x, x)]
    assert lines == [format_answer(y), format_answer(x)] and not task.verdict_in_answer
    assert torch.equal(task.read_inputs(write(tmp_path, lines)), torch.stack([y, x]))
    uncond = UnconditionalSudokuTask(size=4, cache_dir=str(tmp_path))
    assert uncond.format_answer(uncond.splits["test"].inputs[0], y) == format_answer(y)
    with pytest.raises(UserError, match="no user input format"):
        uncond.read_inputs(tmp_path / "puzzles.txt")


@pytest.mark.parametrize(
    "bad,message",
    [
        ("1234", "expected 16 characters"),
        ("123x" + "." * 12, "bad character 'x' at position 4"),
        ("1235" + "." * 12, "bad character '5'"),
        ("1..." + "1" + "." * 11, "digit 1 twice in column 1"),
        ("11.." + "." * 12, "digit 1 twice in row 1"),
        ("1...." + "1" + "." * 10, "digit 1 twice in box 1"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, bad, message):
    path = write(tmp_path, ["# header", GRID_4, bad])
    with pytest.raises(UserError, match=rf"^{path}:3: .*{message}"):
        read_puzzles(path, 4)


def test_source_file_trains_on_all_solutions_of_each_puzzle(tmp_path):
    two_solutions = ".." + GRID_4[2:8] + ".." + GRID_4[10:]  # a swappable rectangle of 1s and 2s
    lines = [GRID_4, two_solutions, "1.3." + GRID_4[4:], "..34" + GRID_4[4:], "12..34.." + "." * 8]
    task = SudokuTask(size=4, source=str(write(tmp_path, lines)), augment=False, cache_dir=str(tmp_path))
    total = sum(len(s) for s in task.splits.values())
    assert total == 5 and len(task.splits["test"]) == 1
    merged = torch.cat([s.num_solutions for s in task.splits.values()])
    assert sorted(merged.tolist()) == [1, 1, 1, 2, 12]
    for split in task.splits.values():
        for inputs, targets, count in zip(split.inputs, split.targets, split.num_solutions):
            assert task.judge(inputs, targets[:count]).all()
            assert len({tuple(t) for t in targets[:count].tolist()}) == count
    split = next(s for s in task.splits.values() if (s.num_solutions == 2).any())
    row = int((split.num_solutions == 2).nonzero()[0, 0])
    batch = split.batch(torch.full((100,), row), torch.Generator().manual_seed(0))
    assert len({tuple(y) for y in batch.y.tolist()}) == 2
    assert task.judge(batch.x, batch.y).all()
    answers = split.targets[row, :2][:, None]  # [N=2, M=1, S]: both solutions
    scores = task.per_input("train" if split is task.splits["train"] else "test", torch.tensor([row]), answers)
    assert scores["accuracy"].tolist() == scores["exact"].tolist() == scores["cells"].tolist() == [1.0]


@pytest.mark.parametrize(
    "line,message", [("12..\n..3.\n..4.\n....", "no solution"), ("." * 16, "more than 64 solutions")]
)
def test_source_puzzle_without_or_with_too_many_solutions_names_its_line(tmp_path, line, message):
    path = write(tmp_path, [GRID_4, line.replace("\n", "")])
    with pytest.raises(UserError, match=rf"^{path}:2: .*{message}"):
        SudokuTask(size=4, source=str(path), cache_dir=str(tmp_path))


def test_conditional_task_splits_metrics_and_stats(tmp_path):
    task = SudokuTask(size=6, num_train=12, num_test=6, extreme_pool=10, num_extreme=3, cache_dir=str(tmp_path))
    train, test, extreme = task.splits["train"], task.splits["test"], task.splits["extreme"]
    assert (len(train), len(test), len(extreme)) == (12, 6, 3)
    assert task.vocab_size == 8 and task.seq_len == 36
    inputs = {tuple(r) for s in task.splits.values() for r in s.inputs.tolist()}
    assert len(inputs) == 21
    pool = SudokuTask(size=6, num_train=12, num_test=6, extreme_pool=10, num_extreme=10, cache_dir=str(tmp_path))
    assert extreme.ratings.min() >= pool.splits["extreme"].ratings.sort(descending=True).values[2]

    batch = train.batch(torch.arange(12), torch.Generator().manual_seed(0))
    assert task.judge(batch.x, batch.y).all() and not torch.equal(batch.x, train.inputs)
    plain = test.batch(torch.arange(6), torch.Generator().manual_seed(0))
    assert torch.equal(plain.x, test.inputs) and torch.equal(plain.y, test.targets[:, 0])

    index = torch.tensor([0, 2])
    solved = test.targets[index, 0]
    relabelled = solved.clone()
    relabelled[solved == 2], relabelled[solved == 3] = 3, 2
    answers = torch.stack([solved, test.inputs[index], relabelled])
    scores = task.per_input("test", index, answers)
    # a unique-solution puzzle lacks at most one digit, so swapping digits 1 and 2 changes a clue
    assert torch.allclose(scores["exact"], torch.full((2,), 1 / 3))
    assert torch.allclose(scores["accuracy"], torch.full((2,), 1 / 3))
    blank = test.inputs[index] == 1
    swapped = ((relabelled == solved) & blank).sum(-1) / blank.sum(-1)  # the blanks holding neither digit
    assert torch.allclose(scores["cells"], (1 + 0 + swapped) / 3)  # solved: all, the puzzle itself: none
    stats = task.stats()
    assert stats["splits"]["train"]["solutions_per_input"] == {"1": 12}
    assert stats["splits"]["extreme"]["rating"]["min"] == int(extreme.ratings.min())
    assert 9 <= stats["splits"]["test"]["clues"]["min"] <= stats["splits"]["test"]["clues"]["max"] < 36


def test_unconditional_4x4_metrics_on_hand_made_answers(tmp_path):
    task = UnconditionalSudokuTask(size=4, num_test=3, cache_dir=str(tmp_path))
    assert len(task.grids) == 288 and len(task.splits["train"]) == 288 and len(task.splits["test"]) == 3
    assert (task.splits["test"].inputs == BLANK).all()
    a, b = task.grids[0], task.grids[1]
    invalid = a.clone()
    invalid[0] = invalid[1]
    answers = torch.stack([torch.stack([a, a, invalid]), torch.stack([b, a, a])])  # [N=2, M=3, S]
    scores = task.score("test", torch.arange(3), answers)
    assert scores["validity"] == scores["accuracy"] == pytest.approx(5 / 6)
    assert scores["uniqueness"] == pytest.approx(2 / 5)
    assert scores["equal_pairs"] == 6  # a four times: C(4, 2); b once
    assert scores["coverage"] == pytest.approx(2 / 288)
    assert task.per_input("test", torch.arange(3), answers)["accuracy"].tolist() == [1.0, 1.0, 0.5]
    none_valid = task.score("test", torch.arange(3), torch.full((1, 3, 16), BLANK))
    assert none_valid["validity"] == none_valid["uniqueness"] == none_valid["coverage"] == 0
    assert none_valid["equal_pairs"] == 0
    half = UnconditionalSudokuTask(size=4, train_fraction=0.5, cache_dir=str(tmp_path))
    assert len(half.splits["train"]) == 144 and half.stats()["grids"] == 288


def test_unconditional_9x9_grids_are_distinct_valid_targets(tmp_path):
    task = UnconditionalSudokuTask(size=9, num_grids=30, num_test=4, cache_dir=str(tmp_path))
    assert "coverage" not in task.score("test", torch.arange(4), task.grids[:4][None])
    assert len(torch.unique(task.grids, dim=0)) == 30
    batch = task.splits["train"].batch(torch.arange(30), torch.Generator().manual_seed(0))
    assert (batch.x == BLANK).all() and task.judge(batch.x, batch.y).all()
    assert task.stats()["splits"]["train"] == {"inputs": 30, "solutions_per_input": None}


def test_cache_is_reused_and_a_corrupt_file_rebuilt(tmp_path, monkeypatch):
    calls = []
    generate = solver.generate_puzzles

    def counted(*args):
        calls.append(args)
        return generate(*args)

    monkeypatch.setattr(solver, "generate_puzzles", counted)
    first = SudokuTask(size=4, num_train=8, num_test=4, extreme_pool=0, num_extreme=0, cache_dir=str(tmp_path))
    assert len(calls) == 1
    second = SudokuTask(size=4, num_train=8, num_test=4, extreme_pool=0, num_extreme=0, cache_dir=str(tmp_path))
    assert len(calls) == 1 and torch.equal(first.splits["train"].inputs, second.splits["train"].inputs)
    (npz,) = tmp_path.glob("sudoku-*.npz")
    npz.write_bytes(b"not an archive")
    third = SudokuTask(size=4, num_train=8, num_test=4, extreme_pool=0, num_extreme=0, cache_dir=str(tmp_path))
    assert len(calls) == 2 and torch.equal(first.splits["test"].targets, third.splits["test"].targets)


@pytest.mark.parametrize(
    "cls,kwargs,message",
    [
        (SudokuTask, {"size": 5}, "size"),
        (SudokuTask, {"num_train": 0}, "num_train"),
        (SudokuTask, {"num_extreme": 3, "extreme_pool": 2}, "num_extreme"),
        (SudokuTask, {"test_fraction": 1.0}, "test_fraction"),
        (UnconditionalSudokuTask, {"size": 4.0}, "size"),
        (UnconditionalSudokuTask, {"train_fraction": 0.0}, "train_fraction"),
        (UnconditionalSudokuTask, {"num_test": 0}, "num_test"),
    ],
)
def test_bad_arguments_are_named(tmp_path, cls, kwargs, message):
    family = "sudoku" if cls is SudokuTask else "uncond_sudoku"
    with pytest.raises(UserError, match=rf"^{family}: {message} must be ") as error:
        cls(cache_dir=str(tmp_path), **kwargs)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["sudoku", "sudoku4", "sudoku6", "uncond_sudoku", "uncond_sudoku4"])
def test_configs_name_the_task_class_and_its_arguments(name):
    config = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    target = get_class(config.pop("_target_"))
    assert set(config) == set(inspect.signature(target).parameters)
    assert config["size"] == (int(name[-1]) if name[-1].isdigit() else 9)
