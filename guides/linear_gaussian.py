"""The exact posterior of the linear-Gaussian toy (:mod:`gram_pyro.models.linear_gaussian`) as a guide.

At site ``eps/{n}/{t}`` (transition ``k = n T + t``) the posterior given everything upstream is

    q(eps_k | u_k, x, y) = p(eps_k | u_k) p(observations at transitions >= k | h_k = u_k + eps_k) / Z
                         = N(P^-1 (mu / s^2 + eta_k - J_k u_k), P^-1),   P = I / s^2 + J_k,

with ``mu = W u_k + w`` the prior mean and ``(J_k, eta_k)`` the model's backward information filter
(:meth:`~gram_pyro.models.linear_gaussian.LinearGaussianModel.future_information`). It depends on the past only
through ``u_k`` (the chain is Markov in ``h``), so with ``posterior_transitions="all"`` the product of
these conditionals is the exact joint posterior: every importance weight ``p(x, y, eps) / q(eps)``
equals ``p(y | x)``. With ``"last"`` the earlier transitions follow the prior and each covered site is
the exact conditional given them. It has no parameters; tests and diagnostics use it as the reference.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch

from gram_pyro.guides.base import EpsGuide, proposal_site


class ExactLinearGaussianPosterior(EpsGuide):
    def __init__(self, model, posterior_transitions: str = "all"):
        super().__init__(model, posterior_transitions)
        if not hasattr(model, "future_information"):
            raise ValueError("the exact posterior guide needs gram_pyro.models.linear_gaussian.LinearGaussianModel")

    def get_posterior(self, name: str, prior):
        if not self.covers(name):
            return prior
        n, t = (int(i) for i in name.split("/")[1:])
        model, u = self.model, self.upstream_value(proposal_site(name))
        J, eta = model.future_information(self.argument("x"), self.target())[n * model.transitions + t]
        inverse_var = (-2 * model.log_noise_scale).exp()
        precision = inverse_var * torch.eye(model.dim, dtype=J.dtype) + J
        information = prior.base_dist.loc * inverse_var + eta - u @ J
        mean = torch.linalg.solve(precision, information.unsqueeze(-1)).squeeze(-1)
        return dist.MultivariateNormal(mean, precision_matrix=precision).to_event(1)
