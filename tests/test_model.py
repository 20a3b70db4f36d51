"""The model contract: site names and shapes, one backbone pass per transition, Pyro's own inference
classes on the unchanged model and guide, determinism of the baseline, diversity of GRAM."""

import math
import warnings

import pyro
import pytest
import torch
from pyro.infer import SMCFilter, SVI, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO

from gram_pyro.objectives import TruncatedSurrogate
from gram_pyro.tasks.base import Batch
from gram_pyro.inference import sample_trajectories
from gram_pyro.guides import PriorGuide, TargetConditionedGaussian
from tests.conftest import BATCH, SEQ, VOCAB, BootstrapGuide, tiny_guide, tiny_model


def test_sites_and_shapes_of_one_step(data):
    x, y = data
    model = tiny_model(transitions=3)
    guide = tiny_guide(model)
    state = {}
    model.init(state, x)
    model_trace, guide_trace = guide.run(model.step, state, x, y=y)
    length = model.num_prefix + SEQ
    for t in range(3):
        assert model_trace.nodes[f"u/0/{t}"]["value"].shape == (BATCH, length, 8)
        assert model_trace.nodes[f"eps/0/{t}"]["fn"].event_shape == (length, 8)
    assert model_trace.nodes["y/0"]["is_observed"]
    assert model_trace.nodes["halt/0"]["value"].shape == (BATCH,)
    assert list(guide_trace.nodes) == ["eps/0/0", "eps/0/1", "eps/0/2"]


def test_leading_particle_dims_broadcast(data):
    x, y = data
    model = tiny_model()
    with pyro.plate("particles", 4, dim=-2):
        logits = model(x)
    assert logits.shape == (4, BATCH, SEQ, VOCAB)


def test_noise_on_low_adds_a_second_site_family(data):
    x, y = data
    model = tiny_model(noise_on_low=True)
    guide = tiny_guide(model)
    state = {}
    model.init(state, x)
    model_trace, guide_trace = guide.run(model.step, state, x, y=y)
    assert "eps_l/0/1" in guide_trace.nodes and "u_l/0/1" in model_trace.nodes


@pytest.mark.parametrize("shared", [True, False])
def test_one_backbone_pass_per_transition_with_the_guide_active(data, shared):
    x, y = data
    model = tiny_model(shared=shared, low_steps=3, transitions=2, n_sup=2)
    guide = tiny_guide(model)
    calls = {"low": 0, "high": 0}
    model.core.f_low.register_forward_hook(lambda *_: calls.__setitem__("low", calls["low"] + 1))
    if not shared:
        model.core.f_high.register_forward_hook(lambda *_: calls.__setitem__("high", calls["high"] + 1))
    objective = TruncatedSurrogate()
    state = {}
    for n in range(model.n_sup):
        loss, _ = objective.loss(model, guide, Batch(x, y), state, n)
        loss.backward()
    per_step = 3 * 2 + 2  # K*T + T
    assert calls["low"] + calls["high"] == per_step * model.n_sup
    if not shared:
        assert calls["high"] == 2 * model.n_sup


def test_model_and_guide_pass_pyro_validation_without_warnings(data):
    x, y = data
    model = tiny_model()
    guide = tiny_guide(model, posterior_transitions="all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trace_ELBO().differentiable_loss(model, guide, x, y)
        TraceMeanField_ELBO().differentiable_loss(model, guide, x, y)


def test_svi_with_trace_elbo_lowers_the_loss(data):
    x, y = data
    model = tiny_model()
    guide = TargetConditionedGaussian(model, posterior_transitions="all")
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    torch.manual_seed(0)
    losses = [svi.step(x, y) for _ in range(40)]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_renyi_elbo_with_the_prior_as_guide_is_the_log_mean_likelihood(data):
    """q = p: every log weight is the particle's log p(y | eps), so RenyiELBO(alpha=0) is
    -sum_b log mean_k p(y_b | eps_k) of the same draws (seed 2; 80.3587 here, 81.6239 if the mean were
    taken over the batch's summed weights), and its gradient is that expression's (float64: to 1e-10)."""
    x, y = data
    model = tiny_model().double()
    K = 4
    torch.manual_seed(2)
    elbo = RenyiELBO(alpha=0, num_particles=K, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.loss_and_grads(model, PriorGuide(model), x, y)
    torch.manual_seed(2)
    with pyro.plate("particles", K, dim=-2):
        trace, _ = PriorGuide(model).run(model.forward, x, y=y)
    log_lik = sum(site["fn"].log_prob(site["value"]) for site in trace.nodes.values()
                  if site["type"] == "sample" and site["is_observed"] and not site["infer"].get("_deterministic"))
    assert log_lik.shape == (K, BATCH)
    by_hand = -(torch.logsumexp(log_lik, 0) - math.log(K)).sum()
    assert math.isclose(loss, by_hand.item(), rel_tol=1e-10), (loss, by_hand.item())
    params = [p for p in model.parameters() if p.grad is not None]
    assert len(params) > 10  # the backbone and the noise heads; halt and value read a detached state
    for p, expected in zip(params, torch.autograd.grad(by_hand, params)):
        assert torch.allclose(p.grad, expected, rtol=1e-10, atol=1e-10)


def test_smc_filter_steps_the_model(data):
    x, y = data
    model = tiny_model()
    smc = SMCFilter(model, BootstrapGuide(), num_particles=6, max_plate_nesting=1)
    smc.init(x)
    for _ in range(3):
        smc.step(x, y)
    assert smc.state["h"].shape == (6, BATCH, model.num_prefix + SEQ, 8)
    assert torch.isfinite(smc.state._log_weights).all()


def test_deterministic_model_repeats_itself_and_gram_does_not(data):
    x, _ = data
    trm = tiny_model(noise="none")
    first, second = trm(x), trm(x)
    assert torch.equal(first, second)
    answers = sample_trajectories(trm, x, 5).answers
    assert (answers == answers[0]).all()
    gram = tiny_model(init_scale=2.0)
    logits = gram(x)
    with pyro.plate("trajectories", 2, dim=-2):
        pair = gram(x)
    assert not torch.allclose(pair[0], pair[1])
    assert not torch.allclose(logits, gram(x))


def test_prior_guide_and_deterministic_model_train_with_the_surrogate(data):
    x, y = data
    model = tiny_model(noise="none")
    loss, metrics = TruncatedSurrogate().loss(model, PriorGuide(model), Batch(x, y), {}, 0)
    assert metrics["kl"] == 0 and torch.isfinite(loss)


def test_posterior_guide_refuses_a_deterministic_model():
    with pytest.raises(ValueError, match="stochastic"):
        TargetConditionedGaussian(tiny_model(noise="none"))


def test_guide_without_target_says_so(data):
    x, _ = data
    model = tiny_model()
    with pytest.raises(ValueError, match="target"):
        TargetConditionedGaussian(model)(x)


@pytest.mark.parametrize("noise_on_low", [False, True])
def test_norm_after_noise_puts_every_perturbed_state_at_unit_rms(data, noise_on_low):
    x, y = data
    rms, traces = {}, {}
    for norm in (False, True):
        model = tiny_model(norm_after_noise=norm, noise_on_low=noise_on_low)
        torch.manual_seed(1)
        traces[norm], _ = tiny_guide(model).run(model.forward, x, y=y)
        state = {}
        model.init(state, x)
        torch.manual_seed(1)
        model.step(state, x)
        rms[norm] = torch.stack([state["h"], state["l"]]).square().mean(-1).sqrt()
    # the latent sites and their densities are those of the plain program
    assert set(traces[True].nodes) == set(traces[False].nodes)
    assert traces[True].nodes["eps/0/0"]["fn"].event_shape == traces[False].nodes["eps/0/0"]["fn"].event_shape
    assert torch.allclose(rms[True][0], torch.ones_like(rms[True][0]), atol=1e-3)
    assert (rms[False][0] - 1).abs().max() > 0.1  # u + eps alone is off the unit sphere: the check can fail
    if noise_on_low:
        assert torch.allclose(rms[True][1], torch.ones_like(rms[True][1]), atol=1e-3)


def test_norm_after_noise_must_be_a_boolean():
    with pytest.raises(ValueError, match="norm_after_noise must be true or false"):
        tiny_model(norm_after_noise="yes")


@pytest.mark.parametrize("noise", ["zero_mean", "fixed"])
def test_ablation_priors_have_zero_mean(data, noise):
    x, _ = data
    model = tiny_model(noise=noise)
    u = torch.randn(BATCH, model.num_prefix + SEQ, 8)
    prior = model.prior("eps", u)
    assert torch.equal(prior.base_dist.loc, torch.zeros_like(u))


def test_puzzle_identifiers_select_a_learned_prefix(data):
    x, _ = data
    model = tiny_model(noise="none", num_puzzles=3)
    with pytest.raises(ValueError, match="pass puzzle"):
        model(x)
    with torch.no_grad():
        model.encoder.puzzle_embed.weight.normal_()
    same = model(x, puzzle=torch.zeros(len(x), dtype=torch.long))
    other = model(x, puzzle=torch.ones(len(x), dtype=torch.long))
    assert torch.equal(same, model(x, puzzle=torch.zeros(len(x), dtype=torch.long)))
    assert not torch.allclose(same, other)
