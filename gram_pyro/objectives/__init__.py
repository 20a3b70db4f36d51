"""Training objectives (posterior schemes), one module each, all with the interface of
:class:`~gram_pyro.objectives.base.Objective`: ``updates_per_batch(model)``,
``loss(model, guide, batch, state, update)``, ``check(model, guide)`` and ``cost(model)`` (transitions one
batch runs per training example). See docs/posteriors.md.

- :mod:`~gram_pyro.objectives.base`: the interface, the normalization every loss shares and the helpers;
- :mod:`~gram_pyro.objectives.surrogate`: :class:`TruncatedSurrogate`, the paper's truncated surrogate;
- :mod:`~gram_pyro.objectives.surrogate_mc`: :class:`TruncatedSurrogateMC`, the same with a sampled KL;
- :mod:`~gram_pyro.objectives.pyro_elbo`: :class:`PyroELBO`, Pyro's ``Trace_ELBO`` / ``TraceMeanField_ELBO``;
- :mod:`~gram_pyro.objectives.particles`: :class:`ParticleObjective`, the base of the particle schemes;
- :mod:`~gram_pyro.objectives.iwae`: :class:`ImportanceWeighted`;
- :mod:`~gram_pyro.objectives.wake_sleep`: :class:`ReweightedWakeSleep`;
- :mod:`~gram_pyro.objectives.smc`: :class:`SequentialMonteCarlo`;
- :mod:`~gram_pyro.objectives.mcmc_em`: :class:`MonteCarloEM`.

A config in ``experiments/configs/objective/`` names its class here: ``_target_: gram_pyro.objectives.<Class>``.
"""

from gram_pyro.objectives.base import Objective
from gram_pyro.objectives.iwae import ImportanceWeighted
from gram_pyro.objectives.mcmc_em import MonteCarloEM
from gram_pyro.objectives.particles import ParticleObjective
from gram_pyro.objectives.pyro_elbo import PyroELBO
from gram_pyro.objectives.smc import SequentialMonteCarlo
from gram_pyro.objectives.surrogate import TruncatedSurrogate
from gram_pyro.objectives.surrogate_mc import TruncatedSurrogateMC
from gram_pyro.objectives.wake_sleep import ReweightedWakeSleep

__all__ = ["ImportanceWeighted", "MonteCarloEM", "Objective", "ParticleObjective", "PyroELBO", "ReweightedWakeSleep",
           "SequentialMonteCarlo", "TruncatedSurrogate", "TruncatedSurrogateMC"]
