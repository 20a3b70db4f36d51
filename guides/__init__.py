"""Guide families for the eps sites of a recursive reasoning model."""

from guides.base import POSTERIOR_TRANSITIONS, EpsGuide, PriorGuide
from guides.gaussian import TargetConditionedGaussian

__all__ = ["POSTERIOR_TRANSITIONS", "EpsGuide", "PriorGuide", "TargetConditionedGaussian"]
