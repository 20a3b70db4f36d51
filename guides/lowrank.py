"""Low-rank-plus-diagonal Gaussian posterior over the hidden dimension.

    q(eps_i | u, y) = N(mu_p + d_mu,  diag((sigma_p exp(d_s))^2) + V V^T)   per position i

with ``(d_mu, d_s, V) = Correction(a)``, ``a = [u ; E(y)]`` (:mod:`gram_pyro.guides.context`) and
``V [..., L, D, rank]``: correlations between the ``D`` hidden units of a position, positions
independent given ``(u, y)``. ``pyro.distributions.LowRankMultivariateNormal`` over ``D`` (event dim
1), ``.to_event(1)`` over ``L``: event dims ``[L, D]``. The mean and diagonal start at the prior; the
factor's read-out starts small and random (``factor_init``), not zero, because ``V = 0`` is a
stationary point of the density in ``V``. There is no analytic KL to the prior (a Normal): train it
with :class:`gram_pyro.objectives.TruncatedSurrogateMC` or a particle scheme.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from gram_pyro.guides.context import ContextGuide, Correction, prior_normal


class LowRankGaussian(ContextGuide):
    analytic_kl = False

    def __init__(self, model: nn.Module, rank: int = 4, hidden: int | None = None, factor_init: float = 1e-2,
                 posterior_transitions: str = "last", posterior_steps: int | None = None):
        super().__init__(model, posterior_transitions, posterior_steps)
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
        return FullPrecisionLowRankNormal(p.loc + shift, factor.unflatten(-1, (dim, self.rank)),
                                          scale.square()).to_event(1)


class FullPrecisionLowRankNormal(dist.LowRankMultivariateNormal):
    """``LowRankMultivariateNormal`` built, sampled and scored in float32 with autocast off, also inside
    bf16 autocast (CUDA training): it factorises the ``rank x rank`` capacitance matrix, CUDA's Cholesky
    has no bf16 kernel, and bf16 would be too coarse for the log-determinant anyway."""

    def __init__(self, loc, cov_factor, cov_diag, validate_args=None):
        with full_precision(loc):
            super().__init__(loc.float(), cov_factor.float(), cov_diag.float(), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(FullPrecisionLowRankNormal, _instance)
        return super().expand(batch_shape, _instance=new)

    def rsample(self, sample_shape=torch.Size()):
        with full_precision(self.loc):
            return super().rsample(sample_shape)

    def log_prob(self, value):
        with full_precision(self.loc):
            return super().log_prob(value.float())


def full_precision(tensor: torch.Tensor):
    """Autocast off on ``tensor``'s device for the block."""
    return torch.autocast(tensor.device.type, enabled=False)
