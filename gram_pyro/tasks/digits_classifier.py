"""The digits feature network and the two image-quality scores computed with it.

Network (:class:`DigitsClassifier`): an MLP on 8x8 binary images, flattened row-major to 64 values in
{0, 1}: ``64 -> 128 -> 64 -> 10`` with ReLU after both hidden layers. The 64 activations of the second
hidden layer are the **features**; the 10 logits give ``p(c | x)`` over the digit classes.
``experiments/train_digits_classifier.py`` trains it (seeded) on the binarized train split of the
digits task and writes ``gram_pyro/tasks/data/digits_classifier.npz``: the ``state_dict`` as arrays
(float32 weights, plus the buffers ``threshold``, the pixel threshold of its training data, and
``test_accuracy``, its accuracy on the held-out split).

Scores, for ``K`` images:

* :func:`inception_score` of class probabilities ``[K, C]``:
  ``IS = exp(mean_k KL(p(c | x_k) || p(c)))`` with ``p(c) = mean_k p(c | x_k)``. It lies in ``[1, C]``:
  1 when every image gets the same class distribution (one repeated image), ``C`` when every image is
  classified with certainty and the classes are balanced.
* :func:`frechet_distance` of features ``a [K1, F]`` and ``b [K2, F]``: the Fréchet distance between
  the Gaussians fitted to them (means ``m``, covariances ``S``, divisor ``K - 1``),
  ``FID = |m_a - m_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)``, in float64 with the
  square roots taken by eigendecomposition of symmetric matrices (negative round-off eigenvalues set to 0).

These are IS/FID in form only: a different, far smaller network on 8x8 images, so their values are not
comparable with the paper's MNIST IS/FID (Inception network on 28x28 images).
"""

from __future__ import annotations

import zipfile
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gram_pyro.config import UserError

NUM_PIXELS, NUM_CLASSES = 64, 10
SHIPPED_WEIGHTS = resources.files("gram_pyro.tasks").joinpath("data/digits_classifier.npz")
TRAINING_SCRIPT = "experiments/train_digits_classifier.py"


class DigitsClassifier(nn.Module):
    """``features(bits [..., 64]) -> [..., 64]`` and ``forward(bits) -> logits [..., 10]``."""

    def __init__(self, threshold: int = 8):
        super().__init__()
        self.hidden = nn.Linear(NUM_PIXELS, 128)
        self.feature = nn.Linear(128, 64)
        self.head = nn.Linear(64, NUM_CLASSES)
        self.register_buffer("threshold", torch.tensor(threshold))
        self.register_buffer("test_accuracy", torch.tensor(float("nan")))

    def features(self, bits: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.feature(torch.relu(self.hidden(bits.float()))))

    def forward(self, bits: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(bits))


def save_classifier(classifier: DigitsClassifier, path: str | Path) -> None:
    """Write the ``state_dict`` of ``classifier`` as a numpy ``.npz`` (no pickles)."""
    np.savez(path, **{name: value.detach().cpu().numpy() for name, value in classifier.state_dict().items()})


@lru_cache(maxsize=4)
def load_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """The classifier stored at ``path`` (default: the shipped weights), in eval mode, frozen. A
    missing or damaged file is a one-line :class:`UserError` saying how to rebuild it."""
    source = SHIPPED_WEIGHTS if path is None else Path(path)
    classifier = DigitsClassifier()
    try:
        with source.open("rb") as handle, np.load(handle, allow_pickle=False) as archive:
            classifier.load_state_dict({name: torch.from_numpy(archive[name]) for name in archive.files})
    except (OSError, EOFError, ValueError, KeyError, RuntimeError, zipfile.BadZipFile) as error:
        reason = getattr(error, "strerror", None) or type(error).__name__
        raise UserError(f"digits classifier weights {source} are missing or damaged ({reason}); "
                        f"rebuild them with `python {TRAINING_SCRIPT}`") from None
    return classifier.eval().requires_grad_(False)


def classify(bits: torch.Tensor, classifier: DigitsClassifier | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probabilities [K, 10], features [K, 64])`` of binary images ``bits [K, 64]`` under
    ``classifier`` (default: the shipped one)."""
    classifier = classifier or load_classifier()
    with torch.no_grad():
        features = classifier.features(bits.cpu())
        return torch.softmax(classifier.head(features), -1), features


def inception_score(probabilities: torch.Tensor) -> float:
    """``exp(mean_k KL(p(c | x_k) || p(c)))`` of ``probabilities [K, C]``; NaN when ``K = 0``."""
    if len(probabilities) == 0:
        return float("nan")
    p = probabilities.double()
    marginal = p.mean(0)
    kl = (torch.special.xlogy(p, p) - torch.special.xlogy(p, marginal)).sum(-1)
    return kl.mean().exp().item()


def _psd_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (round-off negatives set to 0) and eigenvectors of a symmetric PSD matrix."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return values.clamp(min=0), vectors


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of ``a [K1, F]`` and ``b [K2, F]`` (float64); NaN when
    either set has fewer than 2 rows (no covariance)."""
    if min(len(a), len(b)) < 2:
        return float("nan")
    a, b = a.double(), b.double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = _psd_eigh(cov_a)
    root_a = (vectors * values.sqrt()) @ vectors.T
    cross = _psd_eigh(root_a @ cov_b @ root_a)[0].sqrt().sum()
    distance = (a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(distance.item(), 0.0)
