"""Pyro model programs: GRAM and its deterministic and naive-noise baselines."""

from models.recursive import MAX_PLATE_NESTING, NOISE_KINDS, RecursiveReasoningModel

__all__ = ["MAX_PLATE_NESTING", "NOISE_KINDS", "RecursiveReasoningModel"]
