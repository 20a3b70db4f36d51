"""Binarized digits: unconditional generation of small black-and-white digit images.

Two sources, one encoding:

* :class:`DigitsTask`: scikit-learn's 8x8 digits (1,797 images from ``sklearn.datasets.load_digits``,
  shipped with the package, never downloaded). A pixel value 0..16 counts the set pixels of a 4x4 block
  of a 32x32 bitmap; it is ON when ``value > threshold`` (default 8: more than half the block).
* :class:`MnistTask`: MNIST from IDX files the user already has (:func:`read_idx`). A pixel is ON when
  ``pixel / 255 > 0.5``. At ``resolution=14`` (default; the paper also works on 14x14 patches) the 28x28
  image is first reduced by 2x2 max-pooling; pooling then thresholding equals thresholding then ORing
  each 2x2 block, which keeps thin strokes. ``resolution=28`` keeps the full image.

Encoding: an image of side ``s`` is ``S = s*s`` tokens in row-major order, vocabulary 3: ``0`` = pad
(unused), ``1`` = OFF, ``2`` = ON. The input ``x`` is the same for every example, ``S`` OFF tokens
(the blank input that stands for "no condition"); the target ``y`` is the image. Every image is a
correct answer, so the judge checks the only rule there is: the answer is an image (all tokens OFF/ON).

A split (:class:`ImageSplit`) holds ``inputs`` LongTensor ``[M, S]`` (a broadcast view of one blank
row), ``images`` uint8 ``[M, S]`` tokens, ``labels`` LongTensor ``[M]`` (the digit; ``None`` for MNIST
without a labels file); ``puzzles`` and ``num_solutions`` are ``None``. Splits are a seeded permutation
cut at ``test_fraction``; there is no augmentation (a mirrored or rotated digit is not a digit).

The task's set of solutions is the training set: :meth:`BinaryImageTask.nearest_solution` is the
training image the decoder's logits make most likely (the target of prior rollouts,
``objective.prior_target=nearest``).

``score(split, index, answers [N, M, S])`` pools all ``N*M`` answers:

* ``accuracy`` = ``well_formed``: share of answers whose tokens are all OFF/ON (the judge);
* ``recognisable``: share of answers that are well formed and that the digits classifier assigns to one
  class with probability at least :data:`RECOGNISABLE` (93% of the real test images, 96% of the
  training images). Since every well-formed image passes the judge, this is the metric the posterior
  shortcut checks compare (``shortcut_metric``): a prior that leaves the image to the posterior draws
  images the classifier cannot read;
* ``distinct``: distinct well-formed images / all answers;
* ``novel``: share of answers that are well formed and not a copy of a training image (a generator that
  only recalls its training set scores 0);
* ``inception_score`` and ``fid`` (:mod:`gram_pyro.tasks.digits_classifier`) of the well-formed answers
  read as bits; the FID reference is every real image of ``split``.

For MNIST the two scores are an approximation: images are mapped into the classifier's 8x8 frame by
cropping the margin MNIST leaves around its 20x20 digit box (4 of 28 pixels, 2 of 14), averaging areas
down to 8x8 and thresholding at 0.5 (:func:`to_digits_frame`), then scored with the digits classifier.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gram_pyro.config import UserError
from gram_pyro.tasks.base import (Batch, Task, a_fraction, an_integer, check_arguments, is_int, most_likely,
                                  same_input_groups)
from gram_pyro.tasks.cache import cached
from gram_pyro.tasks.digits_classifier import NUM_CLASSES, classify, frechet_distance, inception_score

OFF, ON = 1, 2  # 0 is the pad token, never used
RECOGNISABLE = 0.9
"""Least top-class probability of the digits classifier for an image to count as ``recognisable``."""
VOCAB_SIZE = 3
DIGITS_SIDE, MNIST_SIDE = 8, 28
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
"""IDX data type code -> numpy dtype (big-endian)."""
GENERATOR_VERSION = 1


def tokens_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bits ``[..., S]`` (bool or 0/1) -> tokens ``[..., S]`` (OFF/ON)."""
    return OFF + bits.long()


def is_confident(probabilities: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``[K, C]`` of the digits classifier -> bool ``[K]``: the top class has at
    least :data:`RECOGNISABLE`."""
    return probabilities.max(-1).values >= RECOGNISABLE


def is_well_formed(tokens: torch.Tensor) -> torch.Tensor:
    """Bool ``[...]``: every token of ``tokens [..., S]`` is OFF or ON."""
    return ((tokens == OFF) | (tokens == ON)).all(-1)


def bits_from_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens ``[..., S]`` -> bool ``[..., S]``, True where ON."""
    return tokens == ON


def to_digits_frame(bits: torch.Tensor, side: int) -> torch.Tensor:
    """Bool ``[K, side*side]`` images -> bool ``[K, 64]`` in the digits classifier's 8x8 frame: crop
    the MNIST margin (``side // 7`` pixels each side), area-average to 8x8, threshold at 0.5. 8x8
    images pass unchanged."""
    if side == DIGITS_SIDE:
        return bits
    margin = side // 7
    core = bits.unflatten(-1, (side, side))[:, margin:side - margin, margin:side - margin]
    area = torch.nn.functional.adaptive_avg_pool2d(core[:, None].float(), DIGITS_SIDE)
    return (area > 0.5).flatten(1)


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in IDX file ``path`` (gzip-compressed when the name ends with ``.gz``):
    magic ``00 00 <type code> <number of dims>``, then each dim as a big-endian uint32, then the data.
    A missing, unreadable, foreign or truncated file is a one-line :class:`UserError`."""
    path = Path(path).expanduser()
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    except (OSError, EOFError) as error:
        raise UserError(f"cannot read IDX file {path}: {getattr(error, 'strerror', None) or error}") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_TYPES or raw[3] == 0:
        raise UserError(f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'})")
    data_start = 4 + 4 * raw[3]
    if len(raw) < data_start:
        raise UserError(f"{path}: truncated IDX file (header cut short)")
    dims = struct.unpack(f">{raw[3]}I", raw[4:data_start])
    dtype = np.dtype(IDX_TYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - data_start != expected:
        problem = "truncated IDX file" if len(raw) - data_start < expected else "IDX file longer than its header"
        raise UserError(f"{path}: {problem} (dims {list(dims)} need {expected} data bytes, "
                        f"found {len(raw) - data_start})")
    return np.frombuffer(raw, dtype, offset=data_start).reshape(dims).astype(dtype.newbyteorder("="))


def mnist_bits(pixels: np.ndarray, resolution: int) -> np.ndarray:
    """Bool ``[M, resolution**2]``: pixels ``[M, 28, 28]`` (0..255) ON where ``pixel / 255 > 0.5``,
    2x2 max-pooled first when ``resolution`` is 14."""
    on = pixels > 127  # pixel / 255 > 0.5 for integer pixels
    if resolution == MNIST_SIDE // 2:
        on = on.reshape(len(on), resolution, 2, resolution, 2).any(axis=(2, 4))
    return on.reshape(len(on), -1)


def split_arrays(bits: np.ndarray, labels: np.ndarray | None, test_fraction: float, seed: int) -> dict:
    """``{"train_images", "test_images"}`` uint8 bit arrays (plus ``"train_labels"``, ``"test_labels"``
    when ``labels`` is given): a permutation seeded by ``seed`` cut at ``test_fraction``, each split in
    original order. ``test_fraction`` in (0, 1) (the tasks check it); one that leaves a split empty is a
    one-line :class:`UserError`."""
    n_test = round(test_fraction * len(bits))
    if not 0 < n_test < len(bits):
        raise UserError(f"task.test_fraction={test_fraction} leaves a split empty for {len(bits)} images")
    order = torch.randperm(len(bits), generator=torch.Generator().manual_seed(seed)).numpy()
    arrays = {}
    for name, rows in (("test", np.sort(order[:n_test])), ("train", np.sort(order[n_test:]))):
        arrays[f"{name}_images"] = bits[rows].astype(np.uint8)
        if labels is not None:
            arrays[f"{name}_labels"] = labels[rows].astype(np.int64)
    return arrays


def digits_arrays(threshold: int, test_fraction: float, seed: int) -> dict:
    """The binarized scikit-learn digits split by :func:`split_arrays` (no cache); ``threshold`` in 0..15
    (:class:`DigitsTask` checks it)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the digits task needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    return split_arrays(digits.data > threshold, digits.target, test_fraction, seed)


def label_histogram(labels: torch.Tensor | None) -> dict[str, int] | None:
    """``{"0": count, ..., "9": count}`` of digit labels ``[M]``; ``None`` without labels."""
    if labels is None:
        return None
    return {str(digit): int(count) for digit, count in enumerate(torch.bincount(labels, minlength=NUM_CLASSES))}


@dataclass
class ImageSplit:
    """``images`` uint8 tokens ``[M, S]``, ``labels`` LongTensor ``[M]`` or ``None``; ``inputs`` is
    the blank LongTensor ``[M, S]`` (one row broadcast)."""

    images: torch.Tensor
    labels: torch.Tensor | None
    puzzles = None
    num_solutions = None

    def __post_init__(self):
        self.inputs = torch.full((1, self.images.shape[1]), OFF).expand(len(self.images), -1)

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        """The blank inputs and the images at ``index``; a single target and no augmentation, so
        ``generator`` draws nothing."""
        return Batch(self.inputs[index], self.images[index].long())


class BinaryImageTask(Task):
    """Judge, metrics and statistics shared by the image tasks; subclasses set ``name``, ``side``,
    ``threshold`` and call :meth:`_set_splits` with the arrays of :func:`split_arrays`."""

    vocab_size = VOCAB_SIZE
    unconditional = True
    shortcut_metric = "recognisable"  # the judge accepts every image
    side: int
    threshold: float

    def _set_splits(self, arrays: dict) -> None:
        self.seq_len = self.side * self.side
        self.image_side = self.side
        self.splits = {}
        for name in ("train", "test"):
            labels = arrays.get(f"{name}_labels")
            self.splits[name] = ImageSplit(tokens_from_bits(torch.from_numpy(arrays[f"{name}_images"])).byte(),
                                           None if labels is None else torch.from_numpy(labels))
        self._reference_features: dict[str, torch.Tensor] = {}

    def judge(self, x: torch.Tensor, answer: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return is_well_formed(answer)

    def recognisable(self, answers: torch.Tensor) -> torch.Tensor:
        """``answers [..., S]`` -> bool ``[...]``: well formed and classified with probability at least
        :data:`RECOGNISABLE` (module docstring)."""
        flat = answers.reshape(-1, self.seq_len).cpu()
        ok = is_well_formed(flat)
        probabilities, _ = classify(to_digits_frame(bits_from_tokens(flat[ok]), self.side))
        confident = torch.zeros(len(flat), dtype=torch.bool)
        confident[ok] = is_confident(probabilities)
        return confident.reshape(answers.shape[:-1])

    def per_input(self, split: str, index: torch.Tensor, answers: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"accuracy": self.judge(self.splits[split].inputs[index], answers).float().mean(0),
                "recognisable": self.recognisable(answers).float().mean(0)}

    def is_training_image(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [K, S]`` -> bool ``[K]``: the row equals some image of the training split."""
        train = self.splits["train"].images.long()
        _, inverse = torch.unique(torch.cat([train, tokens.long()]), dim=0, return_inverse=True)
        seen = torch.zeros(int(inverse.max()) + 1, dtype=torch.bool)
        seen[inverse[:len(train)]] = True
        return seen[inverse[len(train):]]

    def nearest_solution(self, x: torch.Tensor, logits: torch.Tensor, distinct: bool = False) -> torch.Tensor:
        """The training image of highest likelihood under ``logits [B, S, V]`` for each row, with
        ``distinct`` a different one for each row (``x [B, S]`` is blank: every row has the same input)
        and, where the images have labels, the rows' digits in the training set's shares (at most
        ``ceil(B * share)`` rows of each digit); returns ``[B, S]`` tokens."""
        train = self.splits["train"]
        if not distinct:
            return most_likely(logits, train.images.long())
        shares = None if train.labels is None else torch.bincount(train.labels, minlength=NUM_CLASSES) / len(train)
        return most_likely(logits, train.images.long(), groups=same_input_groups(x),
                           classes=train.labels, shares=shares)

    def reference_features(self, split: str) -> torch.Tensor:
        """Classifier features ``[M, 64]`` of every real image of ``split`` (computed once)."""
        if split not in self._reference_features:
            bits = bits_from_tokens(self.splits[split].images)
            self._reference_features[split] = classify(to_digits_frame(bits, self.side))[1]
        return self._reference_features[split]

    def score(self, split: str, index: torch.Tensor, answers: torch.Tensor) -> dict[str, float]:
        flat = answers.reshape(-1, self.seq_len).cpu()
        ok = is_well_formed(flat)
        images = bits_from_tokens(flat[ok])
        probabilities, features = classify(to_digits_frame(images, self.side))
        well_formed = ok.float().mean().item()
        recognisable = is_confident(probabilities).sum().item() / len(flat)
        return {"accuracy": well_formed, "well_formed": well_formed, "recognisable": recognisable,
                "distinct": len(torch.unique(images, dim=0)) / len(flat),
                "novel": (ok & ~self.is_training_image(flat)).float().mean().item(),
                "inception_score": inception_score(probabilities),
                "fid": frechet_distance(features, self.reference_features(split))}

    def stats(self) -> dict:
        return {"task": self.name, "vocab_size": self.vocab_size, "seq_len": self.seq_len,
                "threshold": self.threshold,
                "splits": {name: {"inputs": len(s), "solutions_per_input": None, "labels": label_histogram(s.labels)}
                           for name, s in self.splits.items()}}


class DigitsTask(BinaryImageTask):
    """scikit-learn's 8x8 digits, ON where ``value > threshold`` (0..16 scale)."""

    name = "digits"
    side = DIGITS_SIDE

    def __init__(self, threshold: int = 8, test_fraction: float = 0.15, seed: int = 0,
                 cache_dir: str | None = None):
        check_arguments(self.name, {"threshold": an_integer(threshold, 0, 15),  # ON when value > threshold
                                    "test_fraction": a_fraction(test_fraction)})
        self.threshold = threshold
        params = {"threshold": threshold, "test_fraction": test_fraction, "seed": seed}
        arrays, _ = cached("digits", params, GENERATOR_VERSION,
                           lambda: (digits_arrays(threshold, test_fraction, seed), {}), cache_dir)
        self._set_splits(arrays)


def _file_identity(path: str | Path) -> dict:
    """Absolute path, size and modification time of ``path``: a changed file is a new cache entry."""
    path = Path(path).expanduser().resolve()
    try:
        status = path.stat()
    except OSError as error:
        raise UserError(f"cannot read IDX file {path}: {error.strerror}") from None
    return {"path": str(path), "bytes": status.st_size, "mtime_ns": status.st_mtime_ns}


def mnist_arrays(images: str, labels: str | None, resolution: int, test_fraction: float, seed: int) -> dict:
    """Binarized MNIST from IDX files, split by :func:`split_arrays` (no cache)."""
    pixels = read_idx(images)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[1:] != (MNIST_SIDE, MNIST_SIDE):
        raise UserError(f"{images}: expected ubyte images [M, 28, 28], found {pixels.dtype} {list(pixels.shape)}")
    digits = None
    if labels is not None:
        digits = read_idx(labels)
        if digits.dtype != np.uint8 or digits.shape != (len(pixels),) or digits.max(initial=0) >= NUM_CLASSES:
            raise UserError(f"{labels}: expected {len(pixels)} ubyte labels 0..9 to match {images}, "
                            f"found {digits.dtype} {list(digits.shape)}")
    return split_arrays(mnist_bits(pixels, resolution), digits, test_fraction, seed)


class MnistTask(BinaryImageTask):
    """Binarized MNIST (threshold 0.5) at ``resolution`` 14 (2x2 max-pooled) or 28, from the IDX
    ``images`` file (``labels`` optional; kept for statistics)."""

    name = "mnist"
    threshold = 0.5

    def __init__(self, images: str | None = None, labels: str | None = None, resolution: int = 14,
                 test_fraction: float = 0.15, seed: int = 0, cache_dir: str | None = None):
        if not images:
            raise UserError("the mnist task needs task.images=<path to an IDX images file, e.g. "
                            "train-images-idx3-ubyte.gz>")
        check_arguments(self.name, {
            "resolution": (resolution, is_int(resolution) and resolution in (MNIST_SIDE // 2, MNIST_SIDE), "14 or 28"),
            "test_fraction": a_fraction(test_fraction)})
        self.side = resolution
        params = {"images": _file_identity(images), "labels": None if labels is None else _file_identity(labels),
                  "resolution": resolution, "test_fraction": test_fraction, "seed": seed}
        arrays, _ = cached("mnist", params, GENERATOR_VERSION,
                           lambda: (mnist_arrays(images, labels, resolution, test_fraction, seed), {}), cache_dir)
        self._set_splits(arrays)

    def stats(self) -> dict:
        return {**super().stats(), "resolution": self.side}
