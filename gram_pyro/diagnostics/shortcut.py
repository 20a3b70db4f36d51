"""The posterior-shortcut check (docs/shortcut.md): does the model answer only when the guide hands it y?

    posterior accuracy = share of answers the task's judge accepts among those decoded along guide
                         trajectories (the model run under q(eps | x, y): argmax of the final step's logits)
    prior accuracy     = the same along prior trajectories (no guide, no y): what the model can do alone
    gap                = posterior accuracy - prior accuracy, on held-out inputs

Where the task's judge accepts every well-formed answer (digits), "accuracy" here is the task's
``shortcut_metric`` instead (digits: the share of images its classifier recognises), named in
``metric``; the fields keep their names.

A gap above ``threshold`` is the shortcut: the target reaches the decoder through eps. Its other
sign is the KL: :func:`kl_profile` gives ``KL(q || p)`` per transition (nats, summed over the ``L x D``
units, averaged over inputs and particles) and the active units per supervision step: unit ``(l, d)``
of step ``n`` is active when its KL summed over the step's transitions, averaged over inputs and
particles, exceeds ``unit_threshold`` nats (NaN where the guide family has no per-unit KL).
:func:`training_curves` reads the KL and likelihood logged during training from ``metrics.csv``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from gram_pyro.config import UserError
from gram_pyro.tasks.base import data_error

TRAINING_COLUMNS = ("kl", "nll", "neg_elbo", "loss")
"""Columns of ``metrics.csv`` kept for the KL-over-training figure, where the objective logs them."""


@dataclass
class ShortcutCheck:
    prior_accuracy: float
    posterior_accuracy: float
    gap: float
    threshold: float
    flagged: bool
    verdict: str
    metric: str = "accuracy"


@dataclass
class KLProfile:
    per_transition: list[list[float]]  # [N_sup][T] nats
    total: float                        # summed over transitions
    active_units: list[float]           # [N_sup] count (NaN where per-unit KL is unknown)
    units_per_step: int                 # L * D
    unit_threshold: float


def shortcut_check(prior_accuracy: torch.Tensor, posterior_accuracy: torch.Tensor,
                   threshold: float = 0.2, metric: str = "accuracy") -> ShortcutCheck:
    """The check of the module docstring from per-input scores ``[M]`` of ``metric``."""
    prior, posterior = prior_accuracy.float().mean().item(), posterior_accuracy.float().mean().item()
    gap = posterior - prior
    if gap > threshold:
        verdict = (f"POSTERIOR SHORTCUT: answers decoded along posterior trajectories are "
                   f"{'correct' if metric == 'accuracy' else metric} {posterior:.1%} of the time but only "
                   f"{prior:.1%} along prior ones (gap {gap:+.1%} > {threshold:.0%}): the guide "
                   "carries the target through eps; trust prior samples only. Levers: guide.posterior_steps=1, "
                   "objective.kl_cap, objective.prior_weight with prior_target=nearest (docs/shortcut.md)")
    else:
        verdict = (f"no posterior shortcut: posterior {metric} {posterior:.1%}, prior {metric} {prior:.1%} "
                   f"(gap {gap:+.1%}, threshold {threshold:.0%})")
    return ShortcutCheck(prior, posterior, gap, threshold, gap > threshold, verdict, metric)


def kl_profile(kl: torch.Tensor, kl_units: torch.Tensor, unit_threshold: float = 0.01) -> KLProfile:
    """Per-transition KL and active units (module docstring) from the particle KLs ``[K, M, N_sup, T]``
    and the mean per-unit KL ``[N_sup, T, L, D]``."""
    per_transition = kl.double().mean((0, 1))
    step_units = kl_units.sum(1).flatten(1)  # [N_sup, L D]
    active = (step_units > unit_threshold).sum(-1).double()
    active = torch.where(step_units.isnan().any(-1), torch.nan, active)
    return KLProfile(per_transition.tolist(), per_transition.sum().item(), active.tolist(),
                     step_units.shape[-1], unit_threshold)


def training_curves(run_dir: str | Path | None) -> dict[str, list[float]] | None:
    """``{"batch": [...], column: [...]}`` for the :data:`TRAINING_COLUMNS` present in
    ``run_dir/metrics.csv``; ``None`` without a run directory or file. A malformed line is a
    one-line :class:`UserError` naming it."""
    path = Path(run_dir) / "metrics.csv" if run_dir else None
    if path is None or not path.is_file():
        return None
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or "batch" not in rows[0]:
        raise UserError(f"{path}: no header with a 'batch' column")
    header = rows[0]
    keep = ["batch", *(name for name in TRAINING_COLUMNS if name in header)]
    curves: dict[str, list[float]] = {name: [] for name in keep}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise data_error(path, line, f"{len(row)} fields, the header has {len(header)}")
        for name in keep:
            try:
                curves[name].append(float(row[header.index(name)]))
            except ValueError:
                raise data_error(path, line, f"{name}={row[header.index(name)]!r} is not a number") from None
    return curves

