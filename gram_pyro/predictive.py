"""The sampler's noise for Pyro's ``Predictive``: the same answers through either door.

``Predictive(model, num_samples=N)(x)`` runs the program (``forward``) as written: it returns the eps
sites ``[N, B, L, D]``, sampled answers ``y/{n}`` and decoded answers ``answer/{n}`` ``[N, B, S]``
along prior trajectories; ``Predictive(model, guide=guide, num_samples=N)(x, y=y)`` returns the
decoded answers along posterior (guide) trajectories. Its draws come from torch's global generator.

:func:`gram_pyro.inference.sample_trajectories` (what ``gram-pyro eval`` and ``solve`` run) drives
``init``/``step`` itself, vectorized and chunked, with every random number from a stream keyed by
``(seed, trajectory, input row)``. :func:`keyed_noise` draws the eps sites of those streams and
returns them as ``posterior_samples`` for ``Predictive``, so that

    Predictive(model, posterior_samples=keyed_noise(model, x, N, seed), parallel=True)(x)["answer/{n}"]

equals ``sample_trajectories(model, x, N, depth=n + 1, seed=seed).answers`` (the program runs the
same network on the same noise; ``tests/test_pyro_inference.py`` checks it).
"""

from __future__ import annotations

import pyro
import torch
from pyro import poutine

from gram_pyro.inference import KeyedNoise, KeyedRandom


@torch.no_grad()
def keyed_noise(model, x: torch.Tensor, num_samples: int, seed: int, puzzle: torch.Tensor | None = None,
                first_row: int = 0) -> dict[str, torch.Tensor]:
    """``{noise site: [num_samples, B, L, D]}``: the values that the prior trajectories ``0 ..
    num_samples - 1`` of :func:`~gram_pyro.inference.sample_trajectories` with ``seed`` give every
    noise site of the whole program for the inputs ``x [B, S]`` (rows ``first_row ..`` of the keyed
    streams). Empty for a deterministic model."""
    keyed = KeyedRandom(seed, range(num_samples), range(first_row, first_row + x.shape[0]), x.device,
                        model.h0.dtype)
    with poutine.trace() as tracer, pyro.plate("trajectories", num_samples, dim=-2), \
            KeyedNoise(model.noise_sites, keyed):
        model(x, puzzle=puzzle, sample_y=False)
    return {name: site["value"] for name, site in tracer.trace.nodes.items()
            if site["type"] == "sample" and name.partition("/")[0] in model.noise_sites}
