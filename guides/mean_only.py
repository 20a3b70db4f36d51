"""Mean-only posterior (the paper's failing ablation): a learned mean, a fixed tiny scale.

    q(eps | u, y) = N(mu_q(a), s^2 I),   a = [u ; E(y)],   s = 1e-3 by default

``mu_q = Correction(a)`` (:mod:`gram_pyro.guides.context`), zero at initialisation. Nearly deterministic
guidance that sees the target: the paper reports 0% with it (docs/paper.md, "Reference figures": "mean-only
guidance"), since eps can carry the answer at a KL cost that the learned prior scale can make small
relative to the likelihood. Event dims ``[L, D]``; a Normal, so the analytic KL applies.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from gram_pyro.guides.context import ContextGuide, Correction


class MeanOnlyGaussian(ContextGuide):
    def __init__(self, model: nn.Module, scale: float = 1e-3, hidden: int | None = None,
                 posterior_transitions: str = "last", posterior_steps: int | None = None):
        super().__init__(model, posterior_transitions, posterior_steps)
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = scale
        self.means = nn.ModuleDict(
            {kind: Correction(model.dim, self.hidden_width(hidden), model.dim) for kind in model.noise_sites}
        )

    def posterior(self, kind: str, u: torch.Tensor, y: torch.Tensor, prior) -> dist.Distribution:
        loc = self.means[kind](self.context(u, y))
        return dist.Normal(loc, torch.full_like(loc, self.scale)).to_event(2)
