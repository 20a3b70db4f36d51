"""Evidence estimators: ``log p(y | x)`` by importance sampling with the guide as proposal (and the
weights' ESS), and by one sweep of sequential Monte Carlo. They score a trained model and guide; they
train nothing (the objectives are in :mod:`gram_pyro.objectives`).

Importance sampling (:func:`importance_log_evidence`):

    log p(y | x) ~= log (1/K) sum_k w_k,   w_k = p(y, eps^(k) | x) / q(eps^(k) | x, y),   eps^(k) ~ q

on the whole untruncated program (every supervision step's ``y`` and eps sites), in chunks of
``chunk_size`` vectorized particles (``K`` up to thousands without holding them all at once), without
gradient. The estimate of ``p`` is unbiased, its log is biased low (the IWAE bound with ``K``
particles). The log weights are kept in float64 (docs/paper.md, "Known pitfalls": importance diagnostics on float32
log weights are meaningless). ESS ``(sum w)^2 / sum w^2`` per example, between 1 and ``K``: near 1
means the estimate rests on one particle and should not be trusted.

SMC (:func:`smc_log_evidence`): ``log Z_N`` per example of the filter of
:class:`~gram_pyro.objectives.SequentialMonteCarlo` over the whole program (the guide as proposal,
resampling below ``resample_threshold * K`` ESS), without gradient; ``Z_N`` is unbiased for
``p(y | x)``, its log biased low.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gram_pyro.objectives.particles import LogTerms, effective_sample_size, log_mean_exp, run_program
from gram_pyro.objectives.smc import SequentialMonteCarlo
from gram_pyro.tasks.base import Batch


@dataclass
class EvidenceEstimate:
    log_evidence: torch.Tensor  # [B] float64, nats per example
    ess: torch.Tensor           # [B] effective sample size of the K weights
    log_weights: torch.Tensor   # [K, B] float64


@torch.no_grad()
def importance_log_evidence(model, guide, batch: Batch, num_particles: int = 1000,
                            chunk_size: int = 100) -> EvidenceEstimate:
    if num_particles < 1 or chunk_size < 1:
        raise ValueError(f"need num_particles >= 1 and chunk_size >= 1, got {num_particles}, {chunk_size}")
    chunks = []
    for start in range(0, num_particles, chunk_size):
        model_trace, guide_trace = run_program(model, guide, batch, min(chunk_size, num_particles - start))
        chunks.append(LogTerms(model, guide, model_trace, guide_trace).log_weight.double())
    log_w = torch.cat(chunks)
    return EvidenceEstimate(log_mean_exp(log_w), effective_sample_size(log_w), log_w)


@torch.no_grad()
def smc_log_evidence(model, guide, batch: Batch, num_particles: int = 100,
                     resample_threshold: float = 0.5) -> torch.Tensor:
    """``log Z_N`` ``[B]`` of one SMC sweep over the whole program (``Z_N`` unbiased for ``p(y | x)``)."""
    smc = SequentialMonteCarlo(num_particles, resample_threshold, truncate=False)
    smc.check(model)
    state: dict = {}
    return sum(smc.advance(model, guide, batch, state, n, truncate=False)[0] for n in range(model.n_sup))
