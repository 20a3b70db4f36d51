"""The objectives' values and gradients against hand computations in plain torch."""

import pytest
import torch
from pyro.infer import Trace_ELBO

from gram_pyro.objectives import TruncatedSurrogate
from gram_pyro.tasks.base import IGNORE, Batch
from gram_pyro.reference import supervision_step, surrogate_loss, token_log_likelihood
from tests.conftest import tiny_guide, tiny_model


def hand_surrogate(model, guide, x, y, beta, truncate=True):
    """The per-step surrogate losses of a whole batch, in plain torch."""
    h, l = model.h0.expand(x.shape[0], -1, -1), model.l0.expand(x.shape[0], -1, -1)
    losses = []
    for _ in range(model.n_sup):
        step = supervision_step(model, guide, x, y, h, l, truncate, posterior_everywhere=False)
        losses.append(surrogate_loss(model, step, x, y, beta))
        h, l = step.h.detach(), step.l.detach()
    return losses


@pytest.mark.parametrize("ignored, norm_after_noise", [(0, False), (2, False), (0, True)])
def test_truncated_surrogate_matches_hand_computation(data, ignored, norm_after_noise):
    x, y = data
    y = y.clone()
    y[:, :ignored] = IGNORE  # unsupervised positions leave the likelihood and the token count
    model = tiny_model(norm_after_noise=norm_after_noise)
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
        hand = hand_surrogate(model, guide, x, y, beta=0.5, truncate=detach_early)[0]
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
        step = supervision_step(model, guide, x, y, h, l, truncate=False, posterior_everywhere=True)
        elbo = elbo + (token_log_likelihood(step.logits, y) + step.log_p - step.log_q).sum()
        h, l = step.h, step.l
    assert torch.allclose(loss, -elbo, atol=1e-4, rtol=1e-6), (loss, -elbo)


def test_surrogate_rejects_bad_beta():
    with pytest.raises(ValueError, match="beta"):
        TruncatedSurrogate(beta=-1.0)


def test_overshooting_refuses_normalized_states():
    model = tiny_model(norm_after_noise=True)
    with pytest.raises(ValueError, match="norm_after_noise"):
        TruncatedSurrogate(overshoot_weight=1.0).check(model, tiny_guide(model))
