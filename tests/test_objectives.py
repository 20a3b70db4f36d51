"""The objectives' values and gradients against hand computations in plain torch."""

import math

import pytest
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO

from gram_pyro.objectives import Batch, TruncatedSurrogate, exact_match
from tests.conftest import tiny_guide, tiny_model


def gaussian_kl(mq, sq, mp, sp):
    """KL(N(mq, sq^2) || N(mp, sp^2)) elementwise, written out."""
    return torch.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5


def gaussian_log_prob(v, m, s):
    return -0.5 * ((v - m) / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)


def hand_step(model, guide, x, y, h, l, detach_early: bool, posterior_everywhere: bool):
    """One supervision step in plain torch. Returns (logits, h, log_p_eps, log_q_eps, kl_last)."""
    e_x = model.encoder(x)
    log_p = log_q = 0.0
    for t in range(model.transitions):
        early = t < model.transitions - 1
        with torch.no_grad() if (early and detach_early) else torch.enable_grad():
            l = model.core.refine_low(l, h, e_x)
            u = model.core.f_high(h, l)
            mp, sp = model.noise_heads["eps"](u)
            if early and not posterior_everywhere:
                eps = torch.distributions.Normal(mp, sp).rsample()
            else:
                mq, sq = guide.heads["eps"](u + guide.embed_target(y))
                eps = torch.distributions.Normal(mq, sq).rsample()
                log_q = log_q + gaussian_log_prob(eps, mq, sq).sum((-1, -2))
                log_p = log_p + gaussian_log_prob(eps, mp, sp).sum((-1, -2))
            h = u + eps
    a = 0.8  # KL balancing: a KL(sg(q) || p) + (1 - a) KL(q || sg(p))
    kl_last = (a * gaussian_kl(mq.detach(), sq.detach(), mp, sp)
               + (1 - a) * gaussian_kl(mq, sq, mp.detach(), sp.detach())).sum((-1, -2))
    return model.decoder(h), h, l, log_p, log_q, kl_last


def hand_surrogate(model, guide, x, y, beta, detach_early=True):
    h, l = model.h0.expand(x.shape[0], -1, -1), model.l0.expand(x.shape[0], -1, -1)
    losses = []
    for _ in range(model.n_sup):
        logits, h, l, _, _, kl = hand_step(model, guide, x, y, h, l, detach_early, posterior_everywhere=False)
        log_lik = torch.log_softmax(logits, -1).gather(-1, y[..., None]).squeeze(-1).sum(-1)
        correct = exact_match(x, logits.argmax(-1), y).float()
        halt = F.binary_cross_entropy_with_logits(model.halt_head(h.detach()), correct)
        value = (model.value_head(h.detach()).sigmoid() - correct).square().mean()
        tokens = y.shape[-1]
        losses.append(-log_lik.mean() / tokens + beta * kl.mean() / tokens + halt + value)
        h, l = h.detach(), l.detach()
    return losses


def test_truncated_surrogate_matches_hand_computation(data):
    x, y = data
    model = tiny_model()
    guide = tiny_guide(model)
    objective = TruncatedSurrogate(beta=0.3)
    torch.manual_seed(7)
    state = {}
    pyro_losses = [objective.loss(model, guide, Batch(x, y), state, n)[0] for n in range(model.n_sup)]
    torch.manual_seed(7)
    hand = hand_surrogate(model, guide, x, y, beta=0.3)
    for ours, expected in zip(pyro_losses, hand):
        assert torch.allclose(ours, expected, atol=1e-5, rtol=0), (ours, expected)


def test_kl_balancing_keeps_value_and_splits_gradient(data):
    x, y = data
    losses = {}
    for balance in (0.0, 0.8, 1.0):
        model = tiny_model()
        guide = tiny_guide(model)
        torch.manual_seed(3)
        loss, metrics = TruncatedSurrogate(beta=1.0, kl_balance=balance).loss(model, guide, Batch(x, y), {}, 0)
        loss.backward()
        losses[balance] = (metrics["kl"].item(), next(guide.heads.parameters()).grad.norm().item(),
                           model.noise_heads["eps"].loc.down.weight.grad.norm().item())
    kl_values = [v[0] for v in losses.values()]
    assert max(kl_values) - min(kl_values) < 1e-6  # the value is KL(q || p) whatever the balance
    # balance 1: KL(sg(q) || p) -> the posterior receives gradient only from the likelihood, and the
    # prior's mean receives the full KL gradient; balance 0: the other way round.
    assert losses[1.0][2] > losses[0.0][2]


def test_gradient_flows_only_through_the_final_transition(data):
    x, y = data
    model = tiny_model()
    guide = tiny_guide(model)
    torch.manual_seed(11)
    loss, _ = TruncatedSurrogate(beta=0.5).loss(model, guide, Batch(x, y), {}, 0)
    ours = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    def hand_grads(detach_early):
        torch.manual_seed(11)
        hand = hand_surrogate(model, guide, x, y, beta=0.5, detach_early=detach_early)[0]
        return torch.autograd.grad(hand, list(model.parameters()), allow_unused=True)

    truncated, full = hand_grads(True), hand_grads(False)
    for g_ours, g_trunc in zip(ours, truncated):
        if g_trunc is None:
            assert g_ours is None or torch.count_nonzero(g_ours) == 0
        else:
            assert torch.allclose(g_ours, g_trunc, atol=1e-6)
    differs = any(a is not None and b is not None and not torch.allclose(a, b, atol=1e-6)
                  for a, b in zip(truncated, full))
    assert differs, "the untruncated gradient should differ: the check could not fail otherwise"


def test_trace_elbo_equals_log_p_minus_log_q_by_hand(data):
    x, y = data
    model = tiny_model(n_sup=2)
    guide = tiny_guide(model, posterior_transitions="all")
    torch.manual_seed(5)
    loss = Trace_ELBO().differentiable_loss(model, guide, x, y)
    torch.manual_seed(5)
    h, l = model.h0.expand(x.shape[0], -1, -1), model.l0.expand(x.shape[0], -1, -1)
    elbo = 0.0
    for _ in range(model.n_sup):
        logits, h, l, log_p, log_q, _ = hand_step(model, guide, x, y, h, l, False, posterior_everywhere=True)
        log_lik = torch.log_softmax(logits, -1).gather(-1, y[..., None]).squeeze(-1).sum(-1)
        elbo = elbo + (log_lik + log_p - log_q).sum()
    assert torch.allclose(loss, -elbo, atol=1e-4, rtol=1e-6), (loss, -elbo)


def test_surrogate_rejects_bad_beta():
    with pytest.raises(ValueError, match="beta"):
        TruncatedSurrogate(beta=-1.0)
