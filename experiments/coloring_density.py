"""How many colourings the graphs of G(n, p) have, per edge probability p: the measurement behind the
colouring tasks' ``edge_prob`` (docs/tasks/coloring.md, "Why edge_prob").

    python experiments/coloring_density.py [--nodes 8 10] [--probs 0.35 0.4 0.45 0.5 0.55 0.6]
                                           [--draws 5000] [--samples 20] [--seed 0] [--out FILE.json]

For each ``(n, p)``: ``draws`` graphs from G(n, p) (the same uniforms for every ``p``, seeded by
``seed``, so the rows differ by the density alone), the share that is 3-colourable, and over those the
canonical colourings per graph ``c`` (colour renamings counted once, as the task stores them): median,
mean, the share with exactly one, and two bounds that a published coverage@N pins the density with:

* ``mean 1/c``: the coverage@N of a deterministic model that always writes one proper colouring. One
  that is right on a share ``a`` of the graphs reaches about ``a`` times that: denser graphs have fewer
  colourings, so one answer covers more of them;
* ``mean min(N, c)/c``: the most coverage@N any model can reach with ``N = samples`` answers (a graph
  with more than ``N`` colourings cannot be covered).

Also the mean edges per kept graph. Prints a markdown table; ``--out`` also writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from gram_pyro.config import UserError, command_line
from gram_pyro.tasks.coloring import canonical_colourings, enumerate_colourings


def density_row(n: int, edge_prob: float, draws: int, samples: int, seed: int) -> dict:
    """The statistics of one ``(n, edge_prob)`` (module docstring) from ``draws`` G(n, p) graphs."""
    edges = torch.rand(draws, n * (n - 1) // 2, generator=torch.Generator().manual_seed(seed)) < edge_prob
    counts, _ = enumerate_colourings(edges, canonical_colourings(n))
    kept, kept_edges = counts[counts > 0].double(), edges[counts > 0]
    if not len(kept):  # no 3-colourable draw: nothing to count over
        kept = kept_edges = torch.full((1,), math.nan)
    return {"n": n, "edge_prob": edge_prob, "draws": draws, "colourable": counts.gt(0).double().mean().item(),
            "mean_edges": kept_edges.sum(-1).double().mean().item(),
            "median_colourings": kept.median().item(), "mean_colourings": kept.mean().item(),
            "one_colouring": (kept == 1).double().mean().item(),
            "mean_inverse_colourings": kept.reciprocal().mean().item(),
            "coverage_ceiling": (kept.clamp(max=samples) / kept).mean().item(), "samples": samples}


def markdown(rows: list[dict]) -> str:
    lines = ["| n | edge_prob | 3-colourable | mean edges | colourings: median / mean | exactly one | "
             f"mean 1/c | mean min({rows[0]['samples']}, c)/c |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['edge_prob']:.2f} | {r['colourable']:.2f} | {r['mean_edges']:.1f} "
                     f"| {r['median_colourings']:.0f} / {r['mean_colourings']:.1f} | {100 * r['one_colouring']:.0f}% "
                     f"| {100 * r['mean_inverse_colourings']:.1f}% | {100 * r['coverage_ceiling']:.1f}% |")
    return "\n".join(lines) + "\n"


@command_line("coloring_density")
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[8, 10])
    parser.add_argument("--probs", type=float, nargs="+", default=[0.35, 0.4, 0.45, 0.5, 0.55, 0.6])
    parser.add_argument("--draws", type=int, default=5000)
    parser.add_argument("--samples", type=int, default=20, help="N of the coverage@N ceiling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if any(not 4 <= n <= 12 for n in args.nodes):
        raise UserError(f"--nodes must lie in 4..12 (the task's range), got {args.nodes}")
    if any(not 0 < p < 1 for p in args.probs):
        raise UserError(f"--probs must lie strictly between 0 and 1, got {args.probs}")
    if args.draws < 1 or args.samples < 1:
        raise UserError(f"--draws and --samples must be at least 1, got {args.draws} and {args.samples}")
    rows = [density_row(n, p, args.draws, args.samples, args.seed) for n in args.nodes for p in args.probs]
    print(markdown(rows), end="")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
