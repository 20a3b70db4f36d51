"""The dependency structure of the program, drawn from Pyro's own analysis (``docs/method/program.png``).

    python experiments/program_graph.py [out=docs/method/program.png]

:func:`pyro.infer.inspect.get_dependencies` traces a small :class:`gram_pyro.models.RecursiveReasoningModel`
(``N_sup = 2`` supervision steps of ``T = 2`` transitions) with ``y`` observed and reports, for every
sample site, the sites its distribution depends on. Through the deterministic recursion every eps
site depends on all earlier ones, so the figure draws the transitive reduction of those
dependencies (:func:`program_edges`: an edge only where no longer path joins the two sites): the
state-space chain ``eps/0/0 -> eps/0/1 -> eps/1/0 -> ...`` with the likelihood ``y/{n}`` of each
supervision step hanging off its last transition, all inside the plate ``data``. z0 and ``x`` are
fixed inputs of the program, not sites. ``pyro.render_model`` draws the full (unreduced) graph where
graphviz is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import torch
from pyro.infer.inspect import get_dependencies

from gram_pyro.models import RecursiveReasoningModel

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

ROOT = Path(__file__).resolve().parents[1]


def program_edges(model, x: torch.Tensor, y: torch.Tensor) -> list[tuple[str, str]]:
    """``(upstream site, site)`` edges of the transitive reduction of the prior dependencies of
    ``model(x, y=y)``, in program order."""
    dependencies = get_dependencies(model, (x,), {"y": y})["prior_dependencies"]
    parents = {site: set(upstream) - {site} for site, upstream in dependencies.items()}

    def ancestors(site: str) -> set[str]:
        found = set(parents[site])
        for parent in parents[site]:
            found |= ancestors(parent)
        return found

    return [(parent, site) for site in dependencies for parent in dependencies[site]
            if parent in parents[site] and not any(parent in ancestors(other) for other in parents[site] - {parent})]


def draw(edges: list[tuple[str, str]], path: Path) -> None:
    """Latent sites on a row in program order, each ``y/{n}`` below its parent, observed ones shaded,
    all inside the plate ``data``; saved to ``path``."""
    latent = [site for site in dict.fromkeys(s for edge in edges for s in edge) if not site.startswith("y/")]
    where = {site: (i, 1.0) for i, site in enumerate(latent)}
    for parent, site in edges:
        if site.startswith("y/"):
            where[site] = (where[parent][0], 0.0)
    figure, ax = plt.subplots(figsize=(1.6 * len(latent) + 1, 3.2))
    for parent, site in edges:
        (x0, y0), (x1, y1) = where[parent], where[site]
        ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="-|>", shrinkA=24, shrinkB=24, color="0.2"))
    for site, (x, y) in where.items():
        observed = site.startswith("y/")
        ax.scatter([x], [y], s=2600, facecolor="0.75" if observed else "white", edgecolor="black", zorder=2)
        ax.text(x, y, site, ha="center", va="center", fontsize=9, zorder=3)
    ax.add_patch(plt.Rectangle((-0.6, -0.45), len(latent) + 0.5, 1.9, fill=False, linewidth=1))
    ax.text(len(latent) - 0.2, -0.4, "data", ha="right", va="bottom", fontsize=9)
    ax.text(-0.5, 1.35, "x, z0 = (h0, l0): fixed inputs", fontsize=8, color="0.3")
    ax.set_xlim(-0.8, len(latent) + 0.1)
    ax.set_ylim(-0.6, 1.6)
    ax.axis("off")
    ax.set_title("RecursiveReasoningModel, N_sup = 2, T = 2: get_dependencies, transitive reduction", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def main(argv: list[str]) -> int:
    out = ROOT / "docs" / "method" / "program.png"
    for argument in argv:
        key, _, value = argument.partition("=")
        if key != "out" or not value:
            print(f"program_graph: error: unknown argument {argument!r}; allowed: out=<png file>", file=sys.stderr)
            return 2
        out = Path(value)
    torch.manual_seed(0)
    model = RecursiveReasoningModel(vocab_size=3, seq_len=4, dim=8, ffn_hidden=16, num_layers=1, transitions=2,
                                    n_sup=2, num_prefix=2)
    x = torch.ones(1, 4, dtype=torch.long)
    draw(program_edges(model, x, x), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
