"""Test-time SMC over trajectories: the resampler against a Markov-chain toy whose target is known in
closed form, the ESS and resampling bookkeeping by hand, and the sampler on the tiny recursive model
(reductions to vote@N and best-of-N, chunking, errors, ``gram-pyro eval select=smc``)."""

import json
import math

import pytest
import torch

from gram_pyro.cli import main
from gram_pyro.config import UserError, compose_config
from gram_pyro.evaluation import evaluate_run
from gram_pyro.run import load_run
from gram_pyro.inference import sample_trajectories
from gram_pyro.selection import SELECTORS, lprm_best, majority_vote, select
from gram_pyro.test_time_smc import SMCOptions, as_smc_options, smc_sweep, smc_trajectories
from gram_pyro.training import train
from tests.conftest import tiny_model
from tests.helpers import TINY_MODEL, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

# A 4-state Markov chain of D = 3 steps with a reward r(x) in (0, 1] of the last state.
P0 = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
P = torch.tensor([[0.6, 0.2, 0.1, 0.1], [0.1, 0.5, 0.3, 0.1], [0.2, 0.2, 0.3, 0.3], [0.3, 0.1, 0.1, 0.5]],
                 dtype=torch.float64)
R = torch.tensor([0.9, 0.2, 0.5, 0.05], dtype=torch.float64)
D = 3


def exact_log_potentials(tau: float) -> torch.Tensor:
    """``log v_n(x)`` ``[D, 4]`` with ``v_n^tau = E[r(X_{D-1})^tau | X_n = x]``: the exact value function
    (the optimal twist), what a perfect value head would read."""
    v = [R ** tau]
    for _ in range(D - 1):
        v.insert(0, P @ v[0])
    return torch.stack(v).log() / tau


def target_marginal(tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pi, p)``: the last state's law under the target ``p(x_{0:D-1}) r(x_{D-1})^tau``, and under
    the chain alone."""
    prior = P0 @ torch.linalg.matrix_power(P, D - 1)
    tilted = prior * R ** tau
    return tilted / tilted.sum(), prior


def chain_smc(log_v: torch.Tensor, options: SMCOptions, num: int, replicas: int, seed: int):
    """Test-time SMC of ``num`` particles on ``replicas`` independent copies of the chain, with the
    potentials ``log_v [D, 4]``: the survivors' last states ``[num, replicas]``, ESS and resampled."""
    generator = torch.Generator().manual_seed(seed)
    states = {}

    def advance(n):
        if n == 0:
            x = torch.multinomial(P0, num * replicas, replacement=True, generator=generator)
        else:
            x = torch.multinomial(P[states["x"].flatten()], 1, generator=generator)
        states["x"] = x.view(num, replicas)
        return log_v[n][states["x"]]

    def reorder(ancestors):
        states["x"] = states["x"].gather(0, ancestors)

    ess, resampled = smc_sweep(advance, reorder, D, options,
                               lambda n: torch.rand(replicas, generator=generator, dtype=torch.float64))
    return states["x"], ess, resampled


def histogram(x: torch.Tensor) -> torch.Tensor:
    return torch.bincount(x.flatten(), minlength=4).double() / x.numel()


@pytest.mark.parametrize("potential, tau, threshold", [("exact", 1.0, 0.5), ("exact", 3.0, 0.5), ("exact", 3.0, 1.0),
                                                       ("current_reward", 1.0, 1.0)])
def test_survivors_follow_the_tempered_target_on_a_chain(potential, tau, threshold):
    """256 particles on 500 copies of the chain: the survivors' last state has the law
    ``p(x) r(x)^tau / Z`` within 0.01 per state, whichever intermediate potentials steer them (the exact
    value function, or the reward of the current state, resampled at every step so that each copy's
    weight depends on its ancestor's potential); the chain alone is 0.3 or more away. (The current
    state's reward at tau = 3 also converges, but its weights are heavy-tailed: thousands of particles.)"""
    log_v = exact_log_potentials(tau) if potential == "exact" else R.log().expand(D, -1)
    x, ess, resampled = chain_smc(log_v, SMCOptions(tempering=tau, threshold=threshold), 256, 500, seed=0)
    target, prior = target_marginal(tau)
    assert (histogram(x) - target).abs().max() < 0.01
    assert (prior - target).abs().max() > 0.3
    assert ess.shape == resampled.shape == (D, 500)
    assert bool(resampled[-1].all()) and ((ess >= 1 - 1e-9) & (ess <= 256 + 1e-9)).all()


def test_the_bias_of_a_small_population_shrinks_with_its_size():
    """Self-normalised weights are biased by O(1/N): 8 particles miss the target by more than 0.03,
    256 by less than 0.01 (128,000 survivors in both)."""
    target, _ = target_marginal(1.0)
    few, _, _ = chain_smc(exact_log_potentials(1.0), SMCOptions(), 8, 16000, seed=1)
    many, _, _ = chain_smc(exact_log_potentials(1.0), SMCOptions(), 256, 500, seed=1)
    assert (histogram(few) - target).abs().max() > 0.03
    assert (histogram(many) - target).abs().max() < 0.01


def test_ess_incremental_weights_and_resampling_by_hand():
    """Two inputs, four particles, two steps. Input 0: uniform, then weights 1:2:1:1 (ESS 25/7); input
    1: all weight on particle 0 (ESS 1, resampled after step 0), whose copies inherit its log v_0 = -1,
    so that log v_1 = -1 + (0, log 3, 0, 0) weighs them 1:3:1:1 (ESS 3). The last step always resamples:
    with offset 0.9 the cumulative weights 0.2, 0.6, 0.8, 1 of input 0 give ancestors 1, 1, 2, 3."""
    log_v = [torch.tensor([[0.0, -1.0], [0.0, -50.0], [0.0, -50.0], [0.0, -50.0]]),
             torch.tensor([[0.0, -1.0], [math.log(2), -1 + math.log(3)], [0.0, -1.0], [0.0, -1.0]])]
    calls = []
    ess, resampled = smc_sweep(lambda n: log_v[n], calls.append, 2, SMCOptions(tempering=1.0, threshold=0.5),
                               lambda n: torch.tensor([0.9, 0.5]))
    assert ess[0].tolist() == pytest.approx([4.0, 1.0])
    assert ess[1].tolist() == pytest.approx([25 / 7, 3.0])
    assert resampled.tolist() == [[False, True], [True, True]]
    assert calls[0][:, 0].tolist() == [0, 1, 2, 3] and calls[0][:, 1].tolist() == [0, 0, 0, 0]
    assert calls[1][:, 0].tolist() == [1, 1, 2, 3]


def test_options_are_checked_with_one_line_errors():
    assert as_smc_options(None) == SMCOptions() and as_smc_options({"tempering": 2}).tempering == 2
    for spec, message in [({"tempering": -1.0}, "smc tempering must be a finite number >= 0, got -1.0"),
                          ({"tempering": math.inf}, "smc tempering must be a finite number >= 0"),
                          ({"threshold": 1.5}, "smc threshold must be a number in [0, 1], got 1.5"),
                          ({"threshold": "half"}, "smc threshold must be a number in [0, 1]"),
                          ({"potential": "oracle"}, "unknown smc potential 'oracle'; allowed: value, halt"),
                          ({"tau": 1.0}, "unknown smc option 'tau'; allowed: tempering, threshold, potential")]:
        with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
            as_smc_options(spec)


# the sampler on the tiny recursive model ------------------------------------------------------

N, INPUTS = 7, 5


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randint(0, 3, (INPUTS, 6))


def test_shapes_and_the_last_step_resamples_every_input(x):
    result = smc_trajectories(tiny_model(), x, N, {"tempering": 5.0}, depth=3, seed=3)
    paths = result.trajectories
    assert paths.answers.shape == (N, INPUTS, 6) and paths.value.shape == paths.halt_logit.shape == (N, INPUTS)
    assert paths.steps.eq(3).all() and result.ess.shape == result.resampled.shape == (3, INPUTS)
    assert result.resampled[-1].all() and ((result.ess >= 1 - 1e-9) & (result.ess <= N + 1e-9)).all()


def test_no_tempering_is_the_vote_over_the_independent_trajectories(x):
    """tau = 0: uniform weights, never resampled but at the end, where systematic resampling of uniform
    weights keeps every trajectory in place."""
    model = tiny_model()
    smc = smc_trajectories(model, x, N, {"tempering": 0.0}, depth=3, seed=3)
    independent = sample_trajectories(model, x, N, depth=3, seed=3)
    assert torch.equal(smc.trajectories.answers, independent.answers)
    assert torch.equal(smc.trajectories.value, independent.value)
    torch.testing.assert_close(smc.ess, torch.full_like(smc.ess, N))
    assert smc.resampled.sum() == INPUTS
    assert torch.equal(select("smc", smc.trajectories.answers)[0], majority_vote(independent.answers)[0])


@pytest.mark.parametrize("potential, head", [("value", "value"), ("halt", "halt_logit")])
def test_a_steep_potential_without_intermediate_resampling_is_best_of_n(x, potential, head):
    """threshold = 0 and a huge tau: the final resampling puts every survivor on the trajectory with the
    highest head, i.e. best-of-N over the independent trajectories."""
    model = tiny_model()
    smc = smc_trajectories(model, x, N, {"tempering": 1e9, "threshold": 0.0, "potential": potential}, depth=3,
                           seed=3)
    independent = sample_trajectories(model, x, N, depth=3, seed=3)
    best, _ = lprm_best(independent.answers, getattr(independent, head))
    assert torch.equal(smc.trajectories.answers, best.expand(N, -1, -1))
    assert smc.resampled[:-1].sum() == 0


def test_chunks_and_blocks_of_inputs_give_the_whole_batch_result(x):
    model = tiny_model()
    options = {"tempering": 20.0, "threshold": 0.9}
    whole = smc_trajectories(model, x, N, options, depth=3, seed=4)
    assert whole.resampled[:-1].any()  # the test needs resampling between steps
    chunked = smc_trajectories(model, x, N, options, depth=3, seed=4, memory_budget_mb=1e-9)  # one input each
    block = smc_trajectories(model, x[2:4], N, options, depth=3, seed=4, first_row=2)
    for part, rows in ((chunked, slice(None)), (block, slice(2, 4))):
        assert torch.equal(part.trajectories.answers, whole.trajectories.answers[:, rows])
        torch.testing.assert_close(part.ess, whole.ess[:, rows], rtol=1e-5, atol=0)  # float32 heads, other kernels
        assert torch.equal(part.resampled, whole.resampled[:, rows])
    again = smc_trajectories(model, x, N, options, depth=3, seed=4)
    other = smc_trajectories(model, x, N, options, depth=3, seed=5)
    assert torch.equal(again.trajectories.answers, whole.trajectories.answers)
    assert not torch.equal(other.trajectories.value, whole.trajectories.value)


def test_bad_requests_are_user_errors(x):
    with pytest.raises(UserError, match="select=smc needs a stochastic model"):
        smc_trajectories(tiny_model(noise="none"), x, N)
    with pytest.raises(UserError, match="need at least one trajectory and one step"):
        smc_trajectories(tiny_model(), x, 0)
    with pytest.raises(UserError, match="smc threshold must be a number in"):
        smc_trajectories(tiny_model(), x, N, {"threshold": -0.1})


@pytest.fixture(scope="module")
def nqueens_run(tmp_path_factory):
    return train(tiny_config("trainer.max_batches=2"), tmp_path_factory.mktemp("runs") / "nqueens", quiet=True)


def test_eval_select_smc_reports_the_survivors_and_the_ess_trace(nqueens_run, tmp_path, capsys):
    assert "smc" in SELECTORS
    out = tmp_path / "eval"
    assert main(["eval", f"run={nqueens_run}", "samples=4", "inputs=6", "select=smc", f"out={out}"]) == 0
    assert "mean ESS by step" in capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    assert report["select"] == "smc" and report["smc"]["tempering"] == 1.0
    assert len(report["smc"]["ess_by_step"]) == report["depth"] and report["smc"]["resampled_by_step"][-1] == 1.0
    loaded = load_run(nqueens_run)
    again, arrays = evaluate_run(loaded, num_inputs=6, num_samples=4, rule="smc", smc={"tempering": 1.0})
    assert again["metrics"] == report["metrics"] and arrays["ess"].shape == (report["depth"], 6)
    for rule, options, message in [("smc", {"tempering": -2}, "smc tempering must be"),
                                   ("vote", {"tempering": 2}, "smc options apply to select=smc, not select=vote")]:
        with pytest.raises(UserError, match=message):
            evaluate_run(loaded, num_inputs=6, num_samples=4, rule=rule, smc=options)
    assert main(["eval", f"run={nqueens_run}", "samples=4", "inputs=6", "select=smc", "halting=true",
                 f"out={tmp_path / 'halting'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "takes neither halting=true nor a perturbation" in err
    source = tmp_path / "boards.jsonl"
    source.write_text('{"n": 6, "queens": [[0, 1]]}\n{"n": 6, "queens": []}\n')
    assert main(["solve", f"run={nqueens_run}", f"input={source}", "samples=3", "select=smc"]) == 0
    assert len((tmp_path / "boards.answers.jsonl").read_text().splitlines()) == 2


def test_the_smc_options_on_the_command_line(nqueens_run, tmp_path, capsys):
    runs = {name: tmp_path / name for name in ("vote", "tau0")}
    assert main(["eval", f"run={nqueens_run}", "samples=4", "inputs=6", f"out={runs['vote']}"]) == 0
    assert main(["eval", f"run={nqueens_run}", "samples=4", "inputs=6", "select=smc", "smc.tempering=0",
                 "smc.potential=halt", f"out={runs['tau0']}"]) == 0
    reports = {name: json.loads((out / "metrics.json").read_text()) for name, out in runs.items()}
    assert reports["tau0"]["smc"]["tempering"] == 0 and reports["tau0"]["smc"]["potential"] == "halt"
    assert reports["tau0"]["metrics"]["accuracy"] == reports["vote"]["metrics"]["accuracy"]  # tau 0: vote@N
    capsys.readouterr()
    for bad, message in [(["smc.tempering=2"], "the smc.* options apply to select=smc, not select=vote"),
                         (["select=smc", "smc.threshold=2"], "smc threshold must be a number in [0, 1]"),
                         (["select=smc", "smc.potential=oracle"], "unknown smc potential 'oracle'")]:
        assert main(["eval", f"run={nqueens_run}", "samples=4", "inputs=6", *bad, f"out={tmp_path / 'bad'}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err


def test_the_scaling_sweep_refuses_smc(nqueens_run, tmp_path, capsys):
    from gram_pyro.experiments.scaling import main as scaling

    assert scaling([f"runs.GRAM={nqueens_run}", "select=smc", f"out={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scaling: error: ") and "select=smc resamples while it samples" in err


def test_the_experiment_compares_at_equal_compute_and_tau_zero_is_the_vote(nqueens_run, tmp_path):
    from gram_pyro.experiments.test_time_smc import auc
    from gram_pyro.experiments.test_time_smc import main as experiment

    out = tmp_path / "smc"
    settings = "smc=[{potential:value,tempering:0.0,threshold:0.5},{potential:halt,tempering:5.0,threshold:1.0}]"
    assert experiment([f"run={nqueens_run}", "inputs=6", "samples=[2,3]", f"out={out}",
                       f"figure={tmp_path / 'docs' / 'smc.png'}", settings]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {(r["method"], r["samples"]): r for r in results["rows"]}
    assert set(rows) == {(m, n) for n in (2, 3) for m in ("vote", "lprm", "halt", "smc value tau=0 thr=0.5",
                                                           "smc halt tau=5 thr=1")}
    for n in (2, 3):
        assert {r["transitions"] for (_, size), r in rows.items() if size == n} == {n * results["depth"] * 2}
        untempered, vote = rows[("smc value tau=0 thr=0.5", n)], rows[("vote", n)]
        assert [untempered[k] for k in ("accuracy", "coverage", "pass")] == [vote[k] for k in ("accuracy", "coverage",
                                                                                                  "pass")]
        assert rows[("smc halt tau=5 thr=1", n)]["resampled_by_step"] == [1.0] * results["depth"]
    assert (out / "results.md").read_text().count("\n| smc ") == 4
    assert (tmp_path / "docs" / "smc.png").stat().st_size > 0 and (out / "results.png").exists()
    assert auc(torch.tensor([0.1, 0.4, 0.4, 0.9]), torch.tensor([False, True, False, True])) == 0.875
    assert experiment([f"run={nqueens_run}", "smc=[{tempering:-1}]", f"out={out}"]) == 2


def test_the_experiment_runs_on_a_task_without_coverage(tmp_path):
    from gram_pyro.experiments.test_time_smc import main as experiment

    cfg = compose_config("train", ["task=sudoku4", "task.num_train=8", "task.num_test=4", *TINY_MODEL])
    run = train(cfg, tmp_path / "sudoku4", quiet=True)
    out = tmp_path / "smc"
    assert experiment([f"run={run}", "inputs=4", "samples=[2]", f"out={out}",
                       "smc=[{potential:value,tempering:1.0,threshold:0.5}]"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["vote", "lprm", "halt", "smc value tau=1 thr=0.5"]
    assert all("coverage" not in r and 0 <= r["pass"]["mean"] <= 1 for r in rows)
    assert (out / "results.md").read_text().count("| – |") >= 4 and (out / "results.png").exists()
