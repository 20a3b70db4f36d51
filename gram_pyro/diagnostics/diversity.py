"""Trajectory diversity under the prior: what ``N`` trajectories per input explore.

The trajectories are a plate ``trajectories`` at dim -2 around the model (as
:func:`gram_pyro.inference.sample_trajectories`), driven one supervision step at a time so that the state
``h [N, b, L, D]`` after every step is at hand; inputs are chunked to a memory budget. No guide, no
target: this is how the model answers. Per input:

- ``step_answers [N_sup, N, M, S]``: the argmax answer after every step (the last is the answer);
- ``spread [N_sup, M]``: mean pairwise RMS distance of ``h`` between trajectories,
  ``mean_{i<j} ||h_i - h_j|| / sqrt(L D)`` (0 when all trajectories coincide);
- ``paths [P, N_sup, N, 2]``: for the first ``P`` inputs, the states of all trajectories after every
  step projected on their first two principal components (SVD of the centred ``[N_sup N, L D]``
  matrix; z0, shared and far from every later state, would take the first component alone).

:func:`distinct_answers` counts the different answers (optionally only the valid ones) among the
``N`` of each input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import torch

from gram_pyro.inference import default_memory_budget_mb, plan_chunks, trajectory_bytes


@dataclass
class PriorTrajectories:
    step_answers: torch.Tensor  # [N_sup, N, M, S]
    spread: torch.Tensor        # [N_sup, M]
    paths: torch.Tensor         # [P, N_sup, N, 2]


def pairwise_spread(h: torch.Tensor) -> torch.Tensor:
    """Mean pairwise RMS distance over the trajectories of ``h [N, b, L, D]``: ``[b]``."""
    num = h.shape[0]
    flat = h.flatten(-2).transpose(0, 1)  # [b, N, L D]
    if num < 2:
        return flat.new_zeros(flat.shape[0])
    distances = torch.cdist(flat, flat)
    return distances.sum((-1, -2)) / (num * (num - 1)) / math.sqrt(flat.shape[-1])


def principal_plane(points: torch.Tensor) -> torch.Tensor:
    """Coordinates ``[..., R, 2]`` of each point set ``points [..., R, F]`` on its first two principal
    components."""
    centred = points - points.mean(-2, keepdim=True)
    left, singular, _ = torch.linalg.svd(centred, full_matrices=False)
    coords = left[..., :2] * singular[..., None, :2]
    return torch.nn.functional.pad(coords, (0, 2 - coords.shape[-1]))


def distinct_answers(answers: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Number of different answers ``[M]`` among ``answers [N, M, S]``, counting only those with
    ``valid [N, M]`` where given."""
    _, ids = torch.unique(answers.flatten(0, 1), dim=0, return_inverse=True)
    ids = ids.view(answers.shape[:2])
    if valid is not None:
        ids = torch.where(valid, ids, -1)
    ordered = ids.sort(0).values
    count = 1 + (ordered[1:] != ordered[:-1]).sum(0)
    return count - (ordered[0] == -1).long()


@torch.no_grad()
def prior_trajectories(model, x: torch.Tensor, num_samples: int, puzzle: torch.Tensor | None = None,
                       pca_inputs: int = 4, memory_budget_mb: float | None = None) -> PriorTrajectories:
    """:class:`PriorTrajectories` of ``num_samples`` prior trajectories for each input of
    ``x [M, S]`` (random draws from torch's global generator). A deterministic model runs one
    trajectory, repeated."""
    inputs, lanes = x.shape[0], num_samples if model.stochastic else 1
    budget_mb = default_memory_budget_mb(x.device) if memory_budget_mb is None else memory_budget_mb
    _, per_chunk = plan_chunks(1, inputs, lanes * trajectory_bytes(model, 1), budget_mb * 2**20)
    answers, spreads, states = [], [], []
    for row in range(0, inputs, per_chunk):
        rows, keep = slice(row, row + per_chunk), max(0, pca_inputs - row)
        state: dict = {}
        chunk_answers, chunk_spread, chunk_states = [], [], []
        with pyro.plate("trajectories", lanes, dim=-2):
            model.init(state, x[rows])
            for _ in range(model.n_sup):
                logits = model.step(state, x[rows], puzzle=None if puzzle is None else puzzle[rows])
                h = state["h"].expand(lanes, *state["h"].shape[-3:])
                chunk_answers.append(logits.argmax(-1).expand(lanes, *logits.shape[-3:-1]))
                chunk_spread.append(pairwise_spread(h))
                chunk_states.append(h[:, :keep].flatten(-2))
        answers.append(torch.stack(chunk_answers))
        spreads.append(torch.stack(chunk_spread))
        states.append(torch.stack(chunk_states))
    step_answers = torch.cat(answers, 2).expand(-1, num_samples, -1, -1)
    kept = torch.cat(states, 2).permute(2, 0, 1, 3)  # [P, N_sup, lanes, L D]
    paths = principal_plane(kept.flatten(1, 2)).view(*kept.shape[:3], 2)
    return PriorTrajectories(step_answers, torch.cat(spreads, 1), paths.expand(-1, -1, num_samples, -1))
