"""Train the digits feature network (:mod:`gram_pyro.tasks.digits_classifier`) and ship its weights.

Data: the digits task's default splits (threshold 8, test_fraction 0.15, seed 0), built without the
cache. Training: AdamW (lr 3e-3, weight decay 1e-3), cross-entropy, 200 epochs of batches of 64, each
image shifted at random by up to one pixel in each direction (zero fill) so that the features do not
hinge on exact placement. Seeded, one CPU thread, so a rerun on the same machine writes the same
weights. Takes a few seconds; prints the accuracy on the held-out (test) split, which is stored in the
file beside the weights.

    python experiments/train_digits_classifier.py [--out gram_pyro/tasks/data/digits_classifier.npz]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import gram_pyro.tasks
from gram_pyro.tasks.digits import DIGITS_SIDE, digits_arrays
from gram_pyro.tasks.digits_classifier import DigitsClassifier, save_classifier

THRESHOLD, TEST_FRACTION, SEED = 8, 0.15, 0
EPOCHS, BATCH_SIZE, LEARNING_RATE, WEIGHT_DECAY = 200, 64, 3e-3, 1e-3
DEFAULT_OUT = Path(gram_pyro.tasks.__file__).parent / "data" / "digits_classifier.npz"


def shifted(bits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images ``[B, 64]`` each moved by a random offset in {-1, 0, 1}^2, zero-filled."""
    side = DIGITS_SIDE
    padded = torch.nn.functional.pad(bits.view(-1, side, side), (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, len(bits)), generator=generator)
    rows = (dy[:, None] + torch.arange(side))[:, :, None]
    cols = (dx[:, None] + torch.arange(side))[:, None, :]
    return padded[torch.arange(len(bits))[:, None, None], rows, cols].flatten(1)


def train_classifier() -> DigitsClassifier:
    """The trained classifier, its ``test_accuracy`` buffer set."""
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    arrays = digits_arrays(THRESHOLD, TEST_FRACTION, SEED)
    train_x, train_y = torch.from_numpy(arrays["train_images"]).float(), torch.from_numpy(arrays["train_labels"])
    test_x, test_y = torch.from_numpy(arrays["test_images"]).float(), torch.from_numpy(arrays["test_labels"])

    classifier = DigitsClassifier(THRESHOLD)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    for _ in range(EPOCHS):
        for rows in torch.randperm(len(train_x), generator=generator).split(BATCH_SIZE):
            loss = torch.nn.functional.cross_entropy(classifier(shifted(train_x[rows], generator)), train_y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        classifier.test_accuracy.fill_((classifier(test_x).argmax(-1) == test_y).float().mean())
    return classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the weights (.npz)")
    out = parser.parse_args().out
    classifier = train_classifier()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(classifier, out)
    print(f"held-out accuracy {classifier.test_accuracy.item():.4f}; wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
