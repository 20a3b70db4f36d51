"""What the particle schemes share: particle runs, log weights, head losses, costs.

Particles. ``K`` samples per input are a leading tensor dim: the plate ``particles`` at dim
``-(MAX_PLATE_NESTING + 1) = -2`` around the model program, outside its ``data`` plate. ``init``
expands ``z0`` over the enclosing plates, so under the plate it gives states ``[K, B, L, D]`` and every
later site has batch shape ``[K, B]``: one backbone pass per transition serves all particles.

Log terms of a trace (one supervision step, or the whole program) per particle and example ``[K, B]``:

    log_lik   = sum_n log p(y/n | z_T^(n))                               (observed sites)
    log_prior = sum over eps sites of log p(eps | u)                    (all of them)
    log_ratio = sum over eps sites the guide covers of log p(eps | u) - log q(eps | u, y)
    log_weight = log_lik + log_ratio = log p(y, eps) / q(eps)           (uncovered sites: q = p)

``log_weight`` is the importance weight of the trace; ``log_lik + log_prior`` its log joint.

Costs. ``cost(model)`` is ``K N_sup T`` transitions per example and batch by default (``K`` particles
through ``N_sup`` supervision steps of ``T`` transitions, truncated or not); a scheme that runs more
says so. ``transitions_per_example`` counts the transitions a trace ran, summed over particles, per
example (read off the ``u/{n}/{t}`` sites, which every transition records). A transition of the
recursive model is ``K_low + 1`` backbone passes. Each scheme reports that count as ``transitions``
and ``forward_seconds``, the wall time of its loss computation (the backward pass and the optimizer
step happen in the trainer), in its metrics; summed over a batch's updates the count is ``cost``
(nominal for MCMC-EM with Pyro's kernels, :mod:`gram_pyro.objectives.mcmc_em`).
"""

from __future__ import annotations

import math
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.poutine.trace_struct import Trace

from gram_pyro.objectives.base import Judge, Objective, exact_match, gaussian_of, head_losses
from gram_pyro.tasks.base import Batch
from gram_pyro.guides.base import proposal_site
from gram_pyro.models.recursive import MAX_PLATE_NESTING

PARTICLE_DIM = -(MAX_PLATE_NESTING + 1)


def particle_plate(num_particles: int) -> pyro.plate:
    return pyro.plate("particles", num_particles, dim=PARTICLE_DIM)


def log_mean_exp(log_w: torch.Tensor) -> torch.Tensor:
    """``log (1/K) sum_k exp(log_w[k])`` over the leading (particle) dim."""
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """``(sum_k w_k)^2 / sum_k w_k^2`` over the leading dim (between 1 and ``K``)."""
    return (2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)).exp()


def fraction(name: str, value: float) -> float:
    """``value`` if it lies in [0, 1], else a one-line ValueError naming the option."""
    if not 0 <= value <= 1:
        raise ValueError(f"need 0 <= {name} <= 1, got {value}")
    return value


def noise_site(model, name: str) -> bool:
    return name.split("/", 1)[0] in model.noise_sites


class LogTerms:
    """``log_lik``, ``log_prior`` and ``log_ratio`` (module docstring) of a model trace and its guide
    trace, each ``[..., B]``; ``transition`` restricts the eps sites to that transition index."""

    def __init__(self, model, guide, model_trace: Trace, guide_trace: Trace, transition: int | None = None):
        self.log_lik = self.log_prior = self.log_ratio = torch.zeros(())
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site["infer"].get("_deterministic"):
                continue
            if site["is_observed"]:
                self.log_lik = self.log_lik + site["fn"].log_prob(site["value"])
            elif noise_site(model, name) and transition in (None, int(name.rsplit("/", 1)[1])):
                log_p = site["fn"].log_prob(site["value"])
                self.log_prior = self.log_prior + log_p
                if guide.covers(name):
                    self.log_ratio = self.log_ratio + log_p - guide_trace.nodes[name]["fn"].log_prob(site["value"])

    @property
    def log_weight(self) -> torch.Tensor:
        return self.log_lik + self.log_ratio

    @property
    def log_joint(self) -> torch.Tensor:
        return self.log_lik + self.log_prior


def log_density(trace: Trace) -> torch.Tensor:
    """``sum log p`` over the sample sites of ``trace``, observed or not (deterministic ones aside):
    the log joint ``[..., B]`` of a program whose latent sites were sampled or conditioned."""
    return sum((site["fn"].log_prob(site["value"]) for site in trace.nodes.values()
                if site["type"] == "sample" and not site["infer"].get("_deterministic")), torch.zeros(()))


def detached_prior(prior) -> dist.Distribution:
    """A copy of a Gaussian prior ``Normal(...).to_event(2)`` with its parameters detached."""
    normal = gaussian_of(prior)
    return dist.Normal(normal.loc.detach(), normal.scale.detach()).to_event(2)


def refit_log_prob(guide, model_trace: Trace, y: torch.Tensor) -> torch.Tensor:
    """``sum log q_phi(eps | u, y)`` over the covered eps sites of ``model_trace`` (sampled or
    conditioned) with ``eps``, ``u`` and the prior detached, so its gradient reaches the guide's
    parameters only (wake-phi, sleep-phi, fitting the guide to MCMC draws). ``[..., B]``; zero for a
    guide without parameters."""
    total = torch.zeros(())
    if not any(True for _ in guide.parameters()):
        return total
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and noise_site(guide.model, name) and guide.covers(name):
            u = model_trace.nodes[proposal_site(name)]["value"].detach()
            q = guide.posterior(name.split("/", 1)[0], u, y, detached_prior(site["fn"]))
            total = total + q.log_prob(site["value"].detach())
    return total


def transitions_per_example(trace: Trace, batch_size: int) -> int:
    """Transitions the program behind ``trace`` ran, summed over particles, divided by ``B``."""
    count = sum(site["value"][..., 0, 0].numel() for name, site in trace.nodes.items() if name.startswith("u/"))
    return count // batch_size


def init_particles(model, batch: Batch, state: dict, num_particles: int) -> None:
    """``state`` <- ``num_particles`` copies of z0 per input (a fresh state)."""
    state.clear()
    with particle_plate(num_particles):
        model.init(state, batch.x)


def run_step(model, guide, batch: Batch, state: dict, num_particles: int, truncate: bool = True) -> tuple[Trace, Trace]:
    """One supervision step of all particles in ``state`` under the guide: ``(model_trace, guide_trace)``."""
    with particle_plate(num_particles):
        return guide.run(model.step, state, batch.x, y=batch.y, truncate=truncate, puzzle=batch.puzzle)


def run_program(model, guide, batch: Batch, num_particles: int) -> tuple[Trace, Trace]:
    """The whole untruncated program (``init`` and ``N_sup`` steps) of ``num_particles`` particles."""
    with particle_plate(num_particles):
        return guide.run(model.forward, batch.x, y=batch.y, puzzle=batch.puzzle)


class ParticleObjective(Objective):
    """Base of the particle schemes: the :class:`~gram_pyro.objectives.base.Objective` interface
    (``judge`` and head-loss weights as there), the stochastic-model check, the particle run of an
    update, head losses, the cost ``K N_sup T`` and the cost metrics. ``truncate``: one optimizer step
    per supervision step (the update's step alone, state detached between steps) rather than one per
    batch (the whole untruncated program)."""

    def __init__(self, num_particles: int = 8, truncate: bool = True, halt_weight: float = 1.0,
                 value_weight: float = 1.0, judge: Judge = exact_match):
        if num_particles < 1:
            raise ValueError(f"num_particles must be at least 1, got {num_particles}")
        self.num_particles, self.truncate = num_particles, truncate
        self.halt_weight, self.value_weight, self.judge = halt_weight, value_weight, judge
        self._started = 0.0

    def check(self, model, guide=None) -> None:
        if not getattr(model, "stochastic", False):
            raise ValueError(f"{type(self).__name__} needs a stochastic model (noise != 'none'): "
                             "a deterministic model has no posterior; use objective=truncated with guide=prior")

    def updates_per_batch(self, model) -> int:
        self.check(model)
        return model.n_sup if self.truncate else 1

    def cost(self, model) -> int:
        """``K N_sup T``: ``K`` particles through every supervision step, truncated or not."""
        return self.num_particles * model.n_sup * model.transitions

    def run_particles(self, model, guide, batch: Batch, state: dict, update: int) -> tuple[Trace, Trace, list[int]]:
        """The particles' run of ``update``: supervision step ``update`` (from fresh particles at
        update 0) or the whole program. Returns both traces and the supervision steps they hold."""
        if not self.truncate:
            return (*run_program(model, guide, batch, self.num_particles), list(range(model.n_sup)))
        if update == 0:
            init_particles(model, batch, state, self.num_particles)
        return (*run_step(model, guide, batch, state, self.num_particles), [update])

    def start(self, model) -> None:
        """Check the model and start the loss's clock."""
        self.check(model)
        self._started = time.perf_counter()

    def finish(self, loss: torch.Tensor, metrics: dict, batch: Batch, traces: list[tuple[Trace, int]],
               extra_transitions: int = 0) -> tuple[torch.Tensor, dict]:
        """Add to ``loss`` the head losses (models with halt/value heads) of the supervision steps
        ``(trace holding step n, n)`` in ``traces``, averaged over them. Metrics: ``loss`` and the costs
        ``transitions`` (per example: those of the distinct traces plus ``extra_transitions`` run
        elsewhere) and ``forward_seconds`` (module docstring)."""
        if f"halt/{traces[0][1]}" in traces[0][0].nodes:
            halt = value = torch.zeros(())
            for trace, n in traces:
                step_halt, step_value, correct = head_losses(trace, batch.x, batch.y, n, self.judge)
                halt, value = halt + step_halt / len(traces), value + step_value / len(traces)
            loss = loss + self.halt_weight * halt + self.value_weight * value
            metrics.update(halt=halt, value=value, acc=correct.mean())
        transitions = extra_transitions + sum(
            transitions_per_example(trace, batch.x.shape[0]) for trace in {id(t): t for t, _ in traces}.values())
        metrics.update(loss=loss, transitions=torch.tensor(float(transitions), device=loss.device),
                       forward_seconds=torch.tensor(time.perf_counter() - self._started, device=loss.device))
        return loss, metrics
