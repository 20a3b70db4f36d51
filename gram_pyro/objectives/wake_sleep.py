"""Reweighted wake-sleep (RWS) with ``K`` vectorized particles and per-example normalized weights.

Wake: ``eps^(k) ~ q`` drawn *without* a reparameterized path (:class:`DetachedSamples`), weights
``log w_k = log p(y, eps^(k) | x) - log q(eps^(k) | x, y)`` and, per example,
``wn_k = softmax_k(log w_k)`` (treated as constants).

- wake-theta: ``-sum_k wn_k log p_theta(y, eps^(k) | x)``: the self-normalized importance estimate of
  ``-grad log p(y | x)``; the log joint covers every eps site (also those drawn from the prior).
- wake-phi: ``-sum_k wn_k log q_phi(eps^(k) | u, y)``: fits q to the posterior (inclusive KL).
- sleep-phi: ``eps ~ p_theta``, ``y' ~ p_theta(y | z_T^(N))`` (the final step's likelihood read as the
  generative model of one target), then ``-log q_phi(eps | u, y')``.

The phi terms evaluate q with ``u``, ``eps`` and the prior detached
(:func:`~gram_pyro.objectives.particles.refit_log_prob`), so their gradient reaches only the guide and
the theta term's only the model, although q is amortized through the model's ``u``. Loss per batch:
``wake-theta + insomnia * wake-phi + (1 - insomnia) * sleep-phi`` (``insomnia`` as Pyro's
``ReweightedWakeSleep``; 1 = wake-phi only), normalized as in :mod:`gram_pyro.objectives.base`.

``truncate=True``: per supervision step, particles carrying their own states (as the truncated IWAE);
sleep-phi then runs one whole prior program at the batch's first update. ``truncate=False``: the whole
untruncated program, one optimizer step per batch. The weights need q's density of its own samples:
for an autoregressive flow that is one pass, for the phi terms (recomputed on detached values) ``D``.
Cost: ``K N_sup T`` transitions per example and batch for the wake particles, ``2 K N_sup T`` with
``insomnia < 1`` (sleep-phi runs ``K`` whole prior programs).
"""

from __future__ import annotations

import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger

from gram_pyro.objectives.base import Judge, exact_match, per_token
from gram_pyro.objectives.particles import (LogTerms, ParticleObjective, effective_sample_size, fraction, log_mean_exp,
                                             particle_plate, refit_log_prob, transitions_per_example)
from gram_pyro.tasks.base import IGNORE, Batch


class DetachedSamples(Messenger):
    """Latent sites are drawn with ``fn.sample()`` (no reparameterized path). Enter it outside the
    particle plate and the guide, so it samples the posterior the guide chose, broadcast by the plate."""

    def _pyro_sample(self, msg) -> None:
        if not msg["is_observed"] and msg["value"] is None:
            msg["value"] = msg["fn"].sample()


class ReweightedWakeSleep(ParticleObjective):
    def __init__(self, num_particles: int = 8, insomnia: float = 1.0, truncate: bool = True,
                 halt_weight: float = 1.0, value_weight: float = 1.0, judge: Judge = exact_match):
        super().__init__(num_particles, truncate, halt_weight, value_weight, judge)
        self.insomnia = fraction("insomnia", insomnia)

    def cost(self, model) -> int:
        """``K N_sup T``, twice that with sleep-phi (``insomnia < 1``)."""
        return (2 if self.insomnia < 1 else 1) * super().cost(model)

    def loss(self, model, guide, batch: Batch, state: dict, update: int) -> tuple[torch.Tensor, dict]:
        self.start(model)
        sleep_phi, sleep_transitions = torch.zeros(()), 0
        if self.insomnia < 1 and update == 0:
            sleep_phi, sleep_transitions = self.sleep_phi(model, guide, batch)
        with DetachedSamples():
            model_trace, guide_trace, steps = self.run_particles(model, guide, batch, state, update)
        terms = LogTerms(model, guide, model_trace, guide_trace)
        log_w = terms.log_weight.detach()
        weights = log_w.softmax(0)
        wake_theta = -per_token((weights * terms.log_joint).sum(0), batch.y)
        wake_phi = -per_token((weights * refit_log_prob(guide, model_trace, batch.y)).sum(0), batch.y)
        loss = wake_theta + self.insomnia * wake_phi + (1 - self.insomnia) * sleep_phi
        metrics = {"wake_theta": wake_theta, "wake_phi": wake_phi, "sleep_phi": sleep_phi,
                   "bound": per_token(log_mean_exp(log_w), batch.y), "ess": effective_sample_size(log_w).mean()}
        return self.finish(loss, metrics, batch, [(model_trace, n) for n in steps], sleep_transitions)

    def sleep_phi(self, model, guide, batch: Batch) -> tuple[torch.Tensor, int]:
        """``-log q(eps | u, y')`` on prior programs with sampled targets (per token), and their cost."""
        with torch.no_grad(), poutine.trace() as tracer, poutine.uncondition(), particle_plate(self.num_particles):
            model.forward(batch.x, y=batch.y, puzzle=batch.puzzle)
        trace = tracer.trace
        dreamt = trace.nodes[f"y/{model.n_sup - 1}"]["value"]
        dreamt = torch.where(batch.y == IGNORE, batch.y, dreamt)  # keep the unsupervised positions unsupervised
        loss = -per_token(refit_log_prob(guide, trace, dreamt), batch.y)
        return loss, transitions_per_example(trace, batch.x.shape[0])
