"""Pyro's inference classes on the programs as written, as a Pyro user drives them (the Pyro docs' way):
SVI with Trace_ELBO, TraceMeanField_ELBO and RenyiELBO; AutoNormal and AutoDelta; Predictive for prior
and posterior predictive answers; SMCFilter; MCMC with NUTS and HMC; get_dependencies. Exact answers
come from the linear-Gaussian toy, whose posterior and evidence are known in closed form."""

import json
import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import HMC, MCMC, NUTS, SVI, Predictive, RenyiELBO, SMCFilter, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal
from pyro.ops.stats import effective_sample_size

from gram_pyro.experiments.program_graph import program_edges
from gram_pyro.cli import main
from gram_pyro.run import load_run, pretrained_dir
from gram_pyro.inference import sample_trajectories
from gram_pyro.predictive import keyed_noise
from gram_pyro.tasks.base import held_out_index
from gram_pyro.guides.linear_gaussian import ExactLinearGaussianPosterior
from gram_pyro.models.linear_gaussian import LinearGaussianModel
from tests.conftest import BATCH, SEQ, VOCAB, BootstrapGuide, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
SITES = ("eps/0/0", "eps/1/0")


@pytest.fixture
def toy():
    """A float64 toy (two steps of one transition, eps of 2 units each: 4 latent units) with fixed
    parameters, an input and a target: ``(model, x [1, 1, 2], y [1, 1, 2])``."""
    model = LinearGaussianModel(dim=2, length=1, target_dim=2, transitions=1, n_sup=2, noise_scale=0.5,
                                obs_scale=0.5).double()
    model.requires_grad_(False).eval()  # inference over eps only: SVI leaves the model alone
    g = torch.Generator().manual_seed(0)
    return model, torch.randn(1, 1, 2, generator=g, dtype=torch.float64), \
        torch.randn(1, 1, 2, generator=g, dtype=torch.float64)


def stacked(samples: dict, sites=SITES) -> torch.Tensor:
    """Site values ``[S, 1, 1, 2]`` (or ``[1, 1, 2]``) as rows of the eps vector ``[S, 4]``."""
    return torch.cat([samples[site].reshape(-1, 2) for site in sites], -1)


def exact_moments(model, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    mean, cov = model.exact_posterior(x, y)
    return mean.reshape(-1), cov.diag().sqrt()


# Predictive ------------------------------------------------------------------------------------

def test_predictive_returns_sampled_and_decoded_answers_for_every_step(data):
    x, _ = data
    model = tiny_model()
    torch.manual_seed(0)
    samples = Predictive(model, num_samples=7)(x)
    for n in range(model.n_sup):
        assert samples[f"y/{n}"].shape == samples[f"answer/{n}"].shape == (7, BATCH, SEQ)
        assert ((samples[f"y/{n}"] >= 0) & (samples[f"y/{n}"] < VOCAB)).all()
    rerun = poutine.trace(poutine.condition(model, {site: samples[site][3] for site in samples if site[:3] == "eps"}))
    logits = rerun.get_trace(x).nodes["_RETURN"]["value"]
    assert torch.equal(samples[f"answer/{model.n_sup - 1}"][3], logits.argmax(-1))
    sampled, decoded = samples["y/1"].float(), samples["answer/1"].float()
    assert 0 < (sampled == decoded).float().mean() < 1  # y is drawn from the likelihood, the answer its mode


def test_predictive_on_the_keyed_noise_gives_the_sampler_answers(data):
    x, _ = data
    model = tiny_model(init_scale=2.0)
    noise = keyed_noise(model, x, 6, seed=11)
    sites = [f"answer/{n}" for n in range(model.n_sup)]
    answers = Predictive(model, posterior_samples=noise, return_sites=sites, parallel=True)(x)
    paths = sample_trajectories(model, x, 6, seed=11, record_steps=True)
    assert torch.equal(torch.stack([answers[site] for site in sites]), paths.step_answers)
    assert not (paths.answers == paths.answers[0]).all()  # the noise matters


def test_predictive_answers_are_as_valid_as_gram_pyro_eval_reports(tmp_path):
    assert main(["eval", "pretrained=coloring", "inputs=8", "samples=4", "seed=3", "select=first",
                 f"out={tmp_path}"]) == 0
    reported = json.loads((tmp_path / "metrics.json").read_text())["metrics"]["sample_accuracy"]["mean"]
    loaded = load_run(pretrained_dir("coloring"), "cpu")
    test = loaded.task.splits["test"]
    x = test.inputs[held_out_index(len(test), 8, 3)]
    last = f"answer/{loaded.model.n_sup - 1}"
    answers = Predictive(loaded.model, posterior_samples=keyed_noise(loaded.model, x, 4, seed=3),
                         return_sites=[last], parallel=True)(x)[last]
    valid = loaded.task.judge(x, answers).float().mean().item()
    assert valid == pytest.approx(reported, abs=1e-6) and 0 < valid < 1


def test_posterior_predictive_with_a_guide_draws_from_the_guide(toy):
    model, x, y = toy
    torch.manual_seed(0)
    samples = Predictive(model, guide=ExactLinearGaussianPosterior(model), num_samples=4000, parallel=True)(x, y=y)
    mean, sd = exact_moments(model, x, y)
    assert ((stacked(samples).mean(0) - mean).abs() < 4 * sd / math.sqrt(4000)).all()
    assert ((stacked(samples).std(0) / sd - 1).abs() < 0.05).all()


def test_project_samplers_draw_no_answers_from_the_global_generator(data):
    x, y = data
    model = tiny_model()
    state = {}
    model.init(state, x)
    step = poutine.trace(model.step).get_trace(state, x)
    assert "y/0" not in step.nodes and "answer/0" in step.nodes  # a driver decodes the logits itself
    assert "y/0" not in poutine.trace(model).get_trace(x, sample_y=False).nodes
    before = torch.get_rng_state()
    sample_trajectories(model, x, 3, seed=0)
    assert torch.equal(before, torch.get_rng_state())


# SVI and its ELBOs -----------------------------------------------------------------------------

@pytest.mark.parametrize("elbo", [Trace_ELBO(), TraceMeanField_ELBO(),
                                  RenyiELBO(alpha=0.5, num_particles=8, vectorize_particles=True, max_plate_nesting=1)])
def test_every_elbo_of_the_exact_posterior_is_the_exact_evidence(toy, elbo):
    model, x, y = toy
    loss = elbo.loss(model, ExactLinearGaussianPosterior(model), x, y)
    assert loss == pytest.approx(-model.exact_log_evidence(x, y).item(), abs=1e-9)


@pytest.mark.parametrize("autoguide, elbo, tolerance", [
    (AutoNormal, Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=1), 0.1),
    (AutoNormal, TraceMeanField_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=1), 0.1),
    (AutoDelta, Trace_ELBO(), 1e-3),
])
def test_svi_with_an_autoguide_finds_the_exact_posterior_mean(toy, autoguide, elbo, tolerance):
    """A Gaussian posterior's mean is both the mean-field optimum's mean and the MAP."""
    model, x, y = toy
    torch.manual_seed(0)
    guide = autoguide(model)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.99}), elbo)
    for _ in range(250):
        svi.step(x, y)
    mean, sd = exact_moments(model, x, y)
    assert ((stacked(guide.median(x, y)) - mean).abs() < tolerance * sd).all()


# SMC and MCMC ----------------------------------------------------------------------------------

def test_smc_filter_finds_the_exact_posterior_of_the_final_state(toy):
    model, x, y = toy
    torch.manual_seed(0)
    smc = SMCFilter(model, BootstrapGuide(), num_particles=4000, max_plate_nesting=1)
    smc.init(x)
    for _ in range(model.n_sup):
        smc.step(x, y)
    mean, _ = model.exact_posterior(x, y)  # observation mean C h of the final state at the posterior mean of eps
    exact = poutine.condition(model, {site: mean[..., 2 * i:2 * i + 2] for i, site in enumerate(SITES)})(x, y=y)
    filtered = smc.get_empirical()["h"].mean @ model.observation.T
    _, cov = model.exact_posterior(x, y)
    sd = (model.observation @ cov[2:, 2:] @ model.observation.T).diag().sqrt()  # h's last noise is eps/1/0
    assert ((filtered - exact).abs() < 0.3 * sd).all()


@pytest.mark.parametrize("kernel", [lambda model: NUTS(model), lambda model: HMC(model, step_size=0.3, num_steps=4)],
                         ids=["NUTS", "HMC"])
def test_mcmc_posterior_mean_is_the_exact_one_within_its_error(toy, kernel):
    model, x, y = toy
    torch.manual_seed(0)
    mcmc = MCMC(kernel(model), num_samples=150, warmup_steps=50, disable_progbar=True)
    mcmc.run(x, y=y)
    draws = stacked(mcmc.get_samples())
    ess = effective_sample_size(draws[None], chain_dim=0, sample_dim=1).clamp(max=len(draws))
    mean, sd = exact_moments(model, x, y)
    assert ((draws.mean(0) - mean).abs() < 4 * sd / ess.sqrt()).all()


def log_likelihood(model, x, y, eps: dict) -> torch.Tensor:
    """``sum_n log p(y/n | eps)`` per draw of ``eps`` ``{site: [S, B, L, D]}``, averaged over inputs."""
    draws = next(iter(eps.values())).shape[0]
    with torch.no_grad(), pyro.plate("draws", draws, dim=-2):
        trace = poutine.trace(poutine.condition(model, eps)).get_trace(x, y=y)
    return sum(trace.nodes[f"y/{n}"]["fn"].log_prob(y) for n in range(model.n_sup)).mean(-1)


def test_nuts_runs_on_the_recursive_model_as_written(data):
    x, y = data
    model = tiny_model()
    torch.manual_seed(0)
    mcmc = MCMC(NUTS(model, max_tree_depth=3), num_samples=10, warmup_steps=10, disable_progbar=True)
    mcmc.run(x, y=y)
    posterior = mcmc.get_samples()
    assert set(posterior) == {f"eps/{n}/{t}" for n in range(2) for t in range(2)}  # z0 is no latent site
    prior = {site: value for site, value in Predictive(model, num_samples=10)(x).items() if site in posterior}
    assert log_likelihood(model, x, y, posterior).mean() > log_likelihood(model, x, y, prior).mean() + 1


# the program's structure -----------------------------------------------------------------------

def test_get_dependencies_shows_the_state_space_chain(data):
    x, y = data
    model = tiny_model()
    assert program_edges(model, x, y) == [("eps/0/0", "eps/0/1"), ("eps/0/1", "y/0"), ("eps/0/1", "eps/1/0"),
                                          ("eps/1/0", "eps/1/1"), ("eps/1/1", "y/1")]
