"""Sequential Monte Carlo over supervision steps, with a FIVO-style bound as the loss.

``K`` particles per input move through the model's own ``init``/``step``. At supervision step ``n``
every particle runs the step under the guide (the proposal; with ``guide=prior`` this is the
bootstrap filter) and gets the incremental weight

    log a_n^(k) = log p(y | z_T^(n,k)) + sum over covered eps sites of the step (log p - log q).

With normalized weights ``W_{n-1}`` carried from the previous step (uniform after a resampling),

    log Z_n = log Z_{n-1} + log sum_k W_{n-1}^(k) a_n^(k),   W_n^(k) ∝ W_{n-1}^(k) a_n^(k),

and ``Z_N`` is an unbiased estimate of ``p(y/0, ..., y/{N-1} | x)`` (every step observes ``y``);
``log Z_N`` is a lower bound in expectation (FIVO). Before each step after the first, the particles of
every input whose ESS ``1 / sum_k W_k^2`` is below ``resample_threshold * K`` are resampled
(systematic resampling, per input) and their weights reset to uniform. Resampling is not
differentiated (the FIVO gradient: ancestor indices are constants, gathered states keep their paths).

``truncate=True`` (default): update ``n`` minimizes ``-log sum_k W_{n-1}^(k) a_n^(k)`` (the step's
increment of ``log Z``), the states and weights are detached between steps, one optimizer step per
supervision step, as the GRAM surrogate. ``truncate=False``: ``-log Z_N`` of the whole untruncated
program, one optimizer step per batch. Normalized per supervised target token as everywhere. Cost:
``K N_sup T`` transitions per example and batch. :func:`gram_pyro.diagnostics.evidence.smc_log_evidence`
runs the same filter (:meth:`SequentialMonteCarlo.advance`) for ``log Z_N`` per example without gradient.
"""

from __future__ import annotations

import math

import torch
from pyro.poutine.trace_struct import Trace

from gram_pyro.objectives.base import Judge, exact_match, per_token
from gram_pyro.objectives.particles import (LogTerms, ParticleObjective, effective_sample_size, fraction,
                                             init_particles, run_step)
from gram_pyro.tasks.base import Batch


def systematic_ancestors(log_w: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Ancestor indices ``[K, B]`` by systematic resampling of the weights ``log_w [K, B]`` of each input:
    particle ``k`` takes the ancestor whose cumulative normalized weight first reaches ``(u_b + k) / K``,
    with ``u_b`` = ``offsets [B]`` in (0, 1) (default: ``torch.rand``)."""
    K, B = log_w.shape
    cdf = log_w.softmax(0).cumsum(0).T.contiguous()                                   # [B, K]
    u = torch.rand(B, 1, device=log_w.device) if offsets is None else offsets[:, None]
    positions = (u.to(cdf.dtype) + torch.arange(K, device=log_w.device)) / K
    return torch.searchsorted(cdf, positions).clamp(max=K - 1).T                      # [K, B]


class SequentialMonteCarlo(ParticleObjective):
    def __init__(self, num_particles: int = 8, resample_threshold: float = 0.5, truncate: bool = True,
                 halt_weight: float = 1.0, value_weight: float = 1.0, judge: Judge = exact_match):
        super().__init__(num_particles, truncate, halt_weight, value_weight, judge)
        self.resample_threshold = fraction("resample_threshold", resample_threshold)

    def resample(self, state: dict) -> torch.Tensor:
        """Resample the inputs whose ESS fell below the threshold; returns which did ``[B]``."""
        log_w, particles = state["log_w"], state["particles"]
        K = log_w.shape[0]
        low = effective_sample_size(log_w.detach()) < self.resample_threshold * K
        if not low.any():
            return low
        keep = torch.arange(K, device=log_w.device)[:, None]
        ancestors = torch.where(low, systematic_ancestors(log_w.detach()), keep)
        for key, value in particles.items():
            index = ancestors.view(*ancestors.shape, *[1] * (value.dim() - 2)).expand_as(value)
            particles[key] = value.gather(0, index)
        state["log_w"] = torch.where(low, torch.full_like(log_w, -math.log(K)), log_w)
        return low

    def advance(self, model, guide, batch: Batch, state: dict, n: int,
                truncate: bool) -> tuple[torch.Tensor, Trace, torch.Tensor]:
        """Step ``n`` of the filter: the increment of ``log Z`` ``[B]``, the step's model trace and the
        share of inputs resampled before it."""
        if n == 0:
            state["particles"], state["log_w"] = {}, torch.tensor(-math.log(self.num_particles))
            init_particles(model, batch, state["particles"], self.num_particles)
            resampled = torch.zeros(())
        else:
            resampled = self.resample(state).float().mean()
        model_trace, guide_trace = run_step(model, guide, batch, state["particles"], self.num_particles, truncate)
        log_w = state["log_w"] + LogTerms(model, guide, model_trace, guide_trace).log_weight
        increment = torch.logsumexp(log_w, 0)
        state["log_w"] = log_w - increment
        if truncate:
            state["log_w"] = state["log_w"].detach()
        return increment, model_trace, resampled

    def loss(self, model, guide, batch: Batch, state: dict, update: int) -> tuple[torch.Tensor, dict]:
        self.start(model)
        steps = [update] if self.truncate else list(range(model.n_sup))
        log_z, resampled, traces = torch.zeros(()), torch.zeros(()), []
        for n in steps:
            increment, model_trace, step_resampled = self.advance(model, guide, batch, state, n, self.truncate)
            log_z, resampled = log_z + increment, resampled + step_resampled / len(steps)
            traces.append((model_trace, n))
        bound = per_token(log_z, batch.y)
        metrics = {"bound": bound, "ess": effective_sample_size(state["log_w"].detach()).mean(), "resampled": resampled}
        return self.finish(-bound, metrics, batch, traces)

