"""Posterior diagnostics: importance diagnostics against the exact posterior of the linear-Gaussian
toy, the posterior-shortcut check on constructed guides, MCMC convergence on a known posterior, the
ELBO curves against the exact evidence, and the files ``diagnose`` writes (read back with ArviZ)."""

import csv
import json
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gram_pyro.checkpoint import save_checkpoint
from gram_pyro.config import UserError, compose_config
from gram_pyro.diagnostics import Options, diagnose
from gram_pyro.diagnostics.diversity import distinct_answers, pairwise_spread, prior_trajectories, principal_plane
from gram_pyro.diagnostics.elbo_curves import checkpoint_elbos, elbo_terms
from gram_pyro.diagnostics.importance import (guide_particles, importance_ess, importance_khat, random_directions,
                                              site_kl)
from gram_pyro.diagnostics.mcmc import mcmc_diagnostics
from gram_pyro.diagnostics.shortcut import kl_profile, shortcut_check, training_curves
from gram_pyro.nn import network_precision
from gram_pyro.objectives import TruncatedSurrogate
from gram_pyro.tasks.base import Batch
from gram_pyro.tasks.nqueens import NQueensTask
from gram_pyro.guides import PriorGuide, TargetConditionedGaussian
from gram_pyro.guides.base import EpsGuide
from gram_pyro.guides.linear_gaussian import ExactLinearGaussianPosterior
from gram_pyro.models.linear_gaussian import LinearGaussianModel
from tests.conftest import tiny_guide, tiny_model

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

pytestmark = pytest.mark.usefixtures("one_thread")
K = 400


def toy_problem(inputs=8, **options):
    """A float64 linear-Gaussian toy and a batch whose targets the model generated."""
    settings_ = dict(dim=2, length=2, target_dim=2, transitions=2, n_sup=2, obs_scale=0.5)
    model = LinearGaussianModel(**{**settings_, **options}).double()
    torch.manual_seed(0)
    x = torch.randn(inputs, model.length, model.dim, dtype=torch.float64)
    with torch.no_grad():
        y = model(x) + model.log_obs_scale.exp() * torch.randn(*x.shape[:-1], model.target_dim, dtype=torch.float64)
    return model, Batch(x, y)


class DistortedExactPosterior(ExactLinearGaussianPosterior):
    """The exact posterior with its mean moved by ``shift`` standard deviations and its scale times
    ``scale``: a deliberately wrong guide."""

    def __init__(self, model, shift: float, scale: float):
        super().__init__(model)
        self.shift, self.scale = shift, scale

    def get_posterior(self, name, prior):
        if not self.covers(name):
            return prior
        exact = super().get_posterior(name, prior).base_dist
        sd = exact.scale_tril.diagonal(dim1=-2, dim2=-1)
        moved = dist.MultivariateNormal(exact.loc + self.shift * sd, scale_tril=self.scale * exact.scale_tril)
        return moved.to_event(1)


def particles_of(guide, model, batch, num=K):
    torch.manual_seed(1)
    return guide_particles(model, guide, batch, num, decode=False)


# importance diagnostics on the toy ----------------------------------------------------------------

def test_exact_posterior_guide_has_equal_weights_khat_zero_and_full_ess():
    model, batch = toy_problem()
    particles = particles_of(ExactLinearGaussianPosterior(model), model, batch)
    exact = model.exact_log_evidence(batch.x, batch.y)
    assert torch.allclose(particles.log_weight, exact.expand(K, -1), atol=1e-9, rtol=0)
    assert torch.equal(importance_khat(particles.log_weight), torch.zeros(8, dtype=torch.float64))
    assert torch.allclose(importance_ess(particles.log_weight), torch.full((8,), float(K), dtype=torch.float64))


def test_nearly_exact_guide_has_small_khat_and_ess_near_k():
    model, batch = toy_problem()
    particles = particles_of(DistortedExactPosterior(model, shift=0.0, scale=1.05), model, batch)
    khat, ess = importance_khat(particles.log_weight), importance_ess(particles.log_weight)
    assert torch.all(khat < 0.5), khat
    assert torch.all(ess > 0.8 * K), ess


def test_shifted_too_narrow_guide_has_khat_above_the_limit():
    model, batch = toy_problem()
    particles = particles_of(DistortedExactPosterior(model, shift=1.0, scale=0.5), model, batch)
    khat, ess = importance_khat(particles.log_weight), importance_ess(particles.log_weight)
    assert torch.all(khat > 0.7), khat
    assert torch.all(ess < 0.1 * K), ess


def test_monte_carlo_kl_of_a_non_normal_family_matches_the_analytic_kl():
    torch.manual_seed(0)
    q = dist.Normal(torch.randn(3, 4), torch.rand(3, 4) + 0.5).to_event(2)
    p = dist.Normal(torch.randn(3, 4), torch.rand(3, 4) + 0.5).to_event(2)
    analytic, per_unit = site_kl(q, p, q.sample())
    same_q_as_mvn = dist.MultivariateNormal(q.base_dist.loc, scale_tril=torch.diag_embed(q.base_dist.scale)).to_event(1)
    draws = q.sample((20000,))
    estimate, no_units = site_kl(same_q_as_mvn, p, draws)
    assert per_unit.shape == (3, 4) and torch.isclose(per_unit.sum(), analytic)
    assert no_units is None
    assert abs(estimate.mean() - analytic) < 0.05 * analytic


def test_kl_is_zero_and_projection_covers_every_transition_where_the_guide_is_the_prior():
    model, batch = toy_problem(inputs=3)
    directions = random_directions(5, model.length * model.dim, seed=0)
    particles = guide_particles(model, PriorGuide(model), batch, 6, directions, decode=False)
    assert particles.projection.shape == (6, 3, 2, 2, 5)
    assert torch.equal(particles.kl, torch.zeros(6, 3, 2, 2, dtype=torch.float64))
    assert torch.allclose(directions.norm(dim=-1), torch.ones(5))


def test_bf16_networks_move_the_importance_weights_by_rounding_only(data):
    model = tiny_model()
    guide = tiny_guide(model)
    batch = Batch(*data)
    torch.manual_seed(0)
    full = guide_particles(model, guide, batch, 8)
    torch.manual_seed(0)
    with network_precision([model, guide], torch.bfloat16):
        low = guide_particles(model, guide, batch, 8)
    assert low.log_weight.dtype == torch.float64
    # an untrained random map amplifies rounding along the trajectory, yet the weights barely move
    assert 0 < (low.log_weight - full.log_weight).abs().median() < 0.01 * full.log_weight.std()
    assert torch.corrcoef(torch.stack([low.log_weight.flatten(), full.log_weight.flatten()]))[0, 1] > 0.99


def test_particles_chunked_to_a_tiny_memory_budget_stay_with_their_inputs():
    model, batch = toy_problem(inputs=5)
    particles = guide_particles(model, ExactLinearGaussianPosterior(model), batch, 6, decode=False,
                                memory_budget_mb=1e-4)  # one particle of one input per chunk
    exact = model.exact_log_evidence(batch.x, batch.y)
    assert torch.allclose(particles.log_weight, exact.expand(6, -1), atol=1e-9, rtol=0)


# the posterior-shortcut check ---------------------------------------------------------------------

class TargetCopyingGuide(EpsGuide):
    """A guide that writes the target into eps: ``h = u + eps = a W^+ onehot(y)`` on the board positions
    (``W`` the linear decoder), so the decoder reads ``y`` back exactly: the posterior shortcut, built
    by hand."""

    def __init__(self, model, strength: float = 20.0):
        super().__init__(model, posterior_transitions="all")
        self.strength = strength

    def posterior(self, kind, u, y, prior):
        readout = torch.linalg.pinv(self.model.decoder.linear.weight)  # [D, V]
        board = self.strength * torch.nn.functional.one_hot(y.clamp(min=0), self.model.vocab_size).to(u) @ readout.T
        target_h = torch.nn.functional.pad(board, (0, 0, self.model.num_prefix, 0))
        return dist.Normal(target_h - u, 0.01).to_event(2)


@pytest.fixture(scope="module")
def nqueens5(tmp_path_factory):
    return NQueensTask(n=5, removals=(2, 3), cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def reports(nqueens5, tmp_path_factory):
    """``diagnose`` of one tiny model under the target-copying guide and under the prior guide."""
    model = tiny_model(seq_len=25)
    run_dir = tmp_path_factory.mktemp("run")
    with (run_dir / "metrics.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["batch", "seconds", "lr", "loss", "nll", "kl"], [10, 1, 0.1, 2, 1.5, 0.5],
                                      [20, 2, 0.1, 1, 0.8, 0.2]])
    out = {}
    for name, guide, precision in (("copying", TargetCopyingGuide(model), "bf16"), ("prior", PriorGuide(model), "fp32")):
        out_dir = tmp_path_factory.mktemp(name)
        summary = diagnose(nqueens5, model, guide, out_dir, run_dir=run_dir, num_inputs=8, num_particles=16,
                           num_samples=5, seed=3, num_projections=3, pca_inputs=2, precision=precision)
        out[name] = (summary, out_dir)
    return out


def test_a_guide_that_copies_the_target_is_flagged_as_a_posterior_shortcut(reports):
    summary, _ = reports["copying"]
    check = summary["shortcut"]
    assert check["posterior_accuracy"] == 1.0 and check["prior_accuracy"] < 0.2
    assert check["flagged"] and check["verdict"].startswith("POSTERIOR SHORTCUT")
    assert summary["kl"]["total"] > 100 and min(summary["kl"]["active_units"]) > 0


def test_the_prior_as_guide_is_not_flagged_and_pays_no_kl(reports):
    summary, _ = reports["prior"]
    check = summary["shortcut"]
    assert summary["precision"] == "fp32"
    assert not check["flagged"] and abs(check["gap"]) < 0.2
    assert summary["kl"]["total"] == 0 and summary["kl"]["active_units"] == [0.0, 0.0]


def trained_shortcut_check(task, beta, posterior_transitions, batches=40):
    """Train a tiny model with the truncated surrogate on 5-queens and check it on the test split."""
    pyro.enable_validation(False)
    torch.manual_seed(0)
    model = tiny_model(seq_len=25, dim=16, ffn_hidden=32)
    guide = TargetConditionedGaussian(model, posterior_transitions=posterior_transitions, init_scale=0.7)
    objective = TruncatedSurrogate(beta=beta, judge=task.judge)
    optimizer = torch.optim.AdamW([*model.parameters(), *guide.parameters()], lr=3e-3)
    train, generator = task.splits["train"], torch.Generator().manual_seed(0)
    for _ in range(batches):
        batch, state = train.batch(torch.randint(len(train), (32,), generator=generator), generator), {}
        for update in range(objective.updates_per_batch(model)):
            loss, _ = objective.loss(model, guide, batch, state, update)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    index = torch.arange(len(task.splits["test"]))
    test = task.splits["test"].batch(index, torch.Generator().manual_seed(0))
    with torch.no_grad():
        posterior = guide_particles(model, guide, test, 4).step_answers[:, :, -1]
        prior = prior_trajectories(model, test.x, 4).step_answers[-1]
    return shortcut_check(task.per_input("test", index, prior)["accuracy"],
                          task.per_input("test", index, posterior)["accuracy"])


def test_training_with_beta_zero_and_posterior_on_every_transition_is_flagged(nqueens5):
    assert trained_shortcut_check(nqueens5, beta=0.0, posterior_transitions="all").flagged
    assert not trained_shortcut_check(nqueens5, beta=1.0, posterior_transitions="last").flagged


def test_shortcut_threshold_and_active_units_by_hand():
    assert shortcut_check(torch.tensor([0.0, 0.2]), torch.tensor([0.5, 0.3]), threshold=0.2).flagged
    assert not shortcut_check(torch.tensor([0.0, 0.2]), torch.tensor([0.2, 0.3]), threshold=0.2).flagged
    units = torch.zeros(2, 2, 3, 1)
    units[0, 0, 0] = units[0, 1, 0] = 0.006  # step 1: one unit active only when its transitions add up
    units[1, 1, 2] = 0.5
    profile = kl_profile(torch.ones(4, 5, 2, 2), units, unit_threshold=0.01)
    assert profile.active_units == [1.0, 1.0] and profile.units_per_step == 3
    assert profile.per_transition == [[1.0, 1.0], [1.0, 1.0]] and profile.total == 4.0
    units[1, 0, 1] = torch.nan  # a transition without per-unit KL (non-Normal guide)
    assert math.isnan(kl_profile(torch.ones(4, 5, 2, 2), units).active_units[1])


def test_training_curves_read_metrics_csv_and_name_a_bad_line(tmp_path):
    assert training_curves(tmp_path) is None
    (tmp_path / "metrics.csv").write_text("batch,seconds,loss,kl\n10,1.0,2.0,0.5\n20,2.0,1.0,oops\n")
    with pytest.raises(UserError, match=r"metrics.csv:3: kl='oops' is not a number"):
        training_curves(tmp_path)
    (tmp_path / "metrics.csv").write_text("batch,seconds,loss,kl\n10,1.0,2.0,0.5\n20,2.0,1.0,0.25\n")
    assert training_curves(tmp_path) == {"batch": [10.0, 20.0], "kl": [0.5, 0.25], "loss": [2.0, 1.0]}


# files ----------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_inference_data_round_trips_through_arviz(reports):
    summary, out_dir = reports["copying"]
    data = az.from_netcdf(out_dir / "diagnostics.nc")
    groups = {"posterior", "sample_stats", "posterior_predictive", "prior_predictive", "observed_data"}
    assert groups <= set(data.groups())
    assert data.posterior["eps_projection"].shape == (1, 16, 8, 2, 2, 3)
    assert data.sample_stats["log_weight"].dtype == "float64" and data.sample_stats["kl"].shape == (1, 16, 8, 2, 2)
    assert data.sample_stats["khat"].shape == (8,) and data.prior_predictive["answers"].shape == (1, 5, 8, 25)
    # the decoded posterior answers are the targets, which the observed data holds
    assert (data.posterior_predictive["answers"].values[0] == data.observed_data["targets"].values).all()
    table = az.summary(data, var_names=["eps_projection"], kind="diagnostics")
    assert len(table) == 8 * 2 * 2 * 3 and (table["ess_bulk"] > 0).all()
    az.plot_khat(data.sample_stats["khat"])
    az.plot_ess(data, var_names=["eps_projection"], coords={"input": [int(data.posterior.input[0])], "step": [1],
                                                            "transition": [1], "projection": [0]})


def test_report_json_and_figures_are_written(reports):
    summary, out_dir = reports["copying"]
    assert json.loads((out_dir / "summary.json").read_text())["shortcut"]["flagged"] is True
    for name in summary["files"].values():
        assert (out_dir / name).stat().st_size > 0
    figures = {"accuracy", "kl", "kl_units", "training", "importance", "diversity", "trajectories"}
    assert figures <= set(summary["files"])
    report = (out_dir / "report.md").read_text()
    assert "POSTERIOR SHORTCUT" in report and "## Timings" in report and "surrogate vs full ELBO skipped" in report
    assert summary["precision"] == "bf16" and "Network matmuls in bf16" in report
    assert set(summary["seconds"]) >= {"prior trajectories", "guide particles", "importance diagnostics"}


def test_diagnose_rejects_bad_options_in_one_line(nqueens5, tmp_path):
    model = tiny_model(seq_len=25)
    with pytest.raises(UserError, match="no split 'valid'"):
        diagnose(nqueens5, model, PriorGuide(model), tmp_path, split="valid")
    with pytest.raises(UserError, match="mcmc_chains must be 0"):
        diagnose(nqueens5, model, PriorGuide(model), tmp_path, mcmc_chains=1)
    with pytest.raises(UserError, match="other counts >= 1, got mcmc_samples=0"):
        diagnose(nqueens5, model, PriorGuide(model), tmp_path, mcmc_chains=2, mcmc_samples=0)
    with pytest.raises(UserError, match="mcmc_warmup must be >= 0, got -1"):
        diagnose(nqueens5, model, PriorGuide(model), tmp_path, mcmc_chains=2, mcmc_warmup=-1)
    with pytest.raises(UserError, match="unknown precision 'fp16'; allowed: auto, fp32, bf16"):
        diagnose(nqueens5, model, PriorGuide(model), tmp_path / "out", precision="fp16")
    assert not (tmp_path / "out").exists()  # checked before anything is written


# MCMC ------------------------------------------------------------------------------------------

def test_two_nuts_chains_on_a_known_posterior_converge_to_it():
    pyro.enable_validation(False)  # hundreds of potential evaluations
    model, batch = toy_problem(inputs=1, length=1, transitions=1, noise_scale=0.5)
    directions = random_directions(2, model.dim, seed=0)
    torch.manual_seed(0)
    result = mcmc_diagnostics(model, ExactLinearGaussianPosterior(model), batch, directions, num_chains=2,
                              num_samples=100, warmup_steps=60, step_size=0.3)
    assert result.projection.shape == (2, 100, 1, 2, 1, 2)
    assert result.r_hat_max < 1.1 and result.ess_bulk_min > 30
    mean, cov = model.exact_posterior(batch.x, batch.y)  # the vector [eps/0/0, eps/1/0] of the one position
    directions, D = directions.double(), model.dim
    exact_projection = mean.view(2, D) @ directions.T
    blocks = torch.stack([cov[n * D:(n + 1) * D, n * D:(n + 1) * D] for n in range(2)])
    sd = torch.einsum("pd,nde,pe->np", directions, blocks, directions).sqrt()
    drawn = result.projection.mean((0, 1))[0, :, 0]  # [step, projection]
    assert torch.all((drawn - exact_projection).abs() < 0.5 * sd), (drawn, exact_projection, sd)


# ELBO curves -----------------------------------------------------------------------------------

def test_one_step_elbos_of_the_exact_posterior_equal_the_evidence():
    model, batch = toy_problem(n_sup=1, transitions=1)
    surrogate, full = elbo_terms(particles_of(ExactLinearGaussianPosterior(model), model, batch, 50), batch.y)
    exact = model.exact_log_evidence(batch.x, batch.y).sum().item() / batch.y.numel()
    assert surrogate == pytest.approx(exact, abs=1e-9) and full == pytest.approx(exact, abs=1e-9)


def test_surrogate_leaves_out_exactly_the_kl_of_earlier_transitions():
    model, batch = toy_problem(inputs=3, n_sup=1, transitions=2)
    last = particles_of(ExactLinearGaussianPosterior(model, posterior_transitions="last"), model, batch, 50)
    surrogate, full = elbo_terms(last, batch.y)
    assert surrogate == pytest.approx(full, abs=1e-12)  # q = p on the earlier transition: nothing left out
    every = particles_of(ExactLinearGaussianPosterior(model, posterior_transitions="all"), model, batch, 50)
    surrogate, full = elbo_terms(every, batch.y)
    left_out = every.kl[..., 0, 0].mean(0).sum().item() / batch.y.numel()
    assert left_out > 0 and surrogate - full == pytest.approx(left_out)


def test_checkpoint_elbos_follow_training_order_and_restore_the_weights(tmp_path, data):
    model = tiny_model()
    guide = tiny_guide(model)
    x, y = data
    paths = []
    for batches in (20, 10):
        with torch.no_grad():
            for p in guide.parameters():
                p.add_(0.1)
        paths.append(tmp_path / f"batch_{batches}.pt")
        save_checkpoint(paths[-1], {"model": model.state_dict(), "guide": guide.state_dict(), "optimizer": {},
                                    "scheduler": {}, "ema": {}, "rng": {}, "batches_done": batches, "bad_steps": 0})
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.1)
    before = [p.clone() for p in guide.parameters()]
    with torch.no_grad():
        rows = checkpoint_elbos(model, guide, Batch(x, y), paths, num_particles=3)
    assert [row["batches"] for row in rows] == [10, 20]
    assert all(row["full"] < 0 and row["surrogate"] < 0 for row in rows) and rows[0]["full"] != rows[1]["full"]
    assert all(torch.equal(a, b) for a, b in zip(before, guide.parameters()))
    with pytest.raises(UserError, match="does not match"):
        checkpoint_elbos(tiny_model(dim=4), guide, Batch(x, y), paths, num_particles=3)


# diversity helpers ------------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_distinct_answers_count_the_different_rows_per_input(num, inputs, length, seed):
    g = torch.Generator().manual_seed(seed)
    answers = torch.randint(0, 2, (num, inputs, length), generator=g)
    valid = torch.rand(num, inputs, generator=g) < 0.5
    expected = [len({tuple(answers[i, m].tolist()) for i in range(num)}) for m in range(inputs)]
    expected_valid = [len({tuple(answers[i, m].tolist()) for i in range(num) if valid[i, m]}) for m in range(inputs)]
    assert distinct_answers(answers).tolist() == expected
    assert distinct_answers(answers, valid).tolist() == expected_valid


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 5), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_pairwise_spread_is_the_mean_rms_distance_over_pairs(num, inputs, seed):
    h = torch.randn(num, inputs, 3, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    pairs = [(i, j) for i in range(num) for j in range(num) if i != j]
    expected = [sum(((h[i, b] - h[j, b]) ** 2).mean().sqrt().item() for i, j in pairs) / max(len(pairs), 1)
                for b in range(inputs)]
    assert torch.allclose(pairwise_spread(h), torch.tensor(expected, dtype=torch.float64))


@settings(max_examples=50, deadline=None)
@given(st.integers(3, 12), st.integers(0, 2**31 - 1))
def test_principal_plane_keeps_the_distances_of_planar_points(num, seed):
    g = torch.Generator().manual_seed(seed)
    plane = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=torch.float64)).Q  # orthonormal basis in R^6
    coords = torch.randn(num, 2, generator=g, dtype=torch.float64)
    points = coords @ plane.T + torch.randn(6, generator=g, dtype=torch.float64)
    projected = principal_plane(points)
    assert torch.allclose(torch.cdist(projected, projected), torch.cdist(coords, coords), atol=1e-8)


def test_options_from_the_diagnose_config_rename_its_count_keys_and_keep_the_other_defaults():
    cfg = compose_config("diagnose", ["run=runs/x", "inputs=7", "particles=5", "samples=3", "mcmc_chains=2",
                                      "precision=fp32", "seed=4"])
    options = Options.from_config(cfg, ["a.pt", "b.pt"])
    assert (options.run_dir, options.num_inputs, options.num_particles, options.num_samples) == ("runs/x", 7, 5, 3)
    assert (options.mcmc_chains, options.precision, options.seed, options.checkpoints) == (2, "fp32", 4, ["a.pt", "b.pt"])
    assert (options.split, options.unit_threshold, options.elbo_particles) == ("test", Options.unit_threshold, 8)

