"""MCMC over the eps sites of a few inputs given ``(x, y)``: reference draws of the true posterior
``p(eps | x, y)`` and their convergence diagnostics.

Each chain is one run of :func:`gram_pyro.objectives.mcmc_em.sample_posterior`: NUTS on
``-log p(y, eps | x)`` of the whole untruncated program (every eps site of every step, the inputs of
the batch jointly), started from one draw of the guide, with step-size and mass adaptation during
warm-up. Chains run one after another, each from its own guide draw. Every potential evaluation runs
the whole program and its gradient: small configs and a few inputs only.

The draws are kept as projections on fixed random unit vectors (:func:`importance.project_eps`),
``projection [C, S, B, N_sup, T, P]``, and ArviZ's ``az.summary`` gives per projected coordinate the
rank-normalized split R-hat, bulk and tail ESS and the Monte Carlo standard error of the mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gram_pyro.diagnostics.arviz_adapter import convergence_summary, inference_data
from gram_pyro.diagnostics.importance import PROJECTION_DIMS, project_eps
from gram_pyro.objectives.mcmc_em import sample_posterior
from gram_pyro.tasks.base import Batch

VARIABLE = "eps_projection"


@dataclass
class MCMCDiagnostics:
    projection: torch.Tensor  # [C, S, B, N_sup, T, P]
    data: object              # InferenceData: posterior[VARIABLE] with dims chain, draw, *PROJECTION_DIMS
    table: object             # DataFrame: mcse_mean, mcse_sd, ess_bulk, ess_tail, r_hat per coordinate
    r_hat_max: float
    ess_bulk_min: float
    ess_tail_min: float
    mcse_mean_max: float


def mcmc_diagnostics(model, guide, batch: Batch, directions: torch.Tensor, num_chains: int = 2,
                     num_samples: int = 100, warmup_steps: int = 100, step_size: float = 0.1,
                     max_tree_depth: int = 5, input_labels=None) -> MCMCDiagnostics:
    """``num_chains`` NUTS chains for the inputs of ``batch`` (module docstring); ``input_labels``
    name the inputs in the InferenceData (default ``0..B-1``)."""
    if num_chains < 2:
        raise ValueError(f"convergence diagnostics need at least 2 chains, got {num_chains}")
    chains = []
    for _ in range(num_chains):
        draws, _ = sample_posterior(model, guide, batch, kernel="nuts", num_samples=num_samples,
                                    warmup_steps=warmup_steps, step_size=step_size, max_tree_depth=max_tree_depth)
        chains.append(project_eps(draws, directions, model.n_sup, model.transitions))
    projection = torch.stack(chains).detach()
    labels = range(batch.x.shape[0]) if input_labels is None else input_labels
    coords = {"input": list(labels), "step": list(range(model.n_sup)),
              "transition": list(range(model.transitions)), "projection": list(range(directions.shape[0]))}
    data = inference_data({"posterior": {VARIABLE: (("chain", "draw", *PROJECTION_DIMS), projection.numpy())}},
                          coords)
    table = convergence_summary(data, VARIABLE)
    return MCMCDiagnostics(projection, data, table, float(table["r_hat"].max()), float(table["ess_bulk"].min()),
                           float(table["ess_tail"].min()), float(table["mcse_mean"].max()))
