"""Surrogate versus full ELBO on validation data at saved checkpoints (the paper's appendix A.3).

Per target token (sums over inputs divided by the supervised tokens, as the objectives), with
``beta = 1``, expectations over ``K`` guide particles (:func:`importance.guide_particles`) and ``KL``
the per-transition ``KL(q || p)`` there (analytic for Normal guides, else Monte Carlo):

    surrogate = (1/N_sup) sum_n [ log p(y | z_T^(n)) - KL_n,T ]         the truncated objective's value
                                                                        (KL of each step's last transition)
    full      = log p(y | z_T^(N_sup)) - sum_{n, t} KL_n,t              docs/paper.md, "Training objective": the trajectory
                                                                        ELBO of the final answer

Truncation changes gradients, not values, so one untruncated run per checkpoint gives both. The two
agree in their KL terms when the guide covers only the last transitions; with
``posterior_transitions="all"`` the surrogate leaves out the KL of the earlier transitions.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch

from gram_pyro.checkpoint import load_checkpoint
from gram_pyro.config import UserError
from gram_pyro.diagnostics.importance import GuideParticles, guide_particles
from gram_pyro.tasks.base import IGNORE, Batch


def elbo_terms(particles: GuideParticles, y: torch.Tensor) -> tuple[float, float]:
    """``(surrogate, full)`` per target token from guide particles for targets ``y [M, S]``."""
    tokens = (y != IGNORE).sum().clamp(min=1).item()
    last_kl = particles.kl[..., -1]  # [K, M, N_sup]
    surrogate = (particles.log_lik - last_kl).mean(-1)
    full = particles.log_lik[..., -1] - particles.kl.sum((-1, -2))
    return surrogate.mean(0).sum().item() / tokens, full.mean(0).sum().item() / tokens


def checkpoint_elbos(model, guide, batch: Batch, paths: Sequence[str | Path], num_particles: int,
                     memory_budget_mb: float | None = None) -> list[dict]:
    """``[{"checkpoint", "batches", "surrogate", "full"}]`` per checkpoint file (training's payloads:
    ``model`` and ``guide`` state dicts), ordered by training progress. ``model`` and ``guide`` get
    their own weights back afterwards."""
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(guide.state_dict())
    rows = []
    try:
        for path in paths:
            payload = load_checkpoint(Path(path))
            try:
                model.load_state_dict(payload["model"])
                guide.load_state_dict(payload["guide"])
            except (RuntimeError, KeyError) as error:
                raise UserError(f"checkpoint {path} does not match the model/guide: "
                                f"{str(error).strip().splitlines()[0]}") from None
            particles = guide_particles(model, guide, batch, num_particles, decode=False,
                                        memory_budget_mb=memory_budget_mb)
            surrogate, full = elbo_terms(particles, batch.y)
            rows.append({"checkpoint": str(path), "batches": int(payload["batches_done"]),
                         "surrogate": surrogate, "full": full})
    finally:
        model.load_state_dict(saved[0])
        guide.load_state_dict(saved[1])
    return sorted(rows, key=lambda row: row["batches"])
