"""Pyro's own ELBO estimators, ``Trace_ELBO`` and ``TraceMeanField_ELBO``, unchanged, on the
untruncated whole program (every supervision step observes ``y``):

    loss = [ -sum_n log p(y | z_T^(n)) + sum_{n,t} (log q - log p)(eps_t^(n)) ] / S

averaged over ``K = num_particles`` (vectorized) draws of the guide (the ``log q - log p`` terms are zero
at the transitions where the guide is the prior), ``S`` the number of supervised target tokens, plus the
head losses of :mod:`gram_pyro.objectives.base` averaged over the supervision steps. One optimizer step
per batch. Cost: ``K N_sup T`` transitions per example and batch.
"""

from __future__ import annotations

import pyro.infer
import torch

from gram_pyro.objectives.base import Judge, Objective, exact_match, head_losses
from gram_pyro.tasks.base import IGNORE, Batch
from gram_pyro.models.recursive import MAX_PLATE_NESTING

ELBOS = {"Trace_ELBO": pyro.infer.Trace_ELBO, "TraceMeanField_ELBO": pyro.infer.TraceMeanField_ELBO}


class PyroELBO(Objective):
    """Pyro's own ELBO estimators, unchanged, on the whole untruncated program (module docstring)."""

    def __init__(self, elbo: str = "Trace_ELBO", num_particles: int = 1, halt_weight: float = 1.0,
                 value_weight: float = 1.0, judge: Judge = exact_match):
        if elbo not in ELBOS:
            raise ValueError(f"unknown elbo {elbo!r}; allowed: {', '.join(ELBOS)}")
        self.num_particles = num_particles
        self.elbo = ELBOS[elbo](num_particles=num_particles, vectorize_particles=num_particles > 1,
                                max_plate_nesting=MAX_PLATE_NESTING)
        self.halt_weight, self.value_weight, self.judge = halt_weight, value_weight, judge

    def updates_per_batch(self, model) -> int:
        return 1

    def cost(self, model) -> int:
        return self.num_particles * model.n_sup * model.transitions

    def loss(self, model, guide, batch: Batch, state: dict, update: int) -> tuple[torch.Tensor, dict]:
        negative_elbo = self.elbo.differentiable_loss(model, guide, batch.x, y=batch.y, puzzle=batch.puzzle)
        negative_elbo = negative_elbo / (batch.y != IGNORE).sum().clamp(min=1)
        model_trace, _ = guide.get_traces()  # the run the ELBO just made (particles as a leading dim)
        halt = value = torch.zeros(())
        for n in range(model.n_sup):
            step_halt, step_value, correct = head_losses(model_trace, batch.x, batch.y, n, self.judge)
            halt, value = halt + step_halt / model.n_sup, value + step_value / model.n_sup
        loss = negative_elbo + self.halt_weight * halt + self.value_weight * value
        return loss, {"loss": loss, "neg_elbo": negative_elbo, "halt": halt, "value": value, "acc": correct.mean()}
