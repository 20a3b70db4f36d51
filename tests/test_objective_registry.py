"""Every config of ``experiments/configs/objective/`` builds an :class:`Objective` (with the train config's
guide, which every scheme trains with) whose ``cost`` follows the rule its module documents, and one
batch runs exactly that many transitions per example (``mcmc_em``, Pyro's kernels, aside: its cost is
nominal, the largest trajectories without the adaptation's extra evaluations)."""

import pytest
import torch
from omegaconf import OmegaConf

from gram_pyro.config import build, compose_config, group_options
from gram_pyro.objectives import Objective
from gram_pyro.tasks.base import Batch
from tests.conftest import tiny_model

N_SUP, T = 3, 2


def mcmc_em_programs(o) -> int:
    draws = o.warmup_steps + o.num_samples
    if o.kernel == "short_hmc":  # guide sample, potential at it (if the chain moves), leapfrogs, M-step
        return 1 + int(o.num_steps > 0) + draws * o.num_steps + o.m_step_samples
    return 1 + draws * (2 ** o.max_tree_depth if o.kernel == "nuts" else o.num_steps) + o.m_step_samples


PROGRAMS = {  # config: whole programs (N_sup T transitions) one batch runs per example, from its options
    "truncated": lambda o: 2 if o.prior_weight or o.overshoot_weight else 1,
    "truncated_mc": lambda o: 1,
    "trace_elbo": lambda o: o.num_particles,
    "tracemeanfield_elbo": lambda o: o.num_particles,
    "iwae": lambda o: o.num_particles,
    "smc": lambda o: o.num_particles,
    "rws": lambda o: o.num_particles * (2 if o.insomnia < 1 else 1),
    "mcmc_em": mcmc_em_programs,
    "mcmc_em_short": mcmc_em_programs,
}
CASES = [(name, []) for name in group_options("objective")] + [
    ("truncated", ["objective.prior_weight=0.5"]),
    ("truncated", ["objective.overshoot_weight=1"]),
    ("trace_elbo", ["objective.num_particles=3"]),
    ("iwae", ["objective.truncate=false"]),
    ("smc", ["objective.truncate=false"]),
    ("rws", ["objective.insomnia=0.5"]),
    ("rws", ["objective.insomnia=0.5", "objective.truncate=false"]),
    ("mcmc_em", ["objective.kernel=hmc"]),
    ("mcmc_em_short", ["objective.num_steps=0"]),
]


def built(name: str, overrides: list[str]):
    cfg = compose_config("train", [f"objective={name}", *overrides])
    model = tiny_model(n_sup=N_SUP, transitions=T)
    return cfg.objective, model, build(cfg.guide, "guide", model=model), build(cfg.objective, "objective")


def test_every_objective_config_has_a_rule():
    assert sorted(PROGRAMS) == group_options("objective")


@pytest.mark.parametrize("name, overrides", CASES)
def test_config_builds_an_objective_whose_cost_follows_its_rule(name, overrides):
    options, model, guide, objective = built(name, overrides)
    assert isinstance(objective, Objective)
    assert objective.check(model, guide) is None
    expected = PROGRAMS[name](options) * N_SUP * T
    assert objective.cost(model) == expected
    assert objective.cost(OmegaConf.create({"n_sup": N_SUP, "transitions": T})) == expected  # a model config


@pytest.mark.parametrize("name, overrides", [case for case in CASES if case[0] != "mcmc_em"])
def test_one_batch_runs_what_the_cost_says(name, overrides, data, one_thread):
    _, model, guide, objective = built(name, overrides)
    rows = []
    propose = model.core.propose_high  # called once per transition, on every particle's state

    def counting(h, l):
        rows.append(torch.broadcast_shapes(h.shape, l.shape)[:-2].numel())
        return propose(h, l)

    model.core.propose_high = counting
    x, y = data
    state: dict = {}
    for update in range(objective.updates_per_batch(model)):
        objective.loss(model, guide, Batch(x, y), state, update)
    assert sum(rows) == objective.cost(model) * x.shape[0]


@pytest.mark.parametrize("overrides, chained_batches", [
    (["objective.prior_weight=0.5", "objective.prior_start=2"], 2),  # batches 3 and 4 run the prior chain
    (["objective.prior_weight=0.5", "objective.prior_start=9"], 0),
    (["objective.prior_start=2"], 0),                                 # no prior chain at all
])
def test_a_run_costs_what_its_batches_ran(overrides, chained_batches, data, one_thread):
    _, model, guide, objective = built("truncated", overrides)
    rows = []
    propose = model.core.propose_high

    def counting(h, l):
        rows.append(torch.broadcast_shapes(h.shape, l.shape)[:-2].numel())
        return propose(h, l)

    model.core.propose_high = counting
    x, y = data
    for _ in range(4):
        state: dict = {}
        for update in range(objective.updates_per_batch(model)):
            objective.loss(model, guide, Batch(x, y), state, update)
    assert objective.run_cost(model, 4) == (4 + chained_batches) * N_SUP * T
    assert sum(rows) == objective.run_cost(model, 4) * x.shape[0]
