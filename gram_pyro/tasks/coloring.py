"""Graph colouring with three colours (docs/paper.md, "Tasks, data and metrics").

An input is a graph on ``n`` nodes (``4 <= n <= 12``); a correct answer gives each node one of three
colours so that no edge joins two nodes of the same colour. The graphs are distinct 3-colourable draws
from the Erdős–Rényi model G(n, ``edge_prob``), split into disjoint train and test sets, or the graphs
of a user file (``source``, JSON Lines, see :func:`read_graphs`).

Encoding, with ``E = n(n-1)/2`` node pairs and ``S = E + n`` positions (vocabulary 6):

* positions ``0 .. E-1``: the strict upper triangle of the adjacency matrix in row-major order (the
  pairs ``(i, j)``, ``i < j``, of :func:`node_pairs`): ``1`` = no edge, ``2`` = edge;
* positions ``E .. S-1``: one token per node, ``3 + colour`` for colour ids ``0, 1, 2``; ``0`` (pad)
  in an input ``x``;
* a target ``y`` holds :data:`IGNORE` on the triangle and a proper colouring on the node positions.

Colourings are stored canonically, up to a permutation of the colour ids: colours renamed in order of
first appearance (node 0 has colour 0, the next colour to appear is 1, then 2; :func:`canonicalize`).
:func:`canonical_colourings` lists every canonical colouring of ``n`` nodes as ``[C, n]`` (``C`` = 1,094
for ``n = 8``, 9,842 for ``n = 10``). A split stores, for input ``m``, the rows of that table that
properly colour it: ``num_solutions[m]`` ids in the flat ``solution_ids [T]``, starting at
``cumsum(num_solutions)[m] - num_solutions[m]``. All of them are enumerated by checking every canonical
colouring against a chunk of graphs at once (:func:`enumerate_colourings`, one matrix product).

Training target (:meth:`ColoringSplit.batch`): a uniformly random canonical colouring of the input, then
(``permute_colours``) a uniformly random permutation of the three colour ids, drawn per access.

Metrics per input over its ``N`` answers (:meth:`ColoringTask.per_input`): ``accuracy`` (share of
proper colourings), ``conflicts`` (mean number of conflicting edges: both ends share a colour, or an
end's token is not a colour token) and ``coverage`` (distinct canonical colourings among the proper
answers / ``num_solutions``). :meth:`ColoringTask.score` adds ``conflicts_total``, the sum over inputs
of the per-input mean conflicts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from gram_pyro.config import UserError
from gram_pyro.tasks.base import (IGNORE, Batch, Task, a_fraction, an_integer, check_arguments, coverage_at_n,
                                  data_error, data_lines, is_int, most_likely, random_slot, same_input_groups,
                                  solutions_histogram)
from gram_pyro.tasks.cache import cached, progress

NO_EDGE, EDGE, FIRST_COLOUR = 1, 2, 3
NUM_COLOURS = 3
VOCAB_SIZE = FIRST_COLOUR + NUM_COLOURS
VERSION = 1
"""Generator version: bump when the generated data change, so that cached sets are rebuilt."""

CHUNK_ELEMENTS = 1 << 22
"""Bound on ``graphs x colourings`` checked at once by :func:`enumerate_colourings` (memory)."""
MAX_STALLED_ROUNDS = 10
"""Sampling gives up after this many rounds in a row that find no new 3-colourable graph."""


def node_pairs(n: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first [E], second [E])``: the node pairs ``i < j`` of the triangle positions, row-major."""
    first, second = torch.triu_indices(n, n, 1, device=device)
    return first, second


def sequence_length(n: int) -> int:
    """``S = n(n-1)/2 + n``."""
    return n * (n - 1) // 2 + n


def nodes_of(seq_len: int) -> int:
    """The ``n`` with ``sequence_length(n) == seq_len``."""
    n = round(((8 * seq_len + 1) ** 0.5 - 1) / 2)
    if sequence_length(n) != seq_len:
        raise ValueError(f"{seq_len} is not the sequence length of a graph colouring task")
    return n


def encode_graphs(edges: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., E]`` (which node pairs are edges) -> input tokens ``[..., S]`` (pad answer positions)."""
    n = round(((8 * edges.shape[-1] + 1) ** 0.5 + 1) / 2)  # E = n(n-1)/2
    triangle = NO_EDGE + edges.long()
    return torch.cat([triangle, triangle.new_zeros(*edges.shape[:-1], n)], -1)


def graph_edges(x: torch.Tensor) -> torch.Tensor:
    """Input tokens ``[..., S]`` -> bool ``[..., E]``: which node pairs are edges."""
    n = nodes_of(x.shape[-1])
    return x[..., : x.shape[-1] - n] == EDGE


def canonicalize(colours: torch.Tensor) -> torch.Tensor:
    """Colour ids ``[..., n]`` (0..2) renamed in order of first appearance (the first node gets 0)."""
    n = colours.shape[-1]
    ids = torch.arange(NUM_COLOURS, device=colours.device)
    positions = torch.arange(n, device=colours.device)[:, None]
    first_seen = torch.where(colours[..., None] == ids, positions, n).amin(-2)  # [..., 3]; n if unused
    new_id = (first_seen[..., None, :] < first_seen[..., :, None]).sum(-1)  # colours seen earlier
    return new_id.gather(-1, colours)


def _place_values(n: int, device: torch.device | None = None) -> torch.Tensor:
    """``[n]``: ``3^(n-1), ..., 3, 1``, the weight of each node's colour in a base-3 code."""
    return NUM_COLOURS ** torch.arange(n - 1, -1, -1, device=device)


def colouring_codes(colours: torch.Tensor) -> torch.Tensor:
    """Colour ids ``[..., n]`` -> the base-3 number of their canonical form ``[...]`` (equal codes =
    the same colouring up to a permutation of the colour ids)."""
    return (canonicalize(colours) * _place_values(colours.shape[-1], colours.device)).sum(-1)


def all_colourings(n: int) -> torch.Tensor:
    """Every assignment of three colour ids to ``n`` nodes, ``[3^n, n]``, lexicographic."""
    return torch.arange(NUM_COLOURS**n)[:, None] // _place_values(n) % NUM_COLOURS


def canonical_colourings(n: int) -> torch.Tensor:
    """All canonical colourings of ``n`` nodes with at most three colours, ``[C, n]``, lexicographic."""
    every = all_colourings(n)
    return every[(canonicalize(every) == every).all(-1)]


def same_colour_pairs(colourings: torch.Tensor) -> torch.Tensor:
    """Float ``[E, C]``: 1 where colouring ``c`` of ``colourings [C, n]`` gives both ends of node pair
    ``e`` one colour. A colouring is proper for a graph with edges ``[G, E]`` iff ``edges @ same == 0``."""
    first, second = node_pairs(colourings.shape[-1], colourings.device)
    return (colourings[:, first] == colourings[:, second]).T.float()


def enumerate_colourings(edges: torch.Tensor, colourings: torch.Tensor,
                         desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The proper colourings of each graph among ``colourings [C, n]``.

    ``edges``: bool ``[G, E]``. Returns ``num [G]`` and ``ids [T]``: graph by graph, the ascending rows
    of ``colourings`` that give the two ends of every edge different colours. Row c is proper for graph g iff
    ``edges[g] @ same == 0`` where ``same [E, C]`` marks the pairs a colouring gives one colour.
    """
    same = same_colour_pairs(colourings)
    rows = max(1, CHUNK_ELEMENTS // len(colourings))
    starts = range(0, len(edges), rows)
    nums, ids = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
    for start in progress(starts, desc) if desc else starts:
        proper = edges[start:start + rows].float() @ same == 0
        nums.append(proper.sum(-1))
        ids.append(proper.nonzero()[:, 1])
    return torch.cat(nums), torch.cat(ids)


def count_conflicts(x: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Long ``[...]``: edges of ``x`` whose ends have the same colour in ``answer`` or whose either end
    holds a token that is not a colour token (both ``[..., S]``, broadcast)."""
    x, answer = torch.broadcast_tensors(x, answer)
    n = nodes_of(x.shape[-1])
    tokens = answer[..., -n:]
    is_colour = (tokens >= FIRST_COLOUR) & (tokens < VOCAB_SIZE)
    first, second = node_pairs(n, answer.device)
    bad = (tokens[..., first] == tokens[..., second]) | ~is_colour[..., first] | ~is_colour[..., second]
    return (graph_edges(x) & bad).sum(-1)


def is_proper_colouring(x: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Bool ``[...]``: every node token of ``answer`` is a colour token and no edge of ``x`` joins two
    nodes of one colour (both ``[..., S]``, broadcast; the triangle tokens of ``answer`` are ignored)."""
    x, answer = torch.broadcast_tensors(x, answer)
    tokens = answer[..., -nodes_of(x.shape[-1]):]
    is_colour = ((tokens >= FIRST_COLOUR) & (tokens < VOCAB_SIZE)).all(-1)
    return is_colour & (count_conflicts(x, answer) == 0)


def colouring_ids(answers: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Long ``[N, M]``: the canonical code (:func:`colouring_codes`) of each valid answer, equal for
    colourings equal up to colour permutation, -1 for an invalid one (``answers [N, M, S]``, ``valid``
    bool ``[N, M]``): the ids of :func:`coverage_at_n`."""
    n = nodes_of(answers.shape[-1])
    colours = (answers[..., -n:] - FIRST_COLOUR).clamp(0, NUM_COLOURS - 1)
    return torch.where(valid, colouring_codes(colours), -1)


def first_occurrences(rows: torch.Tensor) -> torch.Tensor:
    """Ascending indices of the first occurrence of each distinct row of ``rows [G, K]``."""
    distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
    first = torch.full((len(distinct),), len(rows)).scatter_reduce(0, inverse, torch.arange(len(rows)), "amin")
    return first.sort().values


def sample_colourable_graphs(n: int, edge_prob: float, count: int, colourings: torch.Tensor,
                             generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct 3-colourable G(n, edge_prob) graphs as bool ``[count, E]``, in order of draw.

    Rounds of draws (half again as many as still needed, plus 64) until enough are kept; a
    :class:`UserError` when ``MAX_STALLED_ROUNDS`` rounds in a row add none (too few such graphs exist).
    """
    num_pairs = n * (n - 1) // 2
    kept = torch.zeros(0, num_pairs, dtype=torch.bool)
    stalled = 0
    with progress(desc="coloring: sampling graphs", total=count) as bar:
        while len(kept) < count:
            needed = count - len(kept)
            drawn = torch.rand(needed + needed // 2 + 64, num_pairs, generator=generator) < edge_prob
            pool = torch.cat([kept, drawn])
            fresh = pool[first_occurrences(pool)[len(kept):]]
            fresh = fresh[enumerate_colourings(fresh, colourings)[0] > 0][:needed]
            stalled = 0 if len(fresh) else stalled + 1
            if stalled == MAX_STALLED_ROUNDS:
                raise UserError(f"coloring: only {len(kept)} distinct 3-colourable graphs found for n={n}, "
                                f"edge_prob={edge_prob}; lower num_train + num_test ({count})")
            kept = torch.cat([kept, fresh])
            bar.update(len(fresh))
    return kept


def split_arrays(edges: torch.Tensor, num_test: int, colourings: torch.Tensor,
                 generator: torch.Generator) -> dict:
    """Cache arrays of a random train/test split of the distinct graphs ``edges [M, E]``:
    ``<split>_edges``, ``<split>_num_solutions`` and ``<split>_solution_ids`` (see the module doc)."""
    order = torch.randperm(len(edges), generator=generator)
    arrays = {}
    for name, rows in (("train", order[num_test:]), ("test", order[:num_test])):
        split_edges = edges[rows.sort().values]
        num, ids = enumerate_colourings(split_edges, colourings, desc=f"coloring: colourings of {name}")
        arrays |= {f"{name}_edges": split_edges.numpy(), f"{name}_num_solutions": num.int().numpy(),
                   f"{name}_solution_ids": ids.int().numpy()}
    return arrays


def _parse_edges(text: str, n: int) -> list[tuple[int, int]]:
    """The edge list of one JSON line; ``ValueError`` with the reason when the line is malformed."""
    try:
        graph = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON ({error.msg})") from None
    if not isinstance(graph, dict) or "n" not in graph or "edges" not in graph:
        raise ValueError('expected an object with keys "n" and "edges"')
    if not is_int(graph["n"]) or graph["n"] != n:
        raise ValueError(f"graph has n={json.dumps(graph['n'])}, the task has n={n}")
    pairs = graph["edges"]
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and all(map(is_int, p))
                                              for p in pairs):
        raise ValueError("edges must be a list of [i, j] node pairs")
    for i, j in pairs:
        if not (0 <= i < n and 0 <= j < n):
            raise ValueError(f"edge [{i}, {j}] has a node outside 0..{n - 1}")
        if i == j:
            raise ValueError(f"edge [{i}, {j}] is a self loop")
    return pairs


def _read_graph_file(path: str | Path, n: int) -> tuple[torch.Tensor, list[int]]:
    """Bool edges ``[M, E]`` of the graphs of a JSON Lines file and the line number of each."""
    position = torch.zeros(n, n, dtype=torch.long)
    first, second = node_pairs(n)
    position[first, second] = position[second, first] = torch.arange(len(first))
    rows, lines = [], []
    for number, text in data_lines(path):
        try:
            pairs = _parse_edges(text, n)
        except ValueError as problem:
            raise data_error(path, number, str(problem)) from None
        row = torch.zeros(len(first), dtype=torch.bool)
        row[position[tuple(torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).T)]] = True
        rows.append(row)
        lines.append(number)
    return torch.stack(rows), lines


def read_graphs(path: str | Path, n: int) -> torch.Tensor:
    """Input tokens ``[M, S]`` of the graphs of a JSON Lines file, one ``{"n": n, "edges": [[i, j], ...]}``
    per line (undirected; a pair given twice is one edge). A malformed line is a one-line
    :class:`UserError` ``<file>:<line>: <reason>``."""
    return encode_graphs(_read_graph_file(path, n)[0])


def format_answer(x_row: torch.Tensor, answer_row: torch.Tensor) -> str:
    """One JSON line ``{"n", "edges", "colours", "valid"}`` for an input ``[S]`` and an answer ``[S]``;
    ``colours`` holds colour ids 0..2, ``null`` for a node whose token is not a colour token."""
    n = nodes_of(x_row.shape[-1])
    first, second = node_pairs(n)
    is_edge = graph_edges(x_row)
    colours = [t - FIRST_COLOUR if FIRST_COLOUR <= t < VOCAB_SIZE else None for t in answer_row[-n:].tolist()]
    return json.dumps({"n": n, "edges": torch.stack([first[is_edge], second[is_edge]], -1).tolist(),
                       "colours": colours, "valid": bool(is_proper_colouring(x_row, answer_row))})


@dataclass
class ColoringSplit:
    """Graphs ``inputs [M, S]``, their proper canonical colourings (``num_solutions [M]`` ids each in
    ``solution_ids [T]``, rows of ``colourings [C, n]``) and whether targets permute the colour ids."""

    inputs: torch.Tensor
    num_solutions: torch.Tensor
    solution_ids: torch.Tensor
    colourings: torch.Tensor
    permute_colours: bool = True
    puzzles: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.solution_starts = torch.cumsum(self.num_solutions, 0) - self.num_solutions

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        """``x = inputs[index]``; ``y``: a uniformly random canonical colouring of each graph, its colour
        ids permuted at random when ``permute_colours``, ``IGNORE`` on the triangle positions."""
        slot = random_slot(self.num_solutions[index], generator)
        colours = self.colourings[self.solution_ids[self.solution_starts[index] + slot]]
        if self.permute_colours:
            permutation = torch.rand(len(index), NUM_COLOURS, generator=generator).argsort(-1)
            colours = permutation.gather(1, colours)
        x = self.inputs[index]
        y = torch.full_like(x, IGNORE)
        y[:, -colours.shape[-1]:] = FIRST_COLOUR + colours
        return Batch(x, y)


class ColoringTask(Task):
    """Three-colouring of graphs on ``n`` nodes (see the module doc for encoding and metrics).

    Generated data: ``num_train + num_test`` distinct 3-colourable G(n, edge_prob) graphs, seeded by
    ``seed``. With ``source`` (a JSON Lines file, :func:`read_graphs`), its distinct graphs instead,
    ``test_fraction`` of them (seeded) held out; ``num_train``/``num_test``/``edge_prob`` are then unused.
    Sets are built once into ``cache_dir`` (:func:`gram_pyro.tasks.cache.cached`).
    """

    name = "coloring"
    vocab_size = VOCAB_SIZE

    def __init__(self, n: int = 8, edge_prob: float = 0.35, num_train: int = 7002, num_test: int = 255,
                 permute_colours: bool = True, source: str | None = None, test_fraction: float = 0.15,
                 cache_dir: str | None = None, seed: int = 0):
        check_arguments(self.name, {"n": an_integer(n, 4, 12), "edge_prob": a_fraction(edge_prob, one=True),
                                    "num_train": an_integer(num_train, 1), "num_test": an_integer(num_test, 1),
                                    "test_fraction": a_fraction(test_fraction)})
        self.n, self.seq_len, self.source = n, sequence_length(n), source
        self.edge_prob = None if source else edge_prob
        colourings = canonical_colourings(n)
        if source:
            arrays = self._source_arrays(source, test_fraction, colourings, cache_dir, seed)
        else:
            params = {"n": n, "edge_prob": edge_prob, "num_train": num_train, "num_test": num_test, "seed": seed}
            arrays, _ = cached(self.name, params, VERSION, lambda: self._generated_arrays(params, colourings),
                               cache_dir)
        self.splits = {name: ColoringSplit(encode_graphs(torch.from_numpy(arrays[f"{name}_edges"])),
                                           torch.from_numpy(arrays[f"{name}_num_solutions"]).long(),
                                           torch.from_numpy(arrays[f"{name}_solution_ids"]).long(),
                                           colourings, permute_colours)
                       for name in ("train", "test")}

    @staticmethod
    def _generated_arrays(params: dict, colourings: torch.Tensor) -> tuple[dict, dict]:
        generator = torch.Generator().manual_seed(params["seed"])
        edges = sample_colourable_graphs(params["n"], params["edge_prob"], params["num_train"] + params["num_test"],
                                         colourings, generator)
        return split_arrays(edges, params["num_test"], colourings, generator), {}

    def _source_arrays(self, source: str, test_fraction: float, colourings: torch.Tensor,
                       cache_dir: str | None, seed: int) -> dict:
        """Arrays of the distinct graphs of ``source``; a graph that is not 3-colourable names its line."""
        every, lines = _read_graph_file(source, self.n)
        distinct = first_occurrences(every)
        edges = every[distinct]
        num_test = round(test_fraction * len(edges))
        if not 1 <= num_test < len(edges):
            raise UserError(f"coloring: {source} holds {len(edges)} distinct graphs; test_fraction={test_fraction} "
                            "must leave at least one for test and one for train")
        params = {"n": self.n, "source_sha256": hashlib.sha256(edges.numpy().tobytes()).hexdigest(),
                  "test_fraction": test_fraction, "seed": seed}

        def build() -> tuple[dict, dict]:
            colourable = enumerate_colourings(edges, colourings)[0] > 0
            if not colourable.all():
                first_bad = distinct[(~colourable).nonzero()[0, 0]]
                raise data_error(source, lines[int(first_bad)], "graph is not 3-colourable")
            return split_arrays(edges, num_test, colourings, torch.Generator().manual_seed(seed)), {}

        return cached(self.name, params, VERSION, build, cache_dir)[0]

    def judge(self, x: torch.Tensor, answer: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`is_proper_colouring`; ``y`` is not consulted."""
        return is_proper_colouring(x, answer)

    def per_input(self, split: str, index: torch.Tensor, answers: torch.Tensor) -> dict[str, torch.Tensor]:
        """``accuracy``, ``conflicts`` and ``coverage`` per input, each ``[M]``, over ``answers [N, M, S]``."""
        data = self.splits[split]
        x = data.inputs[index]
        valid = is_proper_colouring(x, answers)
        return {"accuracy": valid.float().mean(0),
                "conflicts": count_conflicts(x, answers).float().mean(0),
                "coverage": coverage_at_n(colouring_ids(answers, valid), data.num_solutions[index])}

    def score(self, split: str, index: torch.Tensor, answers: torch.Tensor) -> dict[str, float]:
        """Means of :meth:`per_input` and ``conflicts_total``: the sum over inputs of mean conflicts."""
        metrics = self.per_input(split, index, answers)
        return {**{k: v.mean().item() for k, v in metrics.items()},
                "conflicts_total": metrics["conflicts"].sum().item()}

    def nearest_solution(self, x: torch.Tensor, logits: torch.Tensor, distinct: bool = False) -> torch.Tensor:
        """The proper colouring of each graph ``x [B, S]`` that ``logits [B, S, V]`` make most likely at
        the node positions (:func:`most_likely`; with ``distinct``, different ones for equal graphs), as a
        target: :data:`IGNORE` on the triangle. Candidates are the canonical colourings, or every colouring
        when targets permute the colour ids."""
        train = self.splits["train"]  # its table of canonical colourings, not built again per batch
        candidates = (all_colourings(self.n) if train.permute_colours else train.colourings).to(x.device)
        proper = graph_edges(x).float() @ same_colour_pairs(candidates) == 0  # [B, C]
        target = torch.full_like(x, IGNORE)
        groups = same_input_groups(x) if distinct else None
        target[:, -self.n:] = most_likely(logits[:, -self.n:], FIRST_COLOUR + candidates, proper, groups)
        return target

    def read_inputs(self, path) -> torch.Tensor:
        return read_graphs(path, self.n)

    def format_answer(self, x: torch.Tensor, answer: torch.Tensor) -> str:
        return format_answer(x, answer)

    def stats(self) -> dict:
        """Counts per split, solutions-per-input histograms, vocabulary, length, edge_prob, mean edges."""
        def mean_edges(inputs: torch.Tensor) -> float:
            return graph_edges(inputs).sum(-1).float().mean().item()

        return {"task": self.name, "n": self.n, "colours": NUM_COLOURS, "vocab_size": self.vocab_size,
                "seq_len": self.seq_len, "edge_prob": self.edge_prob, "source": self.source,
                "mean_edges": mean_edges(torch.cat([s.inputs for s in self.splits.values()])),
                "splits": {name: {"inputs": len(s), "solutions_per_input": solutions_histogram(s.num_solutions),
                                  "mean_edges": mean_edges(s.inputs)}
                           for name, s in self.splits.items()}}
