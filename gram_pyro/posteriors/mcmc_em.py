"""Monte Carlo EM: an MCMC E-step over a batch's eps sites, then an M-step on the model.

E-step: HMC or NUTS (``pyro.infer.mcmc``) on the potential ``-log p_theta(y, eps | x)`` of the whole
untruncated program (every eps site of every step, all examples of the batch jointly), started from
one sample of the guide, ``warmup_steps`` of step-size and diagonal mass adaptation, then
``num_samples`` draws. Every potential evaluation runs the whole program (``N_sup T`` transitions per
example) and its gradient, so this is for small configs only (a few hundred latent units per example,
``N_sup`` and ``T`` of 2-4).

M-step: with the last ``m_step_samples`` draws ``eps^(s)`` (vectorized as particles),

    loss = -(1/S) sum_s [ log p_theta(y, eps^(s) | x) + log q_phi(eps^(s) | u, y) ] / S_tokens

The first term is the Monte Carlo EM objective (its gradient estimates ``grad log p(y | x)`` when the
draws are from the posterior); the second fits the guide to the draws with ``u``, ``eps`` and the
prior detached (it only moves the guide, which provides the next batch's starting point). One
optimizer step per batch; the ``transitions`` metric counts every potential evaluation of the chain.
"""

from __future__ import annotations

import torch
from pyro import poutine
from pyro.infer.mcmc import HMC, MCMC, NUTS
from pyro.poutine.trace_struct import Trace

from gram_pyro.objectives import Judge, exact_match, per_token
from gram_pyro.posteriors.particles import (ParticleObjective, log_density, noise_site, particle_plate, refit_log_prob,
                                            transitions_per_example)
from gram_pyro.tasks.base import Batch

KERNELS = ("nuts", "hmc")


def conditioned_program(model, batch: Batch, eps: dict[str, torch.Tensor]) -> Trace:
    """The trace of the whole program with its eps sites fixed to ``eps`` (observed)."""
    program = poutine.condition(model.forward, data=eps)
    return poutine.trace(program).get_trace(batch.x, y=batch.y, puzzle=batch.puzzle)


def sample_posterior(model, guide, batch: Batch, kernel: str = "nuts", num_samples: int = 20,
                     warmup_steps: int = 20, step_size: float = 0.1, num_steps: int = 8,
                     max_tree_depth: int = 4) -> tuple[dict[str, torch.Tensor], int]:
    """Draws ``{eps site: [num_samples, B, L, D]}`` from ``p(eps | x, y)`` and the transitions per
    example the chain ran. ``num_steps`` is HMC's trajectory length, ``max_tree_depth`` NUTS's."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; allowed: {', '.join(KERNELS)}")
    with torch.no_grad():
        start, _ = guide.run(model.forward, batch.x, y=batch.y, puzzle=batch.puzzle)
    initial = {name: site["value"].detach() for name, site in start.nodes.items()
               if site["type"] == "sample" and noise_site(model, name)}
    transitions = [transitions_per_example(start, batch.x.shape[0])]

    def potential(eps: dict[str, torch.Tensor]) -> torch.Tensor:
        trace = conditioned_program(model, batch, eps)
        transitions[0] += transitions_per_example(trace, batch.x.shape[0])
        return -log_density(trace).sum()

    if kernel == "nuts":
        sampler = NUTS(potential_fn=potential, step_size=step_size, max_tree_depth=max_tree_depth)
    else:
        sampler = HMC(potential_fn=potential, step_size=step_size, num_steps=num_steps)
    mcmc = MCMC(sampler, num_samples=num_samples, warmup_steps=warmup_steps, initial_params=initial,
                disable_progbar=True)
    mcmc.run()
    return mcmc.get_samples(), transitions[0]


class MonteCarloEM(ParticleObjective):
    def __init__(self, kernel: str = "nuts", num_samples: int = 20, warmup_steps: int = 20,
                 m_step_samples: int = 5, step_size: float = 0.1, num_steps: int = 8, max_tree_depth: int = 4,
                 halt_weight: float = 1.0, value_weight: float = 1.0, judge: Judge = exact_match):
        super().__init__(m_step_samples, False, halt_weight, value_weight, judge)
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; allowed: {', '.join(KERNELS)}")
        if not 1 <= m_step_samples <= num_samples:
            raise ValueError(f"need 1 <= m_step_samples <= num_samples, got {m_step_samples}, {num_samples}")
        self.sampler_options = dict(kernel=kernel, num_samples=num_samples, warmup_steps=warmup_steps,
                                    step_size=step_size, num_steps=num_steps, max_tree_depth=max_tree_depth)

    def loss(self, model, guide, batch: Batch, state: dict, update: int) -> tuple[torch.Tensor, dict]:
        self.start(model)
        samples, transitions = sample_posterior(model, guide, batch, **self.sampler_options)
        draws = {name: value[-self.num_particles:] for name, value in samples.items()}
        with particle_plate(self.num_particles):
            trace = conditioned_program(model, batch, draws)
        log_joint = per_token(log_density(trace), batch.y)
        fit_guide = per_token(refit_log_prob(guide, trace, batch.y), batch.y)
        metrics = {"m_step": -log_joint, "guide_fit": -fit_guide}
        return self.finish(-log_joint - fit_guide, metrics, batch, [(trace, n) for n in range(model.n_sup)],
                           transitions)
