"""What every task provides, and the one batch type that flows from a task into an objective.

A task is a plain object with

* ``name`` (str), ``vocab_size`` (int), ``seq_len`` (int ``S``), ``num_puzzles`` (int; > 0 when inputs
  carry puzzle identifiers that feed a learned prefix embedding, as ARC's per-task embedding; else 0),
  ``unconditional`` (bool: the input is blank and every target is an answer) and ``image_side`` (the
  side of a square image for image tasks, else ``None``);
* ``splits``: ``{"train": Split, "test": Split, ...}``;
* ``judge(x [..., S], answer [..., S], y [..., S] | None) -> bool [...]``: whether ``answer`` is a
  correct answer to ``x`` **by the task's rules** (never by equality with a stored target alone);
* ``per_input(split, index [M], answers [N, M, S]) -> {metric: float tensor [M]}``: each metric per
  input over its ``N`` answers (``accuracy`` always; ``coverage``, ``conflicts`` ... where defined);
* ``score(split, index, answers) -> {metric: float}``: the means of :meth:`Task.per_input` unless a
  task defines set-level metrics (uniqueness, Inception score);
* ``stats() -> dict``: JSON-ready counts (inputs per split, solutions-per-input histogram, vocab, seq_len);
* ``nearest_solution(x [B, S], logits [B, S, V]) -> LongTensor [B, S]``: the valid answer of each input
  that the decoder's ``logits`` make most likely, as a target (:data:`IGNORE` where targets hold it;
  tasks whose solution sets can be enumerated; the others say so in a one-line error). The target of
  prior rollouts in :class:`gram_pyro.objectives.TruncatedSurrogate` with ``prior_target=nearest``;
* ``read_inputs(path) -> LongTensor [M, S]`` and ``format_answer(x [S], answer [S]) -> str``: a user's
  puzzles in the task's file format, and one answer as a line of that format with its validity (tasks
  without a user format say so in a one-line error).

A split holds ``inputs`` (LongTensor ``[M, S]``), ``puzzles`` (LongTensor ``[M]`` or ``None``),
``num_solutions`` (LongTensor ``[M]``, or ``None`` where it is not a per-input count: one answer per
input, or every target a solution of every input as in unconditional generation) and
``batch(index [B], generator) -> Batch``, which draws the training target (a random valid answer where
there are several) and applies the task's augmentation per access.

User data files (``task.source=<file>`` for training, ``gram-pyro solve`` for answering) are read line
by line with :func:`data_lines`; a malformed line raises :func:`data_error` naming the file and line.

Targets may hold :data:`IGNORE` at positions that are not predicted (the adjacency part of a graph
colouring sequence, the padding of an ARC canvas): the likelihood skips them and the loss is divided
by the number of supervised tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from gram_pyro.config import UserError

IGNORE = -1
"""Target token value at positions that carry no supervision."""


@dataclass
class Batch:
    """``x [B, S]`` input tokens, ``y [B, S]`` target tokens (``IGNORE`` where unsupervised) and
    ``puzzle [B]`` identifiers (``None`` for tasks without them)."""

    x: torch.Tensor
    y: torch.Tensor
    puzzle: torch.Tensor | None = None

    def to(self, device: torch.device) -> "Batch":
        """The batch on ``device``; copies to a GPU go through pinned memory and do not block."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None or t.device == device:
                return t
            return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)

        return Batch(move(self.x), move(self.y), move(self.puzzle))


class Task:
    """Base class with the defaults of the interface above; subclasses set the attributes and
    implement ``judge``, ``per_input`` and ``stats``."""

    name: str
    vocab_size: int
    seq_len: int
    num_puzzles: int = 0
    unconditional: bool = False
    image_side: int | None = None
    splits: dict

    def judge(self, x: torch.Tensor, answer: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def per_input(self, split: str, index: torch.Tensor, answers: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def score(self, split: str, index: torch.Tensor, answers: torch.Tensor) -> dict[str, float]:
        return {k: v.float().mean().item() for k, v in self.per_input(split, index, answers).items()}

    def stats(self) -> dict:
        raise NotImplementedError

    def nearest_solution(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        raise UserError(f"task {self.name} does not enumerate its solutions: use objective.prior_target=target")

    def read_inputs(self, path) -> torch.Tensor:
        raise UserError(f"task {self.name} has no user input format")

    def format_answer(self, x: torch.Tensor, answer: torch.Tensor) -> str:
        raise UserError(f"task {self.name} has no user answer format")


def held_out_index(size: int, num_inputs: int, seed: int) -> torch.Tensor:
    """``num_inputs`` distinct rows of a split of ``size`` drawn with ``seed``, sorted (splits are stored
    sorted, so a prefix would be a biased sample)."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:num_inputs].sort().values


def most_likely(logits: torch.Tensor, candidates: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """For each row, the candidate answer with the highest ``log p(candidate | logits)`` under the
    factorized decoder: ``logits [B, S, V]``, ``candidates [C, S]`` tokens, ``allowed [B, C]`` (``None``:
    all); returns ``[B, S]``. Every row needs at least one allowed candidate."""
    log_p = logits.float().log_softmax(-1)
    one_hot = torch.nn.functional.one_hot(candidates.to(logits.device), logits.shape[-1]).to(log_p.dtype)
    scores = torch.einsum("bsv,csv->bc", log_p, one_hot)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return candidates.to(logits.device)[scores.argmax(-1)]


def solutions_histogram(num_solutions: torch.Tensor) -> dict[str, int]:
    """``{"1": count, "2": count, ...}``: how many inputs have each number of valid solutions."""
    values, counts = torch.unique(num_solutions, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts)}


def data_error(path: str | Path, line: int, message: str) -> UserError:
    """The one-line error for a bad line of a user data file: ``<file>:<line>: <message>``."""
    return UserError(f"{path}:{line}: {message}")


def is_int(value) -> bool:
    """Whether ``value`` (parsed from a data file or a config) is an integer: not a bool, not a float
    such as ``8.0`` or ``0.7`` (truncating one would silently change the puzzle)."""
    return isinstance(value, int) and not isinstance(value, bool)


def data_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every line of a user data file that is not blank or a ``#`` comment,
    stripped of surrounding whitespace. The file is UTF-8; a byte-order mark at its start (as some
    editors write) is skipped. A missing or unreadable file is a one-line :class:`UserError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read data file {path}: {getattr(error, 'strerror', None) or error}") from None
    found = False
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            found = True
            yield number, line
    if not found:
        raise UserError(f"data file {path} holds no puzzles")
