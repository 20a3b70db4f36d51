"""Guide families for the eps sites of a recursive reasoning model."""

from guides.base import POSTERIOR_TRANSITIONS, EpsGuide, PriorGuide
from guides.flow import ConditionalFlow
from guides.gaussian import TargetConditionedGaussian
from guides.linear_gaussian import ExactLinearGaussianPosterior
from guides.lowrank import LowRankGaussian
from guides.mean_only import MeanOnlyGaussian
from guides.residual import ResidualGaussian

__all__ = ["POSTERIOR_TRANSITIONS", "ConditionalFlow", "EpsGuide", "ExactLinearGaussianPosterior", "LowRankGaussian",
           "MeanOnlyGaussian", "PriorGuide", "ResidualGaussian", "TargetConditionedGaussian"]
