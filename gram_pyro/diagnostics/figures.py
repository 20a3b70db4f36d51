"""The PNG figures of a diagnostics report (docs/diagnostics.md explains how to read each).

Every function draws one figure from plain tensors/lists and writes it to ``path``. Figures are made
with matplotlib's object API (no pyplot state, no GUI backend); ArviZ's plots come through
:mod:`gram_pyro.diagnostics.arviz_adapter`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from gram_pyro.diagnostics import arviz_adapter
from gram_pyro.diagnostics.importance import KHAT_LIMIT

KHAT_SHOWN_MAX = 1.5
"""k-hat values above this (up to infinity, for degenerate weights) are drawn at it."""


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _save(figure: Figure, path: Path) -> None:
    figure.savefig(path, dpi=110)


def accuracy_by_step(prior: list[float], posterior: list[float], path: Path, metric: str = "accuracy") -> None:
    """The shortcut check's ``metric`` (accuracy by the judge unless a task names another) of answers
    decoded after each supervision step, prior vs posterior trajectories."""
    figure = _figure(5, 3.5)
    ax = figure.subplots()
    steps = range(1, len(prior) + 1)
    ax.plot(steps, posterior, "o-", label="posterior (guide sees y)")
    ax.plot(steps, prior, "s-", label="prior (test time)")
    ax.set(xlabel="supervision step", ylabel="accuracy (judge)" if metric == "accuracy" else metric,
           ylim=(-0.02, 1.02), xticks=list(steps),
           title="Posterior shortcut check")
    ax.legend()
    _save(figure, path)


def kl_profile(per_transition: list[list[float]], active_units: list[float], units_per_step: int,
               unit_threshold: float, path: Path) -> None:
    """KL(q || p) per transition (bars) and active units per supervision step."""
    figure = _figure(9, 3.5)
    left, right = figure.subplots(1, 2)
    kl = torch.tensor(per_transition)
    labels = [f"{n}/{t}" for n in range(kl.shape[0]) for t in range(kl.shape[1])]
    left.bar(labels, kl.flatten().tolist())
    left.set(xlabel="transition n/t", ylabel="KL(q || p), nats", title="KL per transition")
    left.tick_params(axis="x", labelrotation=90)
    right.bar(range(1, len(active_units) + 1), active_units)
    right.set(xlabel="supervision step", ylabel=f"active units (of {units_per_step})",
              title=f"units with KL > {unit_threshold:g} nats", xticks=list(range(1, len(active_units) + 1)))
    _save(figure, path)


def kl_units(kl_units: torch.Tensor, path: Path) -> None:
    """Per-unit KL ``[N_sup, T, L, D]`` summed over each step's transitions: one heat map per step
    (rows: positions, columns: channels; log10 nats)."""
    per_step = kl_units.sum(1).clamp(min=1e-6).log10()
    figure = _figure(3 * per_step.shape[0] + 1, 3.5)
    axes = figure.subplots(1, per_step.shape[0], squeeze=False)[0]
    for n, ax in enumerate(axes):
        image = ax.imshow(per_step[n].cpu().numpy(), aspect="auto", cmap="viridis", vmin=-4,
                          vmax=max(per_step.nan_to_num(-4).max().item(), -3))
        ax.set(title=f"step {n + 1}", xlabel="channel d", ylabel="position l" if n == 0 else None)
    figure.colorbar(image, ax=list(axes), label="log10 KL (nats)")
    _save(figure, path)


def training_curves(curves: dict[str, list[float]], path: Path) -> None:
    """The logged training columns (KL, NLL, ...) against batches, one panel each."""
    names = [name for name in curves if name != "batch"]
    figure = _figure(3.2 * len(names) + 0.5, 3.2)
    for ax, name in zip(figure.subplots(1, len(names), squeeze=False)[0], names):
        ax.plot(curves["batch"], curves[name])
        ax.set(xlabel="batch", title=f"{name} (training)")
    _save(figure, path)


def importance(khat: torch.Tensor, ess: torch.Tensor, num_particles: int, path: Path) -> None:
    """PSIS k-hat per input (ArviZ; drawn at most at :data:`KHAT_SHOWN_MAX`) and the histogram of ESS / K."""
    figure = _figure(10, 4)
    left, right = figure.subplots(1, 2)
    arviz_adapter.plot_khat(khat.clamp(max=KHAT_SHOWN_MAX).cpu().numpy(), left)
    left.set(title=f"PSIS k-hat per input (> {KHAT_LIMIT}: unreliable)", xlabel="input")
    right.hist((ess / num_particles).cpu().numpy(), bins=20, range=(0, 1))
    right.set(xlabel="ESS / K", ylabel="inputs", title=f"importance ESS (K = {num_particles})")
    _save(figure, path)


def diversity(distinct: torch.Tensor, distinct_valid: torch.Tensor, spread: torch.Tensor, num_samples: int,
              path: Path) -> None:
    """Distinct answers per input among N prior trajectories, and the spread of h per step."""
    figure = _figure(9, 3.5)
    left, right = figure.subplots(1, 2)
    bins = torch.arange(0.5, num_samples + 1.5).tolist()
    left.hist([distinct.tolist(), distinct_valid.tolist()], bins=bins, label=["all", "valid"])
    left.set(xlabel=f"distinct answers among {num_samples}", ylabel="inputs", title="Answer diversity")
    left.legend()
    steps = torch.arange(1, spread.shape[0] + 1).tolist()
    low, mid, high = torch.quantile(spread.float(), torch.tensor([0.1, 0.5, 0.9]), dim=1).tolist()
    right.plot(steps, mid, "o-", label="median over inputs")
    right.fill_between(steps, low, high, alpha=0.3, label="10-90%")
    right.set(xlabel="supervision step", ylabel="RMS distance per unit", xticks=steps,
              title="Pairwise distance of h between trajectories")
    right.legend()
    _save(figure, path)


def trajectory_paths(paths: torch.Tensor, answers: torch.Tensor, valid: torch.Tensor, path: Path) -> None:
    """Trajectories in the plane of their first two principal components, one panel per input
    (``paths [P, N_sup, N, 2]``, the states after each step), coloured by the final answer
    (``answers [N, P, S]``); a small dot marks the first step, a large dot the end of a trajectory
    with a valid answer and a cross one with an invalid answer."""
    figure = _figure(3.3 * paths.shape[0] + 0.5, 3.3)
    colours = [f"C{i}" for i in range(10)]
    for j, ax in enumerate(figure.subplots(1, paths.shape[0], squeeze=False)[0]):
        _, answer_id = torch.unique(answers[:, j], dim=0, return_inverse=True)
        for i in range(paths.shape[2]):
            colour = colours[int(answer_id[i]) % len(colours)]
            xs, ys = paths[j, :, i].T.tolist()
            ax.plot(xs, ys, "-", color=colour, alpha=0.6, linewidth=1)
            ax.plot(xs[0], ys[0], ".", color=colour, markersize=4)
            ax.plot(xs[-1], ys[-1], "o" if valid[i, j] else "x", color=colour)
        distinct = int(answer_id.max()) + 1
        ax.set(title=f"input {j}: {distinct} distinct answer{'s' * (distinct != 1)}", xlabel="PC 1",
               ylabel="PC 2" if j == 0 else None)
    _save(figure, path)


def mcmc_chains(data, variable: str, coords: dict, trace_path: Path, rank_path: Path) -> None:
    """ArviZ trace and rank plots of the MCMC projections at ``coords`` (one row per coordinate)."""
    rows = int(data.posterior[variable].sel(coords).isel(chain=0, draw=0).size)
    figure = _figure(9, 2 * rows)
    arviz_adapter.plot_trace(data, variable, coords, figure.subplots(rows, 2, squeeze=False))
    _save(figure, trace_path)
    figure = _figure(3.5 * rows, 3)
    arviz_adapter.plot_rank(data, variable, coords, figure.subplots(1, rows, squeeze=False)[0])
    _save(figure, rank_path)


def elbo_curves(rows: list[dict], path: Path) -> None:
    """Surrogate and full ELBO (nats per token) on validation data against training batches."""
    figure = _figure(5, 3.5)
    ax = figure.subplots()
    batches = [row["batches"] for row in rows]
    ax.plot(batches, [row["surrogate"] for row in rows], "o-", label="truncated surrogate")
    ax.plot(batches, [row["full"] for row in rows], "s-", label="full trajectory ELBO")
    ax.set(xlabel="training batches", ylabel="ELBO per target token (nats)", title="Validation ELBO")
    ax.legend()
    _save(figure, path)
