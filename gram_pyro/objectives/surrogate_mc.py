"""The truncated GRAM surrogate with a Monte Carlo KL, for guide families without an analytic KL.

For supervision step ``n`` (one optimizer step each, as :class:`~gram_pyro.objectives.TruncatedSurrogate`):

    L_n = -[ log p(y | z_T^(n)) - beta * (log q(eps_T^(n) | u, y) - log p(eps_T^(n) | u)) ] / S

with ``eps_T^(n)`` the single (reparameterized) sample the guide drew at the final transition, so
the bracket is an unbiased estimate of the analytic surrogate's. Only the final transition pays, as
there; the model runs with ``truncate=True``. There is no KL balancing: the two gradient paths of a
sampled KL do not split into "move q" and "move p" the way the analytic KL's do. Normalization as in
:mod:`gram_pyro.objectives.base`: divided by the number of supervised target tokens, summed over
``L x D``. Use it with the low-rank and flow guides; for Normal guides it estimates what the analytic
version computes. Cost: ``N_sup T`` transitions per example and batch (one particle).
"""

from __future__ import annotations

import torch

from gram_pyro.objectives.base import Judge, exact_match, per_token
from gram_pyro.objectives.particles import LogTerms, ParticleObjective
from gram_pyro.tasks.base import Batch


class TruncatedSurrogateMC(ParticleObjective):
    def __init__(self, beta: float = 1.0, halt_weight: float = 1.0, value_weight: float = 1.0,
                 judge: Judge = exact_match):
        super().__init__(1, True, halt_weight, value_weight, judge)
        if beta < 0:
            raise ValueError(f"need beta >= 0, got beta={beta}")
        self.beta = beta

    def loss(self, model, guide, batch: Batch, state: dict, update: int) -> tuple[torch.Tensor, dict]:
        self.start(model)
        if update == 0:
            state.clear()
            model.init(state, batch.x)
        model_trace, guide_trace = guide.run(model.step, state, batch.x, y=batch.y, truncate=True,
                                             puzzle=batch.puzzle)
        terms = LogTerms(model, guide, model_trace, guide_trace, transition=model.transitions - 1)
        nll, kl = -per_token(terms.log_lik, batch.y), -per_token(terms.log_ratio, batch.y)
        return self.finish(nll + self.beta * kl, {"nll": nll, "kl": kl}, batch, [(model_trace, update)])
