"""What the guide families condition on, and the zero-initialised correction network they share.

Context of an eps site: ``a = [u ; E(y)]`` concatenated on the hidden axis, ``[..., B, L, 2D]``.
``E(y)`` embeds the target position by position:

- token targets ``y [..., B, S]`` (the recursive model): a learned token embedding scaled by sqrt(D)
  after ``P`` zero prefix positions (:class:`gram_pyro.nn.TokenEncoder`; ``IGNORE`` is embedded as the
  pad token 0), as the paper's guide does;
- real-valued targets ``y [..., B, L, D_y]`` (models with a ``target_dim`` attribute, the
  linear-Gaussian toy): a linear map ``D_y -> D``.

:class:`Correction` maps ``a`` to ``out`` numbers per position as ``Linear(a) + SwiGLU(a)``, both
starting at zero output, so a family built on it starts at the prior (KL = 0). The linear path is the
exact form of the correction for a linear-Gaussian model; the SwiGLU adds the nonlinear part.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from gram_pyro.nn import SwiGLU, TokenEncoder
from gram_pyro.guides.base import EpsGuide


class TargetContext(nn.Module):
    """``(u [..., B, L, D], y) -> [u ; E(y)]`` of shape ``[..., B, L, 2D]`` (dims broadcast)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        target_dim = getattr(model, "target_dim", None)
        self.tokens = target_dim is None
        self.embed = (TokenEncoder(model.vocab_size, model.dim, model.num_prefix) if self.tokens
                      else nn.Linear(target_dim, model.dim))

    def forward(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = self.embed(y.clamp(min=0)) if self.tokens else self.embed(y)
        return torch.cat(torch.broadcast_tensors(u, target.to(u.dtype)), dim=-1)


class Correction(nn.Module):
    """``[..., 2D] -> [..., out]``: ``Linear(a) + SwiGLU(a)``, zero at initialisation."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.linear = nn.Linear(2 * dim, out)
        self.mlp = SwiGLU(2 * dim, hidden, out)
        for weight in (self.linear.weight, self.linear.bias, self.mlp.down.weight):
            nn.init.zeros_(weight)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.linear(context) + self.mlp(context)


class ContextGuide(EpsGuide):
    """Base of the families below: checks the model is stochastic and owns the context encoder."""

    def __init__(self, model: nn.Module, posterior_transitions: str = "last", posterior_steps: int | None = None):
        super().__init__(model, posterior_transitions, posterior_steps)
        if not model.stochastic:
            raise ValueError("a posterior guide needs a stochastic model (noise != 'none'); use guide=prior")
        self.context = TargetContext(model)


def prior_normal(prior) -> dist.Normal:
    """The ``Normal`` of a prior ``Normal(...).to_event(2)`` (every model here has Gaussian priors)."""
    base = prior.base_dist if isinstance(prior, dist.Independent) else prior
    if not isinstance(base, dist.Normal):
        raise TypeError(f"this guide family is built on a Normal prior, got {type(base).__name__}")
    return base
