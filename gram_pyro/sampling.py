"""Drawing answers from the prior: ``N`` trajectories per input as a leading tensor dim.

``sample_answers(model, x, num_samples)`` runs the model program under a plate ``trajectories`` of
size ``N`` at dim -2 (outside the model's ``data`` plate), so every eps site draws ``[N, B, L, D]``
from the prior p(eps | u) and the decoder's argmax gives answers ``[N, B, S]``. No guide is
involved: this is how a trained model answers at test time. A deterministic model runs once and its
answer is repeated.
"""

from __future__ import annotations

import pyro
import torch


@torch.no_grad()
def sample_answers(model, x: torch.Tensor, num_samples: int, n_sup: int | None = None,
                   puzzle: torch.Tensor | None = None) -> torch.Tensor:
    """Argmax answers ``[N, B, S]`` of ``N`` prior trajectories for inputs ``x [B, S]`` (and puzzle
    identifiers ``puzzle [B]`` where the task has them)."""
    if not model.stochastic:
        return model(x, n_sup=n_sup, puzzle=puzzle).argmax(-1).expand(num_samples, *x.shape)
    with pyro.plate("trajectories", num_samples, dim=-2):
        return model(x, n_sup=n_sup, puzzle=puzzle).argmax(-1)
