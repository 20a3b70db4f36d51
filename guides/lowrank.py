"""Low-rank-plus-diagonal Gaussian posterior over the hidden dimension.

    q(eps_i | u, y) = N(mu_p + d_mu,  diag((sigma_p exp(d_s))^2) + V V^T)   per position i

with ``(d_mu, d_s, V) = Correction(a)``, ``a = [u ; E(y)]`` (:mod:`guides.context`) and
``V [..., L, D, rank]``: correlations between the ``D`` hidden units of a position, positions
independent given ``(u, y)``. ``pyro.distributions.LowRankMultivariateNormal`` over ``D`` (event dim
1), ``.to_event(1)`` over ``L``: event dims ``[L, D]``. The mean and diagonal start at the prior; the
factor's read-out starts small and random (``factor_init``), not zero, because ``V = 0`` is a
stationary point of the density in ``V``. There is no analytic KL to the prior (a Normal): train it
with :class:`gram_pyro.posteriors.TruncatedSurrogateMC` or a particle scheme.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from guides.context import ContextGuide, Correction, prior_normal


class LowRankGaussian(ContextGuide):
    analytic_kl = False

    def __init__(self, model: nn.Module, rank: int = 4, hidden: int | None = None, factor_init: float = 1e-2,
                 posterior_transitions: str = "last"):
        super().__init__(model, posterior_transitions)
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.rank, dim = rank, model.dim
        self.corrections = nn.ModuleDict(
            {kind: Correction(dim, self.hidden_width(hidden), 2 * dim + dim * rank) for kind in model.noise_sites}
        )
        for correction in self.corrections.values():
            nn.init.normal_(correction.linear.weight[2 * dim:], std=factor_init / (2 * dim) ** 0.5)

    def posterior(self, kind: str, u: torch.Tensor, y: torch.Tensor, prior) -> dist.Distribution:
        p, dim = prior_normal(prior), u.shape[-1]
        correction = self.corrections[kind](self.context(u, y))
        shift, log_ratio, factor = correction.split([dim, dim, dim * self.rank], dim=-1)
        scale = p.scale * log_ratio.exp()
        return dist.LowRankMultivariateNormal(p.loc + shift, factor.unflatten(-1, (dim, self.rank)),
                                              scale.square()).to_event(1)
