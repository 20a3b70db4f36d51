"""Residual Gaussian posterior: a learned correction of the prior's mean and log-scale.

    q(eps | u, y) = N(mu_p(u) + d_mu(a), sigma_p(u) * exp(d_s(a))),   a = [u ; E(y)]

``(d_mu, d_s) = Correction(a)`` (:mod:`gram_pyro.guides.context`), zero at initialisation, so q starts equal to
the prior and KL(q || p) = sum (d_mu^2 / sigma_p^2 + exp(2 d_s) - 1 - 2 d_s) / 2 depends on the prior
only through ``sigma_p`` (the residual form of NVAE). The prior's parameters are not detached: q moves
with the prior and the correction learns what the target adds. Event dims ``[L, D]``; a Normal, so
the analytic (balanced) KL of :class:`gram_pyro.objectives.TruncatedSurrogate` applies.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from gram_pyro.guides.context import ContextGuide, Correction, prior_normal


class ResidualGaussian(ContextGuide):
    def __init__(self, model: nn.Module, hidden: int | None = None, posterior_transitions: str = "last", posterior_steps: int | None = None):
        super().__init__(model, posterior_transitions, posterior_steps)
        self.corrections = nn.ModuleDict(
            {kind: Correction(model.dim, self.hidden_width(hidden), 2 * model.dim) for kind in model.noise_sites}
        )

    def posterior(self, kind: str, u: torch.Tensor, y: torch.Tensor, prior) -> dist.Distribution:
        p = prior_normal(prior)
        shift, log_ratio = self.corrections[kind](self.context(u, y)).chunk(2, dim=-1)
        return dist.Normal(p.loc + shift, p.scale * log_ratio.exp()).to_event(2)
