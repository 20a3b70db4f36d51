"""Pyro model programs: GRAM and its deterministic and naive-noise baselines, and a linear-Gaussian toy
with an exact posterior (for testing inference schemes)."""

from gram_pyro.models.linear_gaussian import LinearGaussianModel
from gram_pyro.models.recursive import MAX_PLATE_NESTING, NOISE_KINDS, RecursiveReasoningModel

__all__ = ["MAX_PLATE_NESTING", "NOISE_KINDS", "LinearGaussianModel", "RecursiveReasoningModel"]
