"""The paper's posterior: a diagonal Gaussian on the proposal and an embedding of the target.

    q(eps_t | u_t, y) = N(mu_phi(a_t), sigma_phi(a_t)^2 I),   a_t = u_t + [0_P ; E_phi(y)]

``E_phi(y)`` is a learned token embedding of the target ``y [..., B, S]`` (scaled by sqrt(D), as the
input's) placed on the ``S`` board positions of ``u [..., B, P + S, D]`` (zero on the ``P`` prefix
positions; ``IGNORE`` target positions are embedded as the pad token 0), so each position of the posterior sees its own target token and, through ``u``,
everything the recursion has computed. The paper does not say how ``y`` enters; this is the choice
of public reimplementations (docs/paper.md, "The model"). ``mu_phi`` and ``sigma_phi`` are one SwiGLU each, starting at mean 0 and scale
``init_scale`` (equal to the prior at initialisation when the prior's ``init_scale`` is the same, so
the KL starts at zero).

``target_dropout`` is a bottleneck on what the posterior sees of ``y``: in training, each target token
is hidden (embedded as the pad token) with that probability, independently per call.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from gram_pyro.nn import GaussianHead, TokenEncoder
from gram_pyro.guides.base import EpsGuide


class TargetConditionedGaussian(EpsGuide):
    def __init__(self, model: nn.Module, hidden: int | None = None, init_scale: float = 1.0,
                 posterior_transitions: str = "last", posterior_steps: int | None = None,
                 target_dropout: float = 0.0):
        super().__init__(model, posterior_transitions, posterior_steps)
        if not 0 <= target_dropout < 1:
            raise ValueError(f"target_dropout must be in [0, 1), got {target_dropout}")
        self.target_dropout = target_dropout
        if not model.stochastic:
            raise ValueError("a posterior guide needs a stochastic model (noise != 'none'); use guide=prior")
        # E(y): the target's tokens embedded like the input's, after a zero prefix: [..., B, P + S, D]
        self.target_encoder = TokenEncoder(model.vocab_size, model.dim, model.num_prefix)
        self.heads = nn.ModuleDict(
            {kind: GaussianHead(model.dim, self.hidden_width(hidden), init_scale) for kind in model.noise_sites}
        )

    def posterior(self, kind: str, u: torch.Tensor, y: torch.Tensor, prior) -> dist.Distribution:
        y = y.clamp(min=0)
        if self.training and self.target_dropout:
            y = y.masked_fill(torch.rand(y.shape, device=y.device) < self.target_dropout, 0)
        loc, scale = self.heads[kind](u + self.target_encoder(y))
        return dist.Normal(loc, scale).to_event(2)
