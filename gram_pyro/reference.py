"""Plain-torch computations of what the Pyro program computes, on the same modules (no Pyro).

They are the oracle for tests (the objectives' values and gradients) and the baseline of
``benchmarks/step_overhead.py`` (Pyro's overhead is measured against them). Equations as in
``gram_pyro.objectives``; the Gaussian densities and KL are written out, not taken from a library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gram_pyro.nn import rms_norm


def gaussian_kl(mq, sq, mp, sp):
    """KL(N(mq, sq^2) || N(mp, sp^2)), elementwise."""
    return torch.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5


def gaussian_log_prob(v, m, s):
    return -0.5 * ((v - m) / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)


@dataclass
class StepResult:
    logits: torch.Tensor  # [B, S, V]
    h: torch.Tensor
    l: torch.Tensor
    log_p: torch.Tensor   # [B] sum of log p(eps) over the sites drawn from the posterior
    log_q: torch.Tensor   # [B] sum of log q(eps) over the same sites
    kl_last: torch.Tensor  # [B] balanced KL of the final transition
    u: torch.Tensor        # [B, L, D] the final transition's proposal
    loc_q: torch.Tensor    # [B, L, D] its posterior's mean and scale
    scale_q: torch.Tensor


def supervision_step(model, guide, x, y, h, l, truncate: bool, posterior_everywhere: bool,
                     kl_balance: float = 0.8) -> StepResult:
    """One supervision step of a model with learned noise on h; ``posterior_everywhere=False`` draws the
    earlier transitions from the prior (``posterior_transitions='last'``)."""
    e_x = model.encoder(x)
    log_p = log_q = torch.zeros(())
    for t in range(model.transitions):
        early = t < model.transitions - 1
        with torch.no_grad() if (early and truncate) else torch.enable_grad():
            l = model.core.refine_low(l, h, e_x)
            u = model.core.propose_high(h, l)
            mp, sp = model.noise_heads["eps"](u)
            if early and not posterior_everywhere:
                eps = torch.distributions.Normal(mp, sp).rsample()
            else:
                mq, sq = guide.heads["eps"](u + guide.target_encoder(y.clamp(min=0)))
                eps = torch.distributions.Normal(mq, sq).rsample()
                log_q = log_q + gaussian_log_prob(eps, mq, sq).sum((-1, -2))
                log_p = log_p + gaussian_log_prob(eps, mp, sp).sum((-1, -2))
            h = rms_norm(u + eps) if model.norm_after_noise else u + eps
    a = kl_balance
    kl_last = (a * gaussian_kl(mq.detach(), sq.detach(), mp, sp)
               + (1 - a) * gaussian_kl(mq, sq, mp.detach(), sp.detach())).sum((-1, -2))
    return StepResult(model.decoder(h), h, l, log_p, log_q, kl_last, u, mq, sq)


def token_log_likelihood(logits, y):
    """log p(y | logits) summed over the supervised tokens (``y >= 0``): ``[B]``."""
    log_p = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    return (log_p * (y >= 0)).sum(-1)


def surrogate_loss(model, step: StepResult, x, y, beta: float) -> torch.Tensor:
    """The truncated GRAM loss of one step (exact-match judge), per target token."""
    correct = ((step.logits.argmax(-1) == y) | (y < 0)).all(-1).float()
    halt = F.binary_cross_entropy_with_logits(model.halt_head(step.h.detach()), correct)
    value = (model.value_head(step.h.detach()).sigmoid() - correct).square().mean()
    tokens = (y >= 0).sum()
    return (-token_log_likelihood(step.logits, y).sum() + beta * step.kl_last.sum()) / tokens + halt + value
