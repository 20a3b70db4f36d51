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
* ``shortcut_metric`` (str, default ``accuracy``): the metric of ``per_input`` and ``score`` that the
  posterior shortcut checks compare between prior and posterior trajectories; a task whose judge
  accepts every well-formed answer (digits) names one that can tell a good answer from a poor one;
* ``stats() -> dict``: JSON-ready counts (inputs per split, solutions-per-input histogram, vocab, seq_len);
* ``nearest_solution(x [B, S], logits [B, S, V], distinct=False) -> LongTensor [B, S]``: the valid answer
  of each input that the decoder's ``logits`` make most likely, as a target (:data:`IGNORE` where targets
  hold it; tasks whose solution sets can be enumerated or searched; the others say so in a one-line
  error). With ``distinct``, rows with the same input get different answers while the input has enough
  (:func:`distinct_argmax`). The target of prior rollouts in
  :class:`gram_pyro.objectives.TruncatedSurrogate` with ``prior_target=nearest`` (or ``distinct``);
* ``read_inputs(path) -> LongTensor [M, S]`` and ``format_answer(x [S], answer [S]) -> str``: a user's
  puzzles in the task's file format, and one answer as a line of that format with its validity (tasks
  without a user format say so in a one-line error).

A split holds ``inputs`` (LongTensor ``[M, S]``), ``puzzles`` (LongTensor ``[M]`` or ``None``),
``num_solutions`` (LongTensor ``[M]``, or ``None`` where it is not a per-input count: one answer per
input, or every target a solution of every input as in unconditional generation) and
``batch(index [B], generator) -> Batch``, which draws the training target (a random valid answer where
there are several, :func:`random_slot`) and applies the task's augmentation per access.

What tasks share lives here: :func:`check_arguments` (a bad constructor argument is a one-line
:class:`UserError` naming the key and what is allowed; :func:`an_integer` and :func:`a_fraction` are its
common checks), :func:`random_slot` (which of an input's valid
targets a training access uses), :func:`coverage_at_n` (coverage@N from per-answer solution ids) and
:meth:`Batch.rows`.

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

    def rows(self, rows) -> "Batch":
        """The batch of the rows ``rows`` (a slice or an index tensor) of ``x``, ``y``
        and ``puzzle``: ``[B', S]``, ``[B', S]``, ``[B']`` (``None`` stays ``None``)."""
        return Batch(self.x[rows], self.y[rows], None if self.puzzle is None else self.puzzle[rows])


class Task:
    """Base class with the defaults of the interface above; subclasses set the attributes and
    implement ``judge``, ``per_input`` and ``stats``."""

    name: str
    vocab_size: int
    seq_len: int
    num_puzzles: int = 0
    unconditional: bool = False
    image_side: int | None = None
    box: tuple[int, int] | None = None  # a grid task's box shape (rows, columns): its answers draw as grids
    verdict_in_answer: bool = True  # False: answer lines are bare, solve writes the verdicts beside them
    shortcut_metric: str = "accuracy"
    splits: dict

    def judge(self, x: torch.Tensor, answer: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def per_input(self, split: str, index: torch.Tensor, answers: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def score(self, split: str, index: torch.Tensor, answers: torch.Tensor) -> dict[str, float]:
        return {k: v.float().mean().item() for k, v in self.per_input(split, index, answers).items()}

    def stats(self) -> dict:
        raise NotImplementedError

    def nearest_solution(self, x: torch.Tensor, logits: torch.Tensor, distinct: bool = False) -> torch.Tensor:
        raise UserError(f"task {self.name} does not enumerate its solutions: use objective.prior_target=target")

    def read_inputs(self, path) -> torch.Tensor:
        raise UserError(f"task {self.name} has no user input format")

    def format_answer(self, x: torch.Tensor, answer: torch.Tensor) -> str:
        """One line of the task's answer format for input ``x [S]`` and answer ``[S]``; it carries the
        judge's verdict where ``verdict_in_answer`` says so."""
        raise UserError(f"task {self.name} has no user answer format")


def check_arguments(task: str, checks: dict[str, tuple[object, bool, str]]) -> None:
    """Raise the one-line :class:`UserError` ``<task>: <key> must be <allowed>, got <value!r>`` for the
    first ``key`` of ``checks`` (``key -> (value, ok, allowed)``) whose ``ok`` is false. The ``ok``
    flags are evaluated by the caller, so a check that compares with another argument goes in a later
    call, after that argument's own check."""
    for key, (value, ok, allowed) in checks.items():
        if not ok:
            raise UserError(f"{task}: {key} must be {allowed}, got {value!r}")


def an_integer(value, low: int, high: int | None = None) -> tuple[object, bool, str]:
    """The check of :func:`check_arguments` that ``value`` is an integer in ``low..high`` (``high=None``:
    ``>= low``)."""
    ok = is_int(value) and low <= value and (high is None or value <= high)
    return value, ok, f"an integer {f'>= {low}' if high is None else f'in {low}..{high}'}"


def a_fraction(value, one: bool = False) -> tuple[object, bool, str]:
    """The check of :func:`check_arguments` that ``value`` is a number in ``(0, 1)``, or ``(0, 1]`` where
    ``one``."""
    ok = is_number(value) and 0 < value and (value <= 1 if one else value < 1)
    return value, ok, f"a number in (0, 1{']' if one else ')'}"


def random_slot(counts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """LongTensor ``[B]``: for each row a uniformly random index in ``0 .. counts[b] - 1`` (which of
    its ``counts [B]`` valid targets, ``counts >= 1``), from exactly one draw of ``generator``:
    ``torch.rand(B)``, scaled and floored (clamped below ``counts`` against rounding)."""
    return torch.minimum((torch.rand(counts.shape, generator=generator) * counts).long(), counts - 1)


def coverage_at_n(solution_ids: torch.Tensor, num_solutions: torch.Tensor) -> torch.Tensor:
    """Coverage@N per input, float ``[M]``: the distinct non-negative ids among ``solution_ids [N, M]``
    (for each of an input's ``N`` answers, which of that input's valid solutions it is, in any
    numbering that gives equal solutions equal ids; ``-1`` for an invalid answer) over
    ``num_solutions [M]``, the number of valid solutions of each input. The division follows torch's
    type promotion: the default float dtype for integer ``num_solutions``, float64 for float64."""
    ids = solution_ids.sort(0).values
    new = torch.ones_like(ids, dtype=torch.bool)
    new[1:] = ids[1:] != ids[:-1]
    return ((ids >= 0) & new).sum(0) / num_solutions


def held_out_index(size: int, num_inputs: int, seed: int) -> torch.Tensor:
    """``num_inputs`` distinct rows of a split of ``size`` drawn with ``seed``, sorted (splits are stored
    sorted, so a prefix would be a biased sample)."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:num_inputs].sort().values


def most_likely(logits: torch.Tensor, candidates: torch.Tensor, allowed: torch.Tensor | None = None,
                groups: torch.Tensor | None = None, classes: torch.Tensor | None = None,
                shares: torch.Tensor | None = None) -> torch.Tensor:
    """For each row, the candidate answer with the highest ``log p(candidate | logits)`` under the
    factorized decoder, summed over the candidate's tokens that are not :data:`IGNORE`: ``logits [B, S, V]``,
    ``candidates [C, S]`` tokens, ``allowed [B, C]`` (``None``: all); returns ``[B, S]``. Every row needs at
    least one allowed candidate. With ``groups [B]`` the rows of one group take different candidates,
    spread over the candidates' ``classes [C]`` by ``shares [K]`` where given (:func:`distinct_argmax`)."""
    log_p = logits.float().log_softmax(-1)
    candidates = candidates.to(logits.device)
    one_hot = torch.nn.functional.one_hot(candidates.clamp(min=0), logits.shape[-1]).to(log_p.dtype)
    scores = torch.einsum("bsv,csv->bc", log_p, one_hot * (candidates != IGNORE).unsqueeze(-1))
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    choice = scores.argmax(-1) if groups is None else distinct_argmax(scores, groups, classes, shares)
    return candidates[choice]


def distinct_argmax(scores: torch.Tensor, groups: torch.Tensor, classes: torch.Tensor | None = None,
                    shares: torch.Tensor | None = None) -> torch.Tensor:
    """The best column of each row of ``scores [B, C]`` (``-inf``: not allowed), ``[B]``, where rows of
    one group (``groups [B]``, equal values) take different columns: a greedy matching in which the rows
    claim in order of their best score, each its best column that no earlier row of its group took; a
    row whose allowed columns are all taken takes its best one. With ``classes [C]`` (each column's class
    ``0..K-1``) and ``shares [K]`` (summing to 1), a group of ``n`` rows takes at most ``ceil(n * share)``
    columns of each class, so that its rows spread over the classes in those shares."""
    choice = scores.argmax(-1)
    if classes is not None:
        classes = classes.to(scores.device)
        quota = torch.ceil(torch.bincount(groups)[:, None] * shares.to(scores.device))  # [groups, K]
        counts = torch.zeros_like(quota)
    taken: dict[int, list[int]] = {}
    for row in scores.amax(-1).argsort(descending=True, stable=True).tolist():
        group = int(groups[row])
        used = taken.setdefault(group, [])
        free = scores[row]
        if used:
            free = free.index_fill(0, torch.tensor(used, device=scores.device), float("-inf"))
        if classes is not None:
            free = free.masked_fill((counts[group] >= quota[group])[classes], float("-inf"))
        if free.max() > float("-inf"):
            choice[row] = free.argmax()
        used.append(int(choice[row]))
        if classes is not None:
            counts[group, classes[choice[row]]] += 1
    return choice


def same_input_groups(x: torch.Tensor) -> torch.Tensor:
    """``[B]`` ids equal for equal rows of ``x [B, S]``: the groups of :func:`distinct_argmax`."""
    return torch.unique(x, dim=0, return_inverse=True)[1]


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


def is_number(value) -> bool:
    """Whether ``value`` is a real number (an integer or a float, not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
