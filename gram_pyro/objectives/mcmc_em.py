"""Monte Carlo EM: an MCMC E-step over a batch's eps sites, then an M-step on the model.

E-step: MCMC on the potential ``U(eps) = -log p_theta(y, eps | x)`` of the whole untruncated program
(every eps site of every step), started from one sample of the guide. Every potential evaluation runs
the whole program (``N_sup T`` transitions per example) and its gradient. Kernels:

* ``nuts``, ``hmc`` (``pyro.infer.mcmc``; all examples of the batch jointly): ``warmup_steps`` of
  step-size and diagonal mass adaptation, then ``num_samples`` draws. Small configs only (a few hundred
  latent units per example, ``N_sup`` and ``T`` of 2-4): a chain costs hundreds of programs.
* ``short_hmc`` (:func:`short_hmc`): HMC with a fixed short trajectory, sized to fit a training budget.
  No adaptation: a fixed ``step_size`` in units of the prior's scale at the start, ``num_steps``
  leapfrog steps per draw, ``warmup_steps`` draws discarded, then ``num_samples`` kept; a Metropolis
  test per example (the examples are independent chains). Its cost is exact (below); with
  ``num_steps = 0`` the draws are the guide's sample and the chain's cost that sample's program.

M-step: with the last ``m_step_samples`` draws ``eps^(s)`` (vectorized as particles),

    loss = -(1/S) sum_s [ log p_theta(y, eps^(s) | x) + log q_phi(eps^(s) | u, y) ] / S_tokens

The first term is the Monte Carlo EM objective (its gradient estimates ``grad log p(y | x)`` when the
draws are from the posterior); the second fits the guide to the draws with ``u``, ``eps`` and the
prior detached (it only moves the guide, which provides the next batch's starting point). One
optimizer step per batch; the ``transitions`` metric counts every potential evaluation of the chain
and the M-step's programs (and ``accept``, the mean acceptance rate of ``short_hmc``).

Cost, transitions per example and batch (``cost``), with ``draws = warmup_steps + num_samples``:

    short_hmc:  N_sup T (1 + [num_steps > 0] + draws num_steps + m_step_samples)       (exact)
    hmc, nuts:  N_sup T (1 + draws L + m_step_samples),  L = num_steps (hmc), 2^max_tree_depth (nuts)

(the guide's sample, the potential at it, one potential per leapfrog step, the M-step's draws). For
Pyro's kernels it is nominal: NUTS is counted at its largest tree and the adaptation adds some.

Short HMC, per example ``b``, with ``s`` the prior's scale of every eps unit at the start (detached; the
mass matrix is ``diag(s^-2)``, so that a step moves each unit by ``step_size`` of its prior scale):

    p ~ N(0, diag(s^-2));   K(p) = sum s^2 p^2 / 2
    num_steps times:  p <- p - (step_size / 2) grad U(eps);  eps <- eps + step_size s^2 p;
                      p <- p - (step_size / 2) grad U(eps)
    accept with probability min(1, exp(U + K - U' - K'))  (a proposal whose U' is not finite: reject)
"""

from __future__ import annotations

import torch
from pyro import poutine
from pyro.infer.mcmc import HMC, MCMC, NUTS
from pyro.poutine.trace_struct import Trace

from gram_pyro.objectives.base import Judge, exact_match, gaussian_of, per_token
from gram_pyro.objectives.particles import (ParticleObjective, log_density, noise_site, particle_plate, refit_log_prob,
                                             transitions_per_example)
from gram_pyro.tasks.base import Batch

KERNELS = ("nuts", "hmc", "short_hmc")
PYRO_KERNELS = ("nuts", "hmc")


def conditioned_program(model, batch: Batch, eps: dict[str, torch.Tensor]) -> Trace:
    """The trace of the whole program with its eps sites fixed to ``eps`` (observed)."""
    program = poutine.condition(model.forward, data=eps)
    return poutine.trace(program).get_trace(batch.x, y=batch.y, puzzle=batch.puzzle)


def guide_start(model, guide, batch: Batch) -> tuple[Trace, dict[str, torch.Tensor]]:
    """One draw of the guide over the whole program: its model trace and ``{eps site: [B, L, D]}``."""
    with torch.no_grad():
        start, _ = guide.run(model.forward, batch.x, y=batch.y, puzzle=batch.puzzle)
    return start, {name: site["value"].detach() for name, site in start.nodes.items()
                   if site["type"] == "sample" and noise_site(model, name)}


def sample_posterior(model, guide, batch: Batch, kernel: str = "nuts", num_samples: int = 20,
                     warmup_steps: int = 20, step_size: float = 0.1, num_steps: int = 8,
                     max_tree_depth: int = 4) -> tuple[dict[str, torch.Tensor], int]:
    """Draws ``{eps site: [num_samples, B, L, D]}`` from ``p(eps | x, y)`` with Pyro's NUTS or HMC and
    the transitions per example the chain ran. ``num_steps`` is HMC's trajectory length,
    ``max_tree_depth`` NUTS's."""
    if kernel not in PYRO_KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; allowed: {', '.join(PYRO_KERNELS)}")
    start, initial = guide_start(model, guide, batch)
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


def potential_and_grad(model, batch: Batch, eps: dict[str, torch.Tensor]
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """``U = -log p(y, eps | x)`` per example ``[B]``, its gradient with respect to every eps site
    ``{site: [B, L, D]}`` (the examples are independent, so the gradient of the sum is each example's)
    and the transitions per example the program ran. No gradient reaches the parameters."""
    leaves = {name: value.detach().requires_grad_() for name, value in eps.items()}
    with torch.enable_grad():
        trace = conditioned_program(model, batch, leaves)
        energy = -log_density(trace)
        grads = torch.autograd.grad(energy.sum(), list(leaves.values()))
    return energy.detach(), dict(zip(leaves, grads)), transitions_per_example(trace, batch.x.shape[0])


def _per_example(flag: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``flag [B]`` broadcast against a site value ``[B, L, D]``."""
    return flag.view(*flag.shape, *[1] * (value.dim() - flag.dim()))


def short_hmc(model, guide, batch: Batch, num_samples: int = 1, warmup_steps: int = 0, num_steps: int = 2,
              step_size: float = 0.1) -> tuple[dict[str, torch.Tensor], int, torch.Tensor]:
    """HMC with a fixed short trajectory from one guide sample (module docstring): draws
    ``{eps site: [num_samples, B, L, D]}``, the transitions per example it ran and the acceptance rate
    of each example's chain ``[B]`` (1 where it did not move)."""
    start, eps = guide_start(model, guide, batch)
    transitions = transitions_per_example(start, batch.x.shape[0])
    acceptance = torch.ones(batch.x.shape[0], device=batch.x.device)
    if num_steps == 0:
        return {name: value.expand(num_samples, *value.shape) for name, value in eps.items()}, transitions, acceptance
    variance = {name: gaussian_of(start.nodes[name]["fn"]).scale.detach() ** 2 for name in eps}  # s^2 = M^-1
    energy, grad, cost = potential_and_grad(model, batch, eps)
    transitions += cost
    accepted, draws = torch.zeros_like(acceptance), []
    for draw in range(warmup_steps + num_samples):
        momentum = {name: torch.randn_like(value) / variance[name].sqrt() for name, value in eps.items()}
        proposal, new_grad, new_momentum = dict(eps), dict(grad), dict(momentum)
        for _ in range(num_steps):
            for name in eps:
                new_momentum[name] = new_momentum[name] - step_size / 2 * new_grad[name]
                proposal[name] = proposal[name] + step_size * variance[name] * new_momentum[name]
            new_energy, new_grad, cost = potential_and_grad(model, batch, proposal)
            transitions += cost
            for name in eps:
                new_momentum[name] = new_momentum[name] - step_size / 2 * new_grad[name]
        kinetic = sum((variance[n] * momentum[n] ** 2).sum((-2, -1)) / 2 for n in eps)
        new_kinetic = sum((variance[n] * new_momentum[n] ** 2).sum((-2, -1)) / 2 for n in eps)
        log_ratio = energy + kinetic - new_energy - new_kinetic
        accept = (torch.rand_like(energy).log() < log_ratio) & torch.isfinite(new_energy)
        for name in eps:
            keep = _per_example(accept, eps[name])
            eps[name] = torch.where(keep, proposal[name], eps[name])
            grad[name] = torch.where(keep, new_grad[name], grad[name])
        energy = torch.where(accept, new_energy, energy)
        accepted += accept
        if draw >= warmup_steps:
            draws.append(dict(eps))
    samples = {name: torch.stack([d[name] for d in draws]) for name in eps}
    return samples, transitions, accepted / (warmup_steps + num_samples)


class MonteCarloEM(ParticleObjective):
    """Monte Carlo EM (module docstring); its particles are the M-step's ``m_step_samples`` draws."""

    def __init__(self, kernel: str = "nuts", num_samples: int = 20, warmup_steps: int = 20,
                 m_step_samples: int = 5, step_size: float = 0.1, num_steps: int = 8, max_tree_depth: int = 4,
                 halt_weight: float = 1.0, value_weight: float = 1.0, judge: Judge = exact_match):
        super().__init__(m_step_samples, False, halt_weight, value_weight, judge)
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; allowed: {', '.join(KERNELS)}")
        if not 1 <= m_step_samples <= num_samples:
            raise ValueError(f"need 1 <= m_step_samples <= num_samples, got {m_step_samples}, {num_samples}")
        fewest_steps = 0 if kernel == "short_hmc" else 1
        if warmup_steps < 0 or num_steps < fewest_steps or not step_size > 0:
            raise ValueError(f"need warmup_steps >= 0, num_steps >= {fewest_steps} and step_size > 0, got "
                             f"{warmup_steps}, {num_steps}, {step_size}")
        self.kernel = kernel
        self.sampler_options = dict(num_samples=num_samples, warmup_steps=warmup_steps, step_size=step_size,
                                    num_steps=num_steps)
        if kernel in PYRO_KERNELS:
            self.sampler_options.update(kernel=kernel, max_tree_depth=max_tree_depth)

    def cost(self, model) -> int:
        """The chain's programs and the M-step's ``m_step_samples``, times ``N_sup T`` (module docstring)."""
        options = self.sampler_options
        draws = options["warmup_steps"] + options["num_samples"]
        if self.kernel == "short_hmc":
            leapfrogs = draws * options["num_steps"]
            chain = 1 + int(leapfrogs > 0) + leapfrogs
        else:
            per_draw = 2 ** options["max_tree_depth"] if self.kernel == "nuts" else options["num_steps"]
            chain = 1 + draws * per_draw
        return (chain + self.num_particles) * model.n_sup * model.transitions

    def loss(self, model, guide, batch: Batch, state: dict, update: int) -> tuple[torch.Tensor, dict]:
        self.start(model)
        metrics = {}
        if self.kernel == "short_hmc":
            samples, transitions, acceptance = short_hmc(model, guide, batch, **self.sampler_options)
            metrics["accept"] = acceptance.mean()
        else:
            samples, transitions = sample_posterior(model, guide, batch, **self.sampler_options)
        draws = {name: value[-self.num_particles:] for name, value in samples.items()}
        with particle_plate(self.num_particles):
            trace = conditioned_program(model, batch, draws)
        log_joint = per_token(log_density(trace), batch.y)
        fit_guide = per_token(refit_log_prob(guide, trace, batch.y), batch.y)
        metrics.update(m_step=-log_joint, guide_fit=-fit_guide)
        return self.finish(-log_joint - fit_guide, metrics, batch, [(trace, n) for n in range(model.n_sup)],
                           transitions)
