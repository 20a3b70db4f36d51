"""Posterior schemes beyond amortized VI, each an objective with the interface of
:mod:`gram_pyro.objectives` (``updates_per_batch(model)``, ``loss(model, guide, batch, state, update)``),
and the evidence estimators used to compare them. See docs/posteriors.md."""

from gram_pyro.posteriors.evidence import EvidenceEstimate, importance_log_evidence
from gram_pyro.posteriors.iwae import ImportanceWeighted
from gram_pyro.posteriors.mcmc_em import MonteCarloEM, sample_posterior
from gram_pyro.posteriors.smc import SequentialMonteCarlo, smc_log_evidence
from gram_pyro.posteriors.surrogate_mc import TruncatedSurrogateMC
from gram_pyro.posteriors.wake_sleep import ReweightedWakeSleep

__all__ = ["EvidenceEstimate", "ImportanceWeighted", "MonteCarloEM", "ReweightedWakeSleep", "SequentialMonteCarlo",
           "TruncatedSurrogateMC", "importance_log_evidence", "sample_posterior", "smc_log_evidence"]
