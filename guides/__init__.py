"""Guide families for the eps sites of a recursive reasoning model."""

from gram_pyro.guides.base import POSTERIOR_TRANSITIONS, EpsGuide, PriorGuide
from gram_pyro.guides.flow import ConditionalFlow
from gram_pyro.guides.gaussian import TargetConditionedGaussian
from gram_pyro.guides.linear_gaussian import ExactLinearGaussianPosterior
from gram_pyro.guides.lowrank import LowRankGaussian
from gram_pyro.guides.mean_only import MeanOnlyGaussian
from gram_pyro.guides.residual import ResidualGaussian

__all__ = ["POSTERIOR_TRANSITIONS", "ConditionalFlow", "EpsGuide", "ExactLinearGaussianPosterior", "LowRankGaussian",
           "MeanOnlyGaussian", "PriorGuide", "ResidualGaussian", "TargetConditionedGaussian"]
