"""Guide particles: ``K`` draws of ``q(eps | x, y)`` per input through the whole untruncated program,
and the importance diagnostics of the guide as a proposal.

Particles are a tensor dim (the plate ``particles`` at dim -2 of
:mod:`gram_pyro.objectives.particles`), chunked over particles and inputs to a memory budget
(:func:`gram_pyro.inference.plan_chunks`). For particle ``k`` of input ``b``, supervision step ``n``
and transition ``t``:

    log_weight[k, b]     = log p(y, eps^(k) | x) - log q(eps^(k) | x, y)            cast to float64
    kl[k, b, n, t]       = KL(q(eps_t^(n) | u, y) || p(eps_t^(n) | u))              nats, summed over [L, D]
    kl_units[n, t, l, d] = the same KL per latent unit, averaged over particles and inputs
    log_lik[k, b, n]     = log p(y | z_T^(n))
    step_answers[k, b, n, S]  = argmax of step n's logits                          (token models only)
    projection[k, b, n, t, j] = <eps_t^(n), v_j>,  v_j fixed random unit vectors in R^{L D}

The KL is analytic when ``q`` and ``p`` are Normal (every unit then has its own KL); for other
guide families it is the one-draw Monte Carlo estimate ``log q(eps) - log p(eps)`` and ``kl_units``
is NaN at that transition. Where the guide does not cover a site (``posterior_transitions="last"``)
``q = p`` and the KL is 0. KLs sum over the model's noise sites (``eps``, and ``eps_l`` where
present); the projection is of the ``eps`` site.

Diagnostics over the ``K`` weights of an input: the PSIS shape ``k-hat`` (a generalized Pareto fit
to the largest weights, in float64; above ``KHAT_LIMIT`` = 0.7 the importance estimate, and the guide as a proposal,
cannot be trusted) and the ESS ``(sum w)^2 / sum w^2`` in ``[1, K]``. Weights equal to within
``CONSTANT_SPREAD`` nats (the guide is the exact posterior) have no tail to fit: their k-hat is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from pyro.poutine.trace_struct import Trace
from torch.distributions import kl_divergence

from gram_pyro.diagnostics.arviz_adapter import pareto_khat
from gram_pyro.inference import default_memory_budget_mb, plan_chunks, trajectory_bytes
from gram_pyro.objectives.base import gaussian_of, step_logits
from gram_pyro.objectives.particles import LogTerms, effective_sample_size, noise_site, run_program
from gram_pyro.tasks.base import Batch

CONSTANT_SPREAD = 1e-6
"""Log weights of an input that span less than this (nats) count as constant."""
KHAT_LIMIT = 0.7
"""Above this PSIS k-hat the importance estimate is unreliable (Vehtari et al., 2024)."""
PROJECTION_DIMS = ("input", "step", "transition", "projection")
"""The dims of a projection ``[..., M, N_sup, T, P]`` after its draw dims, as named in InferenceData."""


@dataclass
class GuideParticles:
    """The particle quantities of the module docstring (``K`` particles, ``M`` inputs)."""

    log_weight: torch.Tensor          # [K, M] float64
    kl: torch.Tensor                  # [K, M, N_sup, T]
    kl_units: torch.Tensor            # [N_sup, T, L, D]
    log_lik: torch.Tensor             # [K, M, N_sup]
    projection: torch.Tensor | None    # [K, M, N_sup, T, P]
    step_answers: torch.Tensor | None  # [K, M, N_sup, S]


def random_directions(num: int, size: int, seed: int) -> torch.Tensor:
    """``num`` fixed random unit vectors ``[num, size]`` (seeded, isotropic)."""
    directions = torch.randn(num, size, generator=torch.Generator().manual_seed(seed))
    return directions / directions.norm(dim=-1, keepdim=True)


def project_eps(values: Mapping[str, torch.Tensor], directions: torch.Tensor, n_sup: int,
                transitions: int) -> torch.Tensor:
    """``<eps/{n}/{t}, v_j>`` for every transition: ``values[site] [..., L, D]`` -> ``[..., N_sup, T, P]``."""
    per_site = [values[f"eps/{n}/{t}"].flatten(-2) @ directions.T.to(values[f"eps/{n}/{t}"].dtype)
                for n in range(n_sup) for t in range(transitions)]
    return torch.stack(per_site, -2).unflatten(-2, (n_sup, transitions))


def site_kl(q, p, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``KL(q || p)`` summed over the event dims ``[..., B]`` and per unit ``[..., B, L, D]``
    (analytic, Normal ``q`` and ``p``), or the one-draw estimate ``log q(eps) - log p(eps)`` and
    ``None`` for other families."""
    try:
        q_normal, p_normal = gaussian_of(q), gaussian_of(p)
    except TypeError:
        return q.log_prob(eps) - p.log_prob(eps), None
    per_unit = kl_divergence(q_normal, p_normal)
    return per_unit.flatten(-2).sum(-1), per_unit


def _chunk_terms(model, guide, model_trace: Trace, guide_trace: Trace, directions: torch.Tensor | None,
                 decode: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The per-particle tensors of one chunk, each ``[k, b, ...]``, and the chunk's per-unit KL
    summed over its particles and inputs ``[N_sup, T, L, D]``."""
    n_sup, transitions = model.n_sup, model.transitions
    steps = [model_trace.nodes[f"y/{n}"] for n in range(n_sup)]
    log_lik = torch.stack([site["fn"].log_prob(site["value"]) for site in steps], -1)
    kl = log_lik.new_zeros(*log_lik.shape[:-1], n_sup, transitions)
    kl_units = log_lik.new_zeros(n_sup, transitions, *model.h0.shape)
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or not noise_site(model, name) or not guide.covers(name):
            continue
        n, t = (int(i) for i in name.split("/")[1:])
        total, per_unit = site_kl(guide_trace.nodes[name]["fn"], site["fn"], site["value"])
        kl[..., n, t] += total
        kl_units[n, t] += torch.nan if per_unit is None else per_unit.flatten(0, -3).sum(0)
    terms = {"log_weight": LogTerms(model, guide, model_trace, guide_trace).log_weight.double(),
             "kl": kl, "log_lik": log_lik}
    if directions is not None:
        eps = {name: site["value"] for name, site in model_trace.nodes.items() if name.startswith("eps/")}
        terms["projection"] = project_eps(eps, directions, n_sup, transitions)
    if decode:
        terms["step_answers"] = torch.stack([step_logits(model_trace, n).argmax(-1) for n in range(n_sup)], -2)
    return terms, kl_units


@torch.no_grad()
def guide_particles(model, guide, batch: Batch, num_particles: int, directions: torch.Tensor | None = None,
                    decode: bool = True, memory_budget_mb: float | None = None) -> GuideParticles:
    """:class:`GuideParticles` of ``num_particles`` draws of the guide for every input of ``batch``;
    the eps projections on ``directions [P, L D]`` where given; with ``decode`` the answers of every
    step (models with a token decoder). ``memory_budget_mb`` defaults to
    :func:`gram_pyro.inference.default_memory_budget_mb` of the batch's device."""
    inputs = batch.x.shape[0]
    budget_mb = default_memory_budget_mb(batch.x.device) if memory_budget_mb is None else memory_budget_mb
    per_chunk, inputs_per_chunk = plan_chunks(num_particles, inputs, trajectory_bytes(model, 1), budget_mb * 2**20)
    rows_of_chunks, kl_unit_sum = [], 0
    for row in range(0, inputs, inputs_per_chunk):
        rows = slice(row, row + inputs_per_chunk)
        part = batch.rows(rows)
        chunks = []
        for first in range(0, num_particles, per_chunk):
            traces = run_program(model, guide, part, min(per_chunk, num_particles - first))
            terms, unit_sum = _chunk_terms(model, guide, *traces, directions, decode)
            chunks.append(terms)
            kl_unit_sum = kl_unit_sum + unit_sum
        rows_of_chunks.append({key: torch.cat([c[key] for c in chunks]) for key in chunks[0]})
    out = {key: torch.cat([r[key] for r in rows_of_chunks], 1) for key in rows_of_chunks[0]}
    return GuideParticles(out["log_weight"], out["kl"], kl_unit_sum / (num_particles * inputs), out["log_lik"],
                          out.get("projection"), out.get("step_answers"))


def importance_khat(log_weight: torch.Tensor) -> torch.Tensor:
    """PSIS k-hat per input ``[M]`` (float64) of the log weights ``[K, M]``; 0 for constant weights."""
    log_weight = log_weight.double()
    khat = torch.from_numpy(pareto_khat(log_weight.T.cpu().numpy()))
    constant = (log_weight.amax(0) - log_weight.amin(0)).cpu() < CONSTANT_SPREAD
    return torch.where(constant, torch.zeros_like(khat), khat)


def importance_ess(log_weight: torch.Tensor) -> torch.Tensor:
    """Effective sample size per input ``[M]`` of the log weights ``[K, M]``, in ``[1, K]``."""
    return effective_sample_size(log_weight.double())
