"""Posterior diagnostics with ArviZ: the posterior-shortcut check, importance weights (PSIS k-hat,
ESS), MCMC convergence, trajectory diversity and surrogate vs full ELBO curves, collected by
:func:`diagnose` (its settings: :class:`Options`) into a directory (InferenceData netCDF, markdown report, PNG figures).
See docs/diagnostics.md."""

from gram_pyro.diagnostics.report import Options, diagnose

__all__ = ["Options", "diagnose"]
