"""Conditional normalizing-flow posterior, built from ``pyro.distributions.transforms``.

    eps = mu_p(u) + sigma_p(u) * f_depth(... f_1(xi; a) ...; a),   xi ~ N(0, I_D) per position,
    a = [u ; E(y)]  (:mod:`gram_pyro.guides.context`)

``f_j`` are conditional affine transforms over the ``D`` hidden units of a position with context
``a`` of that position: ``coupling`` (:func:`~pyro.distributions.transforms.conditional_affine_coupling`,
one pass both ways; a reversal of the units between layers so every unit is transformed) or
``autoregressive`` (:func:`~pyro.distributions.transforms.conditional_affine_autoregressive`: sampling
and the density of its own samples take one pass, the density of any other value ``D`` passes). The
last layer of every hypernetwork starts at zero, so each ``f_j`` starts as the identity and q as the
prior. Event dims ``[L, D]`` (``.to_event(1)`` over ``L``); needs ``D >= 2``. No analytic KL: train it
with :class:`gram_pyro.objectives.TruncatedSurrogateMC` or a particle scheme.
"""

from __future__ import annotations

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import nn

from gram_pyro.guides.context import ContextGuide, prior_normal

FLOW_KINDS = ("coupling", "autoregressive")


class ConditionalFlow(ContextGuide):
    analytic_kl = False

    def __init__(self, model: nn.Module, kind: str = "coupling", depth: int = 2, hidden: int | None = None,
                 posterior_transitions: str = "last", posterior_steps: int | None = None):
        super().__init__(model, posterior_transitions, posterior_steps)
        if kind not in FLOW_KINDS:
            raise ValueError(f"unknown flow kind {kind!r}; allowed: {', '.join(FLOW_KINDS)}")
        if depth < 1 or model.dim < 2:
            raise ValueError(f"a flow needs depth >= 1 and a hidden size >= 2, got depth={depth}, dim={model.dim}")
        make = T.conditional_affine_coupling if kind == "coupling" else T.conditional_affine_autoregressive
        dim, hidden_dims = model.dim, [self.hidden_width(hidden)]
        self.flows = nn.ModuleDict(
            {site: nn.ModuleList(make(dim, 2 * dim, hidden_dims=hidden_dims) for _ in range(depth))
             for site in model.noise_sites}
        )
        for layers in self.flows.values():
            for layer in layers:
                hypernet_out = layer.nn.layers[-1]
                nn.init.zeros_(hypernet_out.weight)
                nn.init.zeros_(hypernet_out.bias)
        self.register_buffer("reversal", torch.arange(dim - 1, -1, -1), persistent=False)

    def posterior(self, kind: str, u: torch.Tensor, y: torch.Tensor, prior) -> dist.Distribution:
        p, context = prior_normal(prior), self.context(u, y)
        transforms, reverse = [], T.Permute(self.reversal)
        for layer in self.flows[kind]:
            transforms += [layer.condition(context), reverse]
        transforms.append(T.AffineTransform(p.loc, p.scale, event_dim=1, cache_size=1))
        base = dist.Normal(torch.zeros_like(p.loc), torch.ones_like(p.loc)).to_event(1)
        return dist.TransformedDistribution(base, transforms).to_event(1)
