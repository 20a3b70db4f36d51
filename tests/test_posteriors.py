"""Posterior schemes against exact answers on the linear-Gaussian toy, against Pyro's own classes and
hand computations, and on the tiny recursive model."""

import math

import pyro
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.infer import RenyiELBO, Trace_ELBO

from gram_pyro.config import build, compose_config
from gram_pyro.diagnostics.evidence import importance_log_evidence, smc_log_evidence
from gram_pyro.objectives import (ImportanceWeighted, MonteCarloEM, ReweightedWakeSleep, SequentialMonteCarlo,
                                  TruncatedSurrogate, TruncatedSurrogateMC)
from gram_pyro.objectives.base import exact_match
from gram_pyro.objectives.mcmc_em import sample_posterior, short_hmc
from gram_pyro.objectives.smc import systematic_ancestors
from gram_pyro.tasks.base import Batch
from gram_pyro.guides import PriorGuide
from gram_pyro.guides.linear_gaussian import ExactLinearGaussianPosterior
from gram_pyro.guides.residual import ResidualGaussian
from gram_pyro.models.linear_gaussian import LinearGaussianModel
from tests.conftest import tiny_guide, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def toy(replicas=1, **options):
    """A float64 toy and a batch of ``replicas`` copies of one input whose target the model generated
    (so that the prior is a usable proposal)."""
    settings_ = dict(dim=2, length=1, target_dim=2, transitions=1, n_sup=3, noise_scale=0.5, obs_scale=1.5)
    model = LinearGaussianModel(**{**settings_, **options}).double()
    torch.manual_seed(0)
    x = torch.randn(1, model.length, model.dim, dtype=torch.float64)
    with torch.no_grad():
        y = model(x) + model.log_obs_scale.exp() * torch.randn(1, model.length, model.target_dim, dtype=torch.float64)
    return model, Batch(x.expand(replicas, -1, -1), y.expand(replicas, -1, -1))


def bound_per_example(metrics, batch):
    """Per-token metrics back to nats per example (every toy target entry is supervised)."""
    return metrics["bound"].item() * batch.y[0].numel()


# the toy and its exact posterior ---------------------------------------------------------------

def test_exact_guide_weights_all_equal_the_exact_evidence():
    model, batch = toy(dim=2, length=2, transitions=2, n_sup=2, obs_scale=0.5)
    batch = Batch(torch.randn(3, 2, 2, dtype=torch.float64), torch.randn(3, 2, 2, dtype=torch.float64))
    guide = ExactLinearGaussianPosterior(model)
    estimate = importance_log_evidence(model, guide, batch, num_particles=20, chunk_size=8)
    exact = model.exact_log_evidence(batch.x, batch.y)
    assert torch.allclose(estimate.log_weights, exact.expand(20, 3), atol=1e-9, rtol=0)
    assert torch.allclose(estimate.ess, torch.full((3,), 20.0, dtype=torch.float64))


def test_exact_guide_samples_have_the_exact_posterior_moments():
    model, batch = toy(transitions=2, n_sup=2, obs_scale=0.5)
    guide = ExactLinearGaussianPosterior(model)
    with torch.no_grad(), pyro.plate("particles", 20000, dim=-2):
        model_trace, _ = guide.run(model.forward, batch.x, y=batch.y)
    sites = [f"eps/{n}/{t}" for n in range(2) for t in range(2)]
    eps = torch.cat([model_trace.nodes[s]["value"] for s in sites], -1).reshape(20000, -1)
    mean, cov = model.exact_posterior(batch.x, batch.y)
    assert torch.allclose(eps.mean(0), mean.reshape(-1), atol=4 * cov.diag().max().sqrt().item() / math.sqrt(20000))
    assert torch.allclose(eps.T.cov(), cov, atol=0.02)


# importance weighting --------------------------------------------------------------------------

def test_iwae_bound_stays_below_the_evidence_and_rises_to_it_with_particles():
    model, batch = toy(replicas=200)
    exact = model.exact_log_evidence(batch.x[:1], batch.y[:1]).item()
    bounds = []
    for particles in (1, 4, 32, 256):
        torch.manual_seed(1)
        with torch.no_grad():
            _, metrics = ImportanceWeighted(particles, truncate=False).loss(model, PriorGuide(model), batch, {}, 0)
        bounds.append(bound_per_example(metrics, batch))
    assert bounds == sorted(bounds) and bounds[0] < bounds[-1] - 1.0, bounds
    assert exact - 0.1 < bounds[-1] < exact + 0.05, (bounds, exact)


def test_iwae_equals_pyro_renyi_elbo_for_one_example():
    model, batch = toy()
    guide = ResidualGaussian(model, hidden=4).double()
    torch.manual_seed(3)
    _, metrics = ImportanceWeighted(6, truncate=False).loss(model, guide, batch, {}, 0)
    torch.manual_seed(3)
    renyi = RenyiELBO(alpha=0, num_particles=6, vectorize_particles=True, max_plate_nesting=1)
    assert math.isclose(bound_per_example(metrics, batch), -renyi.loss(model, guide, batch.x, batch.y), rel_tol=1e-9)


def test_iwae_gradient_under_the_exact_posterior_is_the_evidence_gradient():
    """With q the exact posterior every reparameterized weight equals p(y | x), so even one particle
    gives the exact gradient of log p(y | x) in the model's parameters."""
    model, batch = toy(replicas=2, transitions=2, n_sup=2)
    loss, _ = ImportanceWeighted(1, truncate=False).loss(model, ExactLinearGaussianPosterior(model), batch, {}, 0)
    ours = torch.autograd.grad(loss, list(model.parameters()))
    exact = torch.autograd.grad(-model.exact_log_evidence(batch.x, batch.y).sum() / batch.y.numel(),
                                list(model.parameters()))
    for a, b in zip(ours, exact):
        assert torch.allclose(a, b, atol=1e-8)


def test_truncated_iwae_with_one_particle_is_the_monte_carlo_surrogate(data):
    """K = 1 and beta = 1: the step's importance weight is the step's single-sample ELBO."""
    x, y = data
    model = tiny_model()
    guide = tiny_guide(model)

    def step_losses(objective):
        state, losses = {}, []
        for n in range(model.n_sup):
            torch.manual_seed(n)
            losses.append(objective.loss(model, guide, Batch(x, y), state, n)[0])
        return torch.stack(losses)

    ours, expected = step_losses(ImportanceWeighted(1)), step_losses(TruncatedSurrogateMC(beta=1.0))
    assert torch.allclose(ours, expected, atol=1e-5), (ours, expected)


def test_monte_carlo_kl_averages_to_the_analytic_kl(data):
    """One transition per step, so the proposal u is the same in every draw and only eps varies."""
    x, y = data
    model = tiny_model(transitions=1)
    guide = tiny_guide(model)
    torch.manual_seed(0)
    _, analytic = TruncatedSurrogate(beta=1.0).loss(model, guide, Batch(x, y), {}, 0)
    draws = torch.stack([TruncatedSurrogateMC(beta=1.0).loss(model, guide, Batch(x, y), {}, 0)[1]["kl"].detach()
                         for _ in range(200)])
    assert abs(draws.mean() - analytic["kl"]) < 4 * draws.std() / math.sqrt(200), (draws.mean(), analytic["kl"])


# sequential Monte Carlo ------------------------------------------------------------------------

def test_smc_evidence_estimate_is_unbiased():
    model, batch = toy(replicas=4000)
    exact = model.exact_log_evidence(batch.x[:1], batch.y[:1])
    torch.manual_seed(4)
    ratio = (smc_log_evidence(model, PriorGuide(model), batch, num_particles=4) - exact).exp()
    assert abs(ratio.mean() - 1) < 4 * ratio.std() / math.sqrt(len(ratio)), ratio.mean()
    with torch.no_grad():
        _, metrics = SequentialMonteCarlo(4, truncate=False).loss(model, PriorGuide(model), batch, {}, 0)
    assert metrics["resampled"] > 0.05  # the check covers resampled particles


def test_smc_without_resampling_is_importance_sampling():
    """Threshold 0 never resamples: log Z_N is then the log-mean of the products of the step weights,
    the IWAE bound of the same draws."""
    model, batch = toy(replicas=5)
    guide = ResidualGaussian(model, hidden=4).double()
    torch.manual_seed(5)
    smc = smc_log_evidence(model, guide, batch, num_particles=8, resample_threshold=0.0)
    torch.manual_seed(5)
    iwae = importance_log_evidence(model, guide, batch, num_particles=8, chunk_size=8).log_evidence
    assert torch.allclose(smc, iwae, atol=1e-9)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=2, max_size=12))
def test_systematic_resampling_gives_each_particle_its_share_rounded(log_weights):
    log_w = torch.tensor(log_weights, dtype=torch.float64)[:, None]
    counts = torch.bincount(systematic_ancestors(log_w)[:, 0], minlength=len(log_weights))
    share = len(log_weights) * log_w.softmax(0)[:, 0]
    assert torch.all(counts >= share.floor() - 1e-9) and torch.all(counts <= share.ceil() + 1e-9)


# wake-sleep, VI and MCMC fit the toy posterior ------------------------------------------------

def fitted_gap(objective: str) -> tuple[float, torch.Tensor]:
    """Train a residual guide on the toy (only the guide is optimized; one eps site with a diagonal
    exact posterior);
    return the largest error of its mean and its scale / the exact posterior scale."""
    torch.manual_seed(6)
    model = LinearGaussianModel(dim=2, length=2, target_dim=2, transitions=1, n_sup=1)
    with torch.no_grad():
        model.observation.copy_(torch.diag(torch.tensor([1.5, -0.8])))
    guide = ResidualGaussian(model, hidden=8)
    batch = Batch(torch.randn(64, 2, 2), 2 * torch.randn(64, 2, 2))
    optimizer = torch.optim.Adam(guide.parameters(), lr=0.03)
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    rws = ReweightedWakeSleep(16, truncate=False)
    for _ in range(300):
        if objective == "vi":
            loss = elbo.differentiable_loss(model, guide, batch.x, batch.y)
        else:
            loss, _ = rws.loss(model, guide, batch, {}, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    mean, cov = model.exact_posterior(batch.x, batch.y)
    _, guide_trace = guide.run(model.forward, batch.x, y=batch.y)
    q = guide_trace.nodes["eps/0/0"]["fn"].base_dist
    return (q.loc.double() - mean).abs().max().item(), q.scale.detach().double() / cov.diag().sqrt()


@pytest.mark.parametrize("objective", ["vi", "rws"])
def test_vi_and_wake_sleep_fit_the_toy_posterior(objective):
    pyro.enable_validation(False)  # 300 steps; validated elsewhere
    mean_error, scale_ratio = fitted_gap(objective)
    assert mean_error < 0.25, mean_error
    scale_error = (scale_ratio - 1).abs()
    assert scale_error.mean() < 0.05 and scale_error.max() < 0.2, scale_ratio


def test_wake_theta_gradient_estimates_the_evidence_gradient():
    """With the exact posterior as proposal the self-normalized wake-theta gradient is a Monte Carlo
    estimate of grad log p(y | x) (Fisher's identity)."""
    model, batch = toy(replicas=2, transitions=2, n_sup=2)
    torch.manual_seed(7)
    loss, metrics = ReweightedWakeSleep(4000, truncate=False).loss(model, ExactLinearGaussianPosterior(model),
                                                                  batch, {}, 0)
    ours = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])
    exact = torch.autograd.grad(-model.exact_log_evidence(batch.x, batch.y).sum() / batch.y.numel(),
                                list(model.parameters()))
    exact = torch.cat([g.flatten() for g in exact])
    assert metrics["wake_phi"] == 0  # the exact guide has nothing to fit
    assert torch.nn.functional.cosine_similarity(ours, exact, dim=0) > 0.99
    assert 0.9 < ours.norm() / exact.norm() < 1.1


def test_nuts_recovers_the_exact_posterior_mean_and_variance():
    pyro.enable_validation(False)  # thousands of potential evaluations
    model, batch = toy(n_sup=2, obs_scale=0.5)
    torch.manual_seed(8)
    samples, transitions = sample_posterior(model, PriorGuide(model), batch, kernel="nuts", num_samples=200,
                                            warmup_steps=100, step_size=0.3, max_tree_depth=5)
    eps = torch.cat([samples["eps/0/0"], samples["eps/1/0"]], -1).reshape(200, -1)
    mean, cov = model.exact_posterior(batch.x, batch.y)
    sd = cov.diag().sqrt()
    assert torch.all((eps.mean(0) - mean.reshape(-1)).abs() < 0.3 * sd), (eps.mean(0), mean)
    assert torch.all((eps.var(0) / sd**2 - 1).abs() < 0.5), (eps.var(0), sd**2)
    assert transitions > 300 * model.n_sup  # every potential evaluation runs the whole program


def test_short_hmc_from_the_prior_reaches_the_exact_posterior():
    """2,000 independent chains (one per copy of the input), each from a prior draw: after 40 draws of
    3 leapfrog steps the last draws have the exact posterior mean (within 0.1 sd) and variance (within
    15%); the cost is the start, the potential at it and one program per leapfrog step."""
    pyro.enable_validation(False)
    model, batch = toy(replicas=2000, n_sup=2, obs_scale=0.5)
    torch.manual_seed(0)
    draws, transitions, acceptance = short_hmc(model, PriorGuide(model), batch, num_samples=1, warmup_steps=40,
                                               num_steps=3, step_size=0.8)
    eps = torch.cat([draws["eps/0/0"][-1], draws["eps/1/0"][-1]], -1).reshape(2000, -1)
    with torch.no_grad():
        mean, cov = model.exact_posterior(batch.x[:1], batch.y[:1])
    sd = cov.diag().sqrt()
    assert torch.all((eps.mean(0) - mean.reshape(-1)).abs() < 0.1 * sd), (eps.mean(0), mean)
    assert torch.all((eps.var(0) / sd**2 - 1).abs() < 0.15), (eps.var(0), sd**2)
    assert 0.3 < acceptance.mean() < 0.9  # it moves, and the Metropolis test rejects some proposals
    assert transitions == model.n_sup * (1 + 1 + 41 * 3)


def test_short_hmc_without_leapfrog_steps_keeps_the_guide_sample(data):
    x, y = data
    model = tiny_model()
    guide = tiny_guide(model)
    torch.manual_seed(3)
    draws, transitions, acceptance = short_hmc(model, guide, Batch(x, y), num_samples=2, num_steps=0)
    torch.manual_seed(3)
    with torch.no_grad():
        start, _ = guide.run(model.forward, x, y=y)
    sites = [f"eps/{n}/{t}" for n in range(model.n_sup) for t in range(model.transitions)]
    assert sorted(draws) == sorted(sites)
    for site in sites:
        assert torch.equal(draws[site], start.nodes[site]["value"].expand(2, -1, -1, -1))
    assert transitions == model.n_sup * model.transitions and acceptance.eq(1).all()


def test_short_hmc_em_counts_every_program_it_runs(data):
    """Cost per example: the guide's sample, the potential at it, (warm-up + draws) x leapfrog steps, and
    the M-step's draws: N_sup T (1 + 1 + (1 + 2) 3 + 2)."""
    x, y = data
    model = tiny_model()
    objective = MonteCarloEM(kernel="short_hmc", num_samples=2, warmup_steps=1, m_step_samples=2, num_steps=3,
                             step_size=0.05)
    loss, metrics = objective.loss(model, tiny_guide(model), Batch(x, y), {}, 0)
    assert metrics["transitions"] == model.n_sup * model.transitions * (1 + 1 + 3 * 3 + 2)
    assert 0 <= metrics["accept"] <= 1 and torch.isfinite(loss)


# the schemes on the recursive model -----------------------------------------------------------

SCHEMES = {
    "iwae": lambda: ImportanceWeighted(3),
    "iwae_whole": lambda: ImportanceWeighted(3, truncate=False),
    "rws": lambda: ReweightedWakeSleep(3, insomnia=0.5),
    "rws_whole": lambda: ReweightedWakeSleep(3, insomnia=0.5, truncate=False),
    "smc": lambda: SequentialMonteCarlo(3, resample_threshold=0.9),
    "smc_whole": lambda: SequentialMonteCarlo(3, resample_threshold=0.9, truncate=False),
    "mcmc_em": lambda: MonteCarloEM(kernel="hmc", num_samples=3, warmup_steps=2, m_step_samples=2, num_steps=2),
    "mcmc_em_short": lambda: MonteCarloEM(kernel="short_hmc", num_samples=2, m_step_samples=1, num_steps=2),
    "surrogate_mc": lambda: TruncatedSurrogateMC(),
}


@pytest.mark.parametrize("name", SCHEMES)
def test_schemes_train_the_recursive_model_and_report_their_cost(data, name):
    x, y = data
    model = tiny_model()
    guide = tiny_guide(model)
    objective = SCHEMES[name]()
    state = {}
    for update in range(objective.updates_per_batch(model)):
        loss, metrics = objective.loss(model, guide, Batch(x, y), state, update)
        assert torch.isfinite(loss)
        assert {"loss", "transitions", "forward_seconds", "halt", "value", "acc"} <= set(metrics)
        loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.core.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in guide.parameters())
    assert metrics["transitions"] >= model.transitions and metrics["forward_seconds"] > 0


SMOOTH = {  # scheme, T: on a fixed seed the loss of update 0 is a smooth function of every parameter
    "iwae": (lambda: ImportanceWeighted(3, halt_weight=0, value_weight=0), 1),
    "iwae_whole": (lambda: ImportanceWeighted(3, truncate=False, halt_weight=0, value_weight=0), 2),
    "surrogate_mc": (lambda: TruncatedSurrogateMC(halt_weight=0, value_weight=0), 1),
}


@pytest.mark.parametrize("name", SMOOTH)
def test_scheme_gradient_is_the_finite_difference_of_its_loss(data, name):
    """The gradient of the loss along a random direction in the model's, then the guide's parameters
    against the central difference of the same seeded loss (float64; measured: agree to 1e-6 relative).
    Head losses off (the heads read a detached state: with them iwae_whole gives 309.40 against 308.33)
    and, truncated, T = 1 (with T = 2 the first transition runs without gradient by design: iwae gives
    129.4 against 161.1)."""
    x, y = data
    make, transitions = SMOOTH[name]
    model = tiny_model(transitions=transitions).double()
    guide = tiny_guide(model).double()

    def loss():
        torch.manual_seed(11)
        return make().loss(model, guide, Batch(x, y), {}, 0)[0]

    def loss_moved(params, direction, step):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(step * d)
            value = loss()
            for p, d in zip(params, direction):
                p.sub_(step * d)
        return value

    generative = [p for key, p in model.named_parameters() if not key.startswith(("halt_head", "value_head"))]
    for params in (generative, list(guide.parameters())):
        torch.manual_seed(5)
        direction = [torch.randn_like(p) for p in params]
        analytic = sum((g * d).sum() for g, d in zip(torch.autograd.grad(loss(), params), direction)).item()
        h = 1e-5
        difference = ((loss_moved(params, direction, h) - loss_moved(params, direction, -h)) / (2 * h)).item()
        assert abs(analytic) > 1 and math.isclose(analytic, difference, rel_tol=1e-4), (analytic, difference)


def test_particle_schemes_count_the_transitions_of_all_particles(data):
    x, y = data
    model = tiny_model(transitions=2)
    _, metrics = ImportanceWeighted(3).loss(model, tiny_guide(model), Batch(x, y), {}, 0)
    assert metrics["transitions"] == 3 * 2
    _, metrics = ImportanceWeighted(3, truncate=False).loss(model, tiny_guide(model), Batch(x, y), {}, 0)
    assert metrics["transitions"] == 3 * 2 * model.n_sup


@pytest.mark.parametrize("name", SCHEMES)
def test_schemes_reject_a_deterministic_model(data, name):
    model = tiny_model(noise="none")
    with pytest.raises(ValueError, match="stochastic"):
        SCHEMES[name]().updates_per_batch(model)
    with pytest.raises(ValueError, match="stochastic"):
        SCHEMES[name]().loss(model, PriorGuide(model), Batch(*data), {}, 0)


@pytest.mark.parametrize("make, message", [
    (lambda: ImportanceWeighted(0), "num_particles"),
    (lambda: ReweightedWakeSleep(insomnia=2.0), "insomnia"),
    (lambda: SequentialMonteCarlo(resample_threshold=-1), "resample_threshold"),
    (lambda: MonteCarloEM(kernel="gibbs"), "kernel"),
    (lambda: MonteCarloEM(num_samples=2, m_step_samples=3), "m_step_samples"),
    (lambda: MonteCarloEM(kernel="short_hmc", step_size=0.0), "step_size > 0"),
    (lambda: MonteCarloEM(kernel="short_hmc", num_steps=-1), "num_steps >= 0"),
    (lambda: MonteCarloEM(kernel="hmc", num_steps=0), "num_steps >= 1"),
])
def test_schemes_reject_bad_options(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("name, scheme", [("iwae", ImportanceWeighted), ("rws", ReweightedWakeSleep),
                                          ("smc", SequentialMonteCarlo), ("mcmc_em", MonteCarloEM),
                                          ("mcmc_em_short", MonteCarloEM),
                                          ("truncated_mc", TruncatedSurrogateMC)])
def test_objective_configs_build_their_scheme(name, scheme):
    cfg = compose_config("train", [f"objective={name}"])
    assert isinstance(build(cfg.objective, "objective", judge=exact_match), scheme)
