"""Importance-weighted bound (IWAE) with ``K`` vectorized particles, per example.

For each input ``b`` with particles ``eps^(k) ~ q`` (reparameterized):

    L_K(b) = log (1/K) sum_k w_k(b),   log w_k = log p(y, eps^(k) | x) - log q(eps^(k) | x, y)

``L_1`` is the ELBO, ``L_K <= log p(y | x)`` and rises to it as ``K`` grows. The log-mean-exp is per
example, as in Pyro's ``RenyiELBO(alpha=0)``, which keeps the sites' independent plate dims (here the
``data`` plate) apart when it averages over particles (``tests/test_model.py`` pins this). Gradients:
the plain reparameterized IWAE estimator.

``truncate=True`` (default): one bound per supervision step, as the GRAM surrogate is run: each
particle carries its own state, step ``n`` weighs only its own sites (``y/n`` and the eps sites of
step ``n`` that the guide covers), the state is detached between steps, one optimizer step per
supervision step. ``truncate=False``: one bound of the whole untruncated program (every step's ``y``
and eps sites), one optimizer step per batch. Normalization as in :mod:`gram_pyro.objectives.base`:
the negative bound summed over the batch, divided by the number of supervised target tokens. Cost:
``K N_sup T`` transitions per example and batch, truncated or not.
"""

from __future__ import annotations

import torch

from gram_pyro.objectives.base import per_token
from gram_pyro.objectives.particles import LogTerms, ParticleObjective, effective_sample_size, log_mean_exp
from gram_pyro.tasks.base import Batch


class ImportanceWeighted(ParticleObjective):
    """Options as :class:`~gram_pyro.objectives.particles.ParticleObjective`: ``num_particles``,
    ``truncate`` and the head-loss weights."""

    def loss(self, model, guide, batch: Batch, state: dict, update: int) -> tuple[torch.Tensor, dict]:
        self.start(model)
        model_trace, guide_trace, steps = self.run_particles(model, guide, batch, state, update)
        log_w = LogTerms(model, guide, model_trace, guide_trace).log_weight  # [K, B]
        bound = per_token(log_mean_exp(log_w), batch.y)
        metrics = {"bound": bound, "ess": effective_sample_size(log_w.detach()).mean()}
        return self.finish(-bound, metrics, batch, [(model_trace, n) for n in steps])
