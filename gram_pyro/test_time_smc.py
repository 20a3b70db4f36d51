"""Test-time SMC over trajectories: ``N`` prior trajectories per input advanced one supervision step at
a time, weighted by a potential read off the value or halt head, resampled when their effective sample
size drops, and answered by a vote among the survivors (``select=smc``).

Target. With ``v_n^(i)`` the potential head of trajectory ``i`` after supervision step ``n``
(``potential=value``: the LPRM value ``sigmoid(value logit)``; ``potential=halt``:
``sigmoid(halt logit)``) and the tempering ``tau >= 0``, the population targets

    pi(trajectory | x) ∝ p(trajectory | x) * v_{D-1}(trajectory)^tau

over trajectories of depth ``D`` drawn from the prior (as ``N`` grows). The intermediate potentials only
steer the population towards it: the incremental weights telescope.

Algorithm, per input (``[N, B]`` for a chunk of ``B`` inputs; every trajectory of an input in one chunk):

    log W = 0, log G_{-1} = 0
    for n = 0 .. D-1:
        advance every trajectory one supervision step (its own keyed noise)
        log G_n = tau * log v_n                                           [N, B]
        log W  <- log W + log G_n - log G_{n-1}       (w_n = v_n^tau / v_{n-1}^tau)
        ESS_n  = (sum_i W_i)^2 / sum_i W_i^2                              [B], recorded
        where ESS_n < threshold * N, or n = D - 1: resample (systematic), log W <- 0
    answer: the majority vote among the N survivors' final answers (gram_pyro.selection)

Resampling copies the ancestor's state ``(h, l)``, its last ``log G`` and its answer and heads; each copy
then goes on with the noise of its own lane, so copies of one ancestor diverge. The final resampling
makes the survivors an equally weighted sample of ``pi``, which the vote then counts.

Randomness. The trajectories' noise is the keyed streams of :mod:`gram_pyro.inference`; the uniform
offset ``u_b`` of each systematic resampling is draw ``n`` of lane ``-1`` (no trajectory's lane) of input
row ``b``. So the result is a function of ``(seed, model, x, N, options)``: independent of how the
inputs are chunked and of the other inputs. Unlike independent sampling, trajectory ``i`` depends on
``N`` (resampling couples the population).

Special cases: ``tau = 0`` is vote@N over exactly the trajectories :func:`sample_trajectories` draws
(the weights stay uniform, and systematic resampling of uniform weights keeps every trajectory);
``threshold = 0`` resamples only at the end: importance resampling of ``N`` prior trajectories by
``v_{D-1}^tau``, which as ``tau`` grows becomes best-of-N by the potential.

Cost: ``N`` trajectories of ``D`` steps, what vote@N and best-of-N cost; resampling gathers states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Mapping

import pyro
import torch
import torch.nn.functional as F

from gram_pyro.config import UserError
from gram_pyro.inference import (HeadRecorder, KeyedNoise, KeyedRandom, Trajectories, _is_number, check_result_size,
                                 resolve_sampling, trajectory_bytes)
from gram_pyro.objectives.particles import effective_sample_size
from gram_pyro.objectives.smc import systematic_ancestors

POTENTIALS = ("value", "halt")
RESAMPLER_LANE = -1
"""The keyed-stream lane of the resampler's uniforms (trajectories have lanes ``0 .. N-1``)."""


@dataclass(frozen=True)
class SMCOptions:
    """``tempering`` (``tau >= 0``), ``threshold`` (resample where ``ESS < threshold * N``, in [0, 1])
    and ``potential`` (``value`` | ``halt``) of test-time SMC (module docstring)."""

    tempering: float = 1.0
    threshold: float = 0.5
    potential: str = "value"

    def __post_init__(self):
        if self.potential not in POTENTIALS:
            raise UserError(f"unknown smc potential {self.potential!r}; allowed: {', '.join(POTENTIALS)}")
        if not (_is_number(self.tempering) and math.isfinite(self.tempering) and self.tempering >= 0):
            raise UserError(f"smc tempering must be a finite number >= 0, got {self.tempering!r}")
        if not (_is_number(self.threshold) and 0 <= self.threshold <= 1):
            raise UserError(f"smc threshold must be a number in [0, 1], got {self.threshold!r}")


def as_smc_options(spec: SMCOptions | Mapping | None) -> SMCOptions:
    """:class:`SMCOptions` from itself, a mapping of its fields (a config node) or ``None`` (defaults)."""
    if spec is None:
        return SMCOptions()
    if isinstance(spec, SMCOptions):
        return spec
    allowed = [f.name for f in fields(SMCOptions)]
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise UserError(f"unknown smc option {unknown[0]!r}; allowed: {', '.join(allowed)}")
    return SMCOptions(**spec)


@dataclass
class SMCResult:
    """The survivors as :class:`Trajectories` (``answers [N, B, S]``, final ``value`` and ``halt_logit``
    ``[N, B]``, ``steps = D``), ``ess [D, B]`` (after weighting step ``n``, before its resampling) and
    ``resampled [D, B]`` (whether an input was resampled after step ``n``; always at the last step)."""

    trajectories: Trajectories
    ess: torch.Tensor
    resampled: torch.Tensor


def log_potential(potential: str, value: torch.Tensor, halt_logit: torch.Tensor) -> torch.Tensor:
    """``log v`` ``[N, B]``: ``log value`` (clamped to the smallest positive float, as a sigmoid can
    underflow to 0) or ``log sigmoid(halt_logit)``."""
    if potential == "halt":
        return F.logsigmoid(halt_logit)
    return value.clamp_min(torch.finfo(value.dtype).tiny).log()


def smc_sweep(advance: Callable[[int], torch.Tensor], reorder: Callable[[torch.Tensor], None], depth: int,
              options: SMCOptions, offsets: Callable[[int], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighting and resampling of the module docstring, for any population: ``advance(n)`` moves
    every particle one step and returns its ``log v_n`` ``[N, B]``; ``reorder(ancestors [N, B])`` makes
    particle ``i`` of input ``b`` a copy of particle ``ancestors[i, b]``; ``offsets(n)`` gives the uniforms
    ``[B]`` of step ``n``'s systematic resampling (called once per step). Returns
    ``(ess [D, B], resampled [D, B])``; log weights are float64."""
    log_w = prev = None
    ess, resampled = [], []
    for n in range(depth):
        log_g = options.tempering * advance(n).double()
        log_w = log_g if log_w is None else log_w + log_g - prev
        log_w = log_w - torch.logsumexp(log_w, 0)
        prev = log_g
        num = log_w.shape[0]
        ess.append(effective_sample_size(log_w))
        low = (ess[-1] < options.threshold * num) | (n == depth - 1)
        uniforms = offsets(n).double()  # drawn at every step, so that draw n belongs to step n
        if low.any():
            keep = torch.arange(num, device=log_w.device)[:, None]
            ancestors = torch.where(low, systematic_ancestors(log_w, uniforms), keep)
            reorder(ancestors)
            prev = prev.gather(0, ancestors)
            log_w = torch.where(low, torch.full_like(log_w, -math.log(num)), log_w)
        resampled.append(low)
    return torch.stack(ess), torch.stack(resampled)


def _gather(tensor: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
    """``tensor[ancestors[i, b], b, ...]`` for a tensor ``[N | 1, B | 1, ...]`` and ``ancestors [N, B]``."""
    tensor = tensor.expand(*ancestors.shape, *tensor.shape[2:])
    index = ancestors.view(*ancestors.shape, *[1] * (tensor.dim() - 2)).expand_as(tensor)
    return tensor.gather(0, index)


def _smc_chunk(model, x: torch.Tensor, puzzle: torch.Tensor | None, depth: int, options: SMCOptions,
               keyed: KeyedRandom, resampler: KeyedRandom, prior_temperature: float
               ) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """One chunk of inputs ``x [b, S]`` with all ``len(keyed)`` trajectories: the survivors' fields
    (``answers``, ``value``, ``halt_logit``, each ``[N, b, ...]``), ``ess`` and ``resampled`` ``[D, b]``."""
    state: dict = {}
    current: dict = {}
    heads = HeadRecorder()

    def advance(n: int) -> torch.Tensor:
        current["answers"] = model.step(state, x, puzzle=puzzle).argmax(-1)
        current["value"], current["halt_logit"] = heads.values["value"], heads.values["halt"]
        return log_potential(options.potential, current["value"], current["halt_logit"])

    def reorder(ancestors: torch.Tensor) -> None:
        for store in (state, current):
            for key, tensor in store.items():
                store[key] = _gather(tensor, ancestors)

    noise = KeyedNoise(model.noise_sites, keyed, prior_temperature)
    with pyro.plate("trajectories", len(keyed), dim=-2), noise, heads:
        model.init(state, x)
        ess, resampled = smc_sweep(advance, reorder, depth, options, lambda n: resampler.uniform(torch.Size())[0])
    return current, ess, resampled


@torch.no_grad()
def smc_trajectories(model, x: torch.Tensor, num_samples: int, options: SMCOptions | Mapping | None = None,
                     depth: int | None = None, puzzle: torch.Tensor | None = None,
                     memory_budget_mb: float | None = None, seed: int | None = None, first_row: int = 0,
                     prior_temperature: float = 1.0) -> SMCResult:
    """Test-time SMC with ``num_samples`` trajectories of ``depth`` (default ``model.n_sup``) steps for
    each input of ``x [B, S]`` (module docstring). Arguments as
    :func:`gram_pyro.inference.sample_trajectories`; a chunk holds all ``N`` trajectories of as many
    inputs as ``memory_budget_mb`` allows (at least one)."""
    options = as_smc_options(options)
    if not model.stochastic:
        raise UserError("select=smc needs a stochastic model (noise != none): a deterministic model's "
                        "trajectories are all the same")
    depth, memory_budget_mb, seed = resolve_sampling(model, x, num_samples, depth, memory_budget_mb, seed,
                                                     prior_temperature)
    batch = x.shape[0]
    check_result_size(num_samples, batch, x.shape[-1], 0, x.device)
    per_chunk = max(1, int(memory_budget_mb * 2**20 // (num_samples * trajectory_bytes(model, 1))))
    parts = []
    for start in range(0, batch, per_chunk):
        rows = slice(start, min(batch, start + per_chunk))
        global_rows = range(first_row + rows.start, first_row + rows.stop)
        keyed = KeyedRandom(seed, range(num_samples), global_rows, x.device, model.h0.dtype)
        resampler = KeyedRandom(seed, range(RESAMPLER_LANE, RESAMPLER_LANE + 1), global_rows, x.device,
                                torch.float64)
        parts.append(_smc_chunk(model, x[rows], None if puzzle is None else puzzle[rows], depth, options, keyed,
                                resampler, prior_temperature))
    survivors = {key: torch.cat([part[0][key] for part in parts], 1) for key in parts[0][0]}
    steps = torch.full((num_samples, batch), depth, dtype=torch.long, device=x.device)
    trajectories = Trajectories(seed=seed, steps=steps, **survivors)
    return SMCResult(trajectories, torch.cat([p[1] for p in parts], 1), torch.cat([p[2] for p in parts], 1))

