"""Tests for the binarized digits and MNIST tasks, the IDX reader and the digits classifier scores."""

import gzip
import struct

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from omegaconf import OmegaConf
from sklearn.datasets import load_digits

from gram_pyro.config import UserError, build, compose_config
from gram_pyro.tasks.digits import (
    OFF,
    ON,
    RECOGNISABLE,
    DigitsTask,
    MnistTask,
    bits_from_tokens,
    is_well_formed,
    read_idx,
    to_digits_frame,
    tokens_from_bits,
)
from gram_pyro.tasks.digits_classifier import classify, frechet_distance, inception_score, load_classifier

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return DigitsTask(cache_dir=str(tmp_path_factory.mktemp("cache")))


def features(split):
    return classify(bits_from_tokens(split.images))


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file holding ``array``."""
    return struct.pack(f">BBBB{array.ndim}I", 0, 0, 0x08, array.ndim, *array.shape) + array.tobytes()


def mnist_pixels(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 28, 28), dtype=np.uint8)


# ---- data ----------------------------------------------------------------------------------------

def test_splits_partition_the_thresholded_digits(task):
    train, test = task.splits["train"], task.splits["test"]
    assert (len(train), len(test)) == (1527, 270)
    digits = load_digits()
    expected = sorted(map(tuple, (digits.data > 8).astype(int).tolist()))
    found = sorted(map(tuple, bits_from_tokens(torch.cat([train.images, test.images])).int().tolist()))
    assert found == expected
    assert sorted(torch.cat([train.labels, test.labels]).tolist()) == sorted(digits.target.tolist())
    assert task.vocab_size == 3 and task.seq_len == 64


def test_split_is_seeded(task, tmp_path):
    again = DigitsTask(cache_dir=str(tmp_path))
    assert torch.equal(again.splits["test"].images, task.splits["test"].images)
    other = DigitsTask(seed=1, cache_dir=str(tmp_path))
    assert not torch.equal(other.splits["test"].labels, task.splits["test"].labels)


def test_threshold_sets_the_binarization(tmp_path):
    low = DigitsTask(threshold=2, cache_dir=str(tmp_path))
    high = DigitsTask(threshold=14, cache_dir=str(tmp_path))
    assert (bits_from_tokens(low.splits["train"].images) >= bits_from_tokens(high.splits["train"].images)).all()
    assert (low.splits["train"].images == ON).sum() > 3 * (high.splits["train"].images == ON).sum()


def test_batch_is_blank_input_and_image_target(task):
    split = task.splits["train"]
    index = torch.tensor([5, 0, 5])
    batch = split.batch(index, torch.Generator().manual_seed(0))
    assert batch.x.dtype == batch.y.dtype == torch.long
    assert torch.equal(batch.x, torch.full((3, 64), OFF))
    assert torch.equal(batch.y, split.images[index].long())
    assert split.inputs.shape == (len(split), 64) and split.puzzles is None and split.num_solutions is None


def test_stats_report_counts_and_labels(task):
    stats = task.stats()
    assert stats["task"] == "digits" and stats["vocab_size"] == 3 and stats["seq_len"] == 64
    assert stats["threshold"] == 8
    for name, split in task.splits.items():
        assert stats["splits"][name]["inputs"] == len(split)
        assert stats["splits"][name]["solutions_per_input"] is None
        assert sum(stats["splits"][name]["labels"].values()) == len(split)
    assert stats["splits"]["train"]["labels"]["3"] == int((task.splits["train"].labels == 3).sum())


def test_corrupt_cache_is_rebuilt(tmp_path, capsys):
    first = DigitsTask(cache_dir=str(tmp_path))
    (archive,) = tmp_path.glob("digits-*.npz")
    archive.write_bytes(b"not an archive")
    rebuilt = DigitsTask(cache_dir=str(tmp_path))
    assert "damaged" in capsys.readouterr().err
    assert torch.equal(rebuilt.splits["train"].images, first.splits["train"].images)
    assert np.load(archive)["train_images"].shape == (1527, 64)


@pytest.mark.parametrize("kwargs,key", [({"threshold": 16}, "threshold"), ({"threshold": -1}, "threshold"),
                                        ({"threshold": 4.5}, "threshold"), ({"test_fraction": 0.0}, "test_fraction"),
                                        ({"test_fraction": 1.0}, "test_fraction")])
def test_bad_config_is_a_one_line_error_naming_the_key(tmp_path, kwargs, key):
    with pytest.raises(UserError, match=rf"^digits: {key} must be ") as error:
        DigitsTask(cache_dir=str(tmp_path), **kwargs)
    assert "\n" not in str(error.value)


def test_configs_build_the_tasks(tmp_path):
    digits = build(compose_config("train", ["task=digits", f"task.cache_dir={tmp_path}"]).task, "task")
    assert isinstance(digits, DigitsTask) and digits.seq_len == 64
    assert OmegaConf.is_missing(compose_config("train", ["task=mnist"]).task, "images")
    images = tmp_path / "images-idx3-ubyte"
    images.write_bytes(idx_bytes(mnist_pixels(20)))
    mnist = build(compose_config("train", ["task=mnist", f"task.images={images}", f"task.cache_dir={tmp_path}"]).task,
                  "task")
    assert isinstance(mnist, MnistTask) and mnist.seq_len == 14 * 14


# ---- encoding and judge ----------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(bits=hnp.arrays(np.bool_, st.tuples(st.integers(1, 4), st.just(64))))
def test_tokens_round_trip_bits(bits):
    bits = torch.from_numpy(bits)
    tokens = tokens_from_bits(bits)
    assert ((tokens == OFF) | (tokens == ON)).all() and is_well_formed(tokens).all()
    assert torch.equal(bits_from_tokens(tokens), bits)


@settings(max_examples=50, deadline=None)
@given(tokens=hnp.arrays(np.int64, st.tuples(st.integers(1, 4), st.just(64)), elements=st.integers(0, 3)))
def test_judge_accepts_exactly_the_images(task, tokens):
    tokens = torch.from_numpy(tokens)
    blank = task.splits["test"].inputs[: len(tokens)]
    expected = torch.tensor([set(row) <= {OFF, ON} for row in tokens.tolist()])
    assert torch.equal(task.judge(blank, tokens), expected)


def test_malformed_answers_are_flagged_and_left_out_of_the_scores(task):
    images = task.splits["test"].images.long()[:100]
    malformed = images.clone()
    malformed[:, 7] = 0  # a pad token in every row
    malformed[::2, 9] = 3  # and an out-of-vocabulary token in half of them
    answers = torch.stack([images, malformed])  # [N=2, M=100, 64]
    accuracy = task.per_input("test", torch.arange(100), answers)["accuracy"]
    assert torch.equal(accuracy, torch.full((100,), 0.5))
    mixed = task.score("test", torch.arange(100), answers)
    clean = task.score("test", torch.arange(100), images[None])
    assert mixed["accuracy"] == mixed["well_formed"] == 0.5
    assert mixed["inception_score"] == pytest.approx(clean["inception_score"])
    assert mixed["fid"] == pytest.approx(clean["fid"])
    assert mixed["distinct"] == pytest.approx(clean["distinct"] / 2)
    nothing = task.score("test", torch.arange(100), malformed[None])
    assert nothing["well_formed"] == 0.0 and nothing["distinct"] == 0.0 and np.isnan(nothing["fid"])


def test_recognisable_counts_the_images_the_classifier_reads_with_confidence(task):
    test = task.splits["test"]
    probabilities, _ = features(test)
    confident = probabilities.max(-1).values >= RECOGNISABLE
    images = test.images.long()
    blank = torch.full_like(images[:1], OFF)
    malformed = images[:1].clone()
    malformed[:, 5] = 0
    answers = torch.cat([images, blank, malformed])
    assert torch.equal(task.recognisable(answers), torch.cat([confident, torch.tensor([False, False])]))
    assert 0.9 <= confident.float().mean().item() < 1.0  # most real digits, not all of them
    scores = task.score("test", torch.arange(len(images)), images[None])
    assert scores["recognisable"] == pytest.approx(confident.float().mean().item())
    per_input = task.per_input("test", torch.arange(len(images)), torch.stack([images, blank.expand_as(images)]))
    assert torch.equal(per_input["recognisable"], confident.float() / 2)
    assert task.shortcut_metric == "recognisable"


def test_distinct_counts_unique_images(task):
    images = task.splits["test"].images.long()
    unique = len(torch.unique(images[:10], dim=0))
    answers = images[:10].repeat(3, 1).view(3, 10, 64)
    assert task.score("test", torch.arange(10), answers)["distinct"] == pytest.approx(unique / 30)


def test_novel_counts_answers_that_are_not_training_images(task):
    train, test = task.splits["train"].images.long(), task.splits["test"].images.long()
    fresh = test[~task.is_training_image(test)][:4]
    answers = torch.cat([train[:4], fresh, torch.zeros(2, 64, dtype=torch.long)])[:, None]  # 2 malformed
    assert task.is_training_image(answers[:, 0]).tolist() == [True] * 4 + [False] * 6
    assert task.score("test", torch.arange(1), answers)["novel"] == pytest.approx(4 / 10)


def test_nearest_solution_is_the_most_likely_training_image(task):
    train = task.splits["train"].images.long()
    logits = torch.randn(3, 64, 3, generator=torch.Generator().manual_seed(0))
    logits[0] = torch.nn.functional.one_hot(train[17], 3) * 10.0  # a clear vote for image 17
    nearest = task.nearest_solution(task.splits["train"].inputs[:3], logits)
    log_p = logits.log_softmax(-1)[:, None].expand(-1, len(train), -1, -1)
    scores = log_p.gather(-1, train[None, ..., None].expand(3, -1, -1, 1)).squeeze(-1).sum(-1)  # [3, C]
    assert torch.equal(nearest, train[scores.argmax(-1)])
    assert torch.equal(nearest[0], train[17])


# ---- classifier and scores -------------------------------------------------------------------------

def test_shipped_classifier_is_accurate_on_held_out_digits(task):
    classifier = load_classifier()
    test = task.splits["test"]
    probabilities, _ = features(test)
    accuracy = (probabilities.argmax(-1) == test.labels).float().mean().item()
    assert accuracy >= 0.9
    assert accuracy == pytest.approx(classifier.test_accuracy.item(), abs=1e-6)
    assert classifier.threshold.item() == task.threshold


def test_inception_score_of_real_digits_is_far_above_one_repeated_image(task):
    images = task.splits["test"].images
    real = task.score("test", torch.arange(len(images)), images.long()[None])["inception_score"]
    repeated = task.score("test", torch.arange(50), images.long()[:1].expand(50, -1)[None])["inception_score"]
    assert repeated == pytest.approx(1.0, abs=1e-9)
    assert real > 6.0


def test_inception_score_known_values():
    assert inception_score(torch.eye(10)) == pytest.approx(10.0)
    assert inception_score(torch.eye(10)[[0, 0, 1, 1]]) == pytest.approx(2.0)
    assert inception_score(torch.full((5, 10), 0.1)) == pytest.approx(1.0)
    assert np.isnan(inception_score(torch.empty(0, 10)))


def test_fid_ranks_real_digits_far_closer_than_random_bits(task):
    _, test = features(task.splits["test"])
    _, train = features(task.splits["train"])
    noise = torch.randint(0, 2, (500, 64), generator=torch.Generator().manual_seed(0))
    _, random = classify(noise.bool())
    real_vs_real = frechet_distance(test, train[:500])
    assert frechet_distance(test, test) == pytest.approx(0.0, abs=1e-6)
    assert real_vs_real * 10 < frechet_distance(test, random)


def test_fid_matches_the_closed_form():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(300, 5, generator=generator) @ torch.randn(5, 5, generator=generator)
    b = torch.randn(200, 5, generator=generator) @ torch.randn(5, 5, generator=generator) + 1.0
    cov_a, cov_b = np.cov(a.double().numpy().T), np.cov(b.double().numpy().T)
    mean_gap = ((a.double().mean(0) - b.double().mean(0)) ** 2).sum().item()
    expected = mean_gap + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5, 3.0])
    assert frechet_distance(a, a + shift) == pytest.approx((shift ** 2).sum().item(), rel=1e-6)
    assert np.isnan(frechet_distance(a[:1], b))


@pytest.mark.parametrize("damage", ["missing", "garbage", "wrong arrays"])
def test_damaged_classifier_file_is_a_one_line_error(tmp_path, damage):
    path = tmp_path / f"{damage.replace(' ', '_')}.npz"
    if damage == "garbage":
        path.write_bytes(b"PK\x03\x04 broken")
    elif damage == "wrong arrays":
        np.savez(path, weights=np.zeros(3, np.float32))
    with pytest.raises(UserError, match="train_digits_classifier.py") as error:
        load_classifier(path)
    assert "\n" not in str(error.value)


# ---- MNIST and IDX ----------------------------------------------------------------------------------

@SETTINGS
@given(array=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=3, max_side=6)), compressed=st.booleans())
def test_read_idx_round_trips(tmp_path, array, compressed):
    path = tmp_path / ("array.gz" if compressed else "array")
    path.write_bytes(gzip.compress(idx_bytes(array)) if compressed else idx_bytes(array))
    found = read_idx(path)
    assert found.dtype == np.uint8 and np.array_equal(found, array)


def test_read_idx_reads_big_endian_types(tmp_path):
    values = np.array([[1, -2], [300, 70000]], dtype=">i4")
    path = tmp_path / "ints"
    path.write_bytes(struct.pack(">BBBB2I", 0, 0, 0x0C, 2, 2, 2) + values.tobytes())
    assert read_idx(path).tolist() == [[1, -2], [300, 70000]]


@pytest.mark.parametrize("content,message", [
    (b"", "not an IDX file"),
    (b"\x08\x03\x00\x00" + bytes(20), "not an IDX file"),  # wrong magic
    (b"\x00\x00\x07\x01" + bytes(20), "not an IDX file"),  # unknown type code
    (b"\x00\x00\x08\x03\x00\x00", "header cut short"),
    (idx_bytes(mnist_pixels(2))[:-10], "truncated IDX file"),
    (idx_bytes(mnist_pixels(2)) + b"\x00", "longer than its header"),
])
def test_read_idx_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as error:
        read_idx(path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_read_idx_expands_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "labels").write_bytes(idx_bytes(np.arange(5, dtype=np.uint8)))
    assert read_idx("~/labels").tolist() == [0, 1, 2, 3, 4]


def test_read_idx_reports_missing_and_broken_gzip_files(tmp_path):
    with pytest.raises(UserError, match="cannot read IDX file .*No such file"):
        read_idx(tmp_path / "absent")
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(idx_bytes(mnist_pixels(1)))[:-8])
    with pytest.raises(UserError, match="cannot read IDX file"):
        read_idx(broken)


def test_mnist_binarizes_at_half_and_max_pools(tmp_path):
    pixels = np.zeros((7, 28, 28), np.uint8)
    pixels[:, 0, 0] = 128  # just above 0.5: ON, and so is its whole 2x2 block at 14x14
    pixels[:, 27, 27] = 127  # just below: OFF
    pixels[:, 4:24, 4:24] = 255
    path = tmp_path / "images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(pixels)))
    for resolution in (14, 28):
        task = MnistTask(images=str(path), resolution=resolution, cache_dir=str(tmp_path))
        image = bits_from_tokens(task.splits["train"].images[0]).view(resolution, resolution)
        expected = torch.zeros(resolution, resolution, dtype=torch.bool)
        expected[0, 0] = True
        margin = resolution // 7
        expected[margin:resolution - margin, margin:resolution - margin] = True
        assert torch.equal(image, expected)
        assert task.stats()["resolution"] == resolution and task.stats()["splits"]["test"]["labels"] is None
        assert to_digits_frame(image.view(1, -1), resolution).all()  # the stray pixel lies in the margin


def test_mnist_task_scores_and_keeps_labels(tmp_path):
    images, labels = tmp_path / "images-idx3-ubyte", tmp_path / "labels-idx1-ubyte"
    images.write_bytes(idx_bytes(mnist_pixels(40)))
    labels.write_bytes(idx_bytes(np.arange(40, dtype=np.uint8) % 10))
    task = MnistTask(images=str(images), labels=str(labels), cache_dir=str(tmp_path))
    assert (len(task.splits["train"]), len(task.splits["test"])) == (34, 6)
    assert sum(task.stats()["splits"]["train"]["labels"].values()) == 34
    test = task.splits["test"].images.long()
    scores = task.score("test", torch.arange(6), test[None])
    assert scores["well_formed"] == 1.0 and scores["fid"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("case,message", [
    ("no images", "needs task.images"),
    ("resolution", "mnist: resolution must be 14 or 28"),
    ("label count", "expected 40 ubyte labels"),
    ("image shape", "expected ubyte images"),
    ("missing file", "cannot read IDX file"),
])
def test_mnist_bad_input_is_a_one_line_error(tmp_path, case, message):
    images, labels = tmp_path / "images-idx3-ubyte", tmp_path / "labels-idx1-ubyte"
    images.write_bytes(idx_bytes(mnist_pixels(40)))
    labels.write_bytes(idx_bytes(np.zeros(39, np.uint8)))
    kwargs = {"images": str(images), "cache_dir": str(tmp_path)}
    if case == "no images":
        kwargs["images"] = None
    elif case == "resolution":
        kwargs["resolution"] = 7
    elif case == "label count":
        kwargs["labels"] = str(labels)
    elif case == "image shape":
        images.write_bytes(idx_bytes(np.zeros((3, 8, 8), np.uint8)))
    else:
        kwargs["images"] = str(tmp_path / "absent")
    with pytest.raises(UserError, match=message) as error:
        MnistTask(**kwargs)
    assert "\n" not in str(error.value)
