"""A linear-Gaussian toy in the model contract of :mod:`gram_pyro.models.recursive`, with exact answers.

The program (supervision step ``n``, transition ``t``, global transition index ``k = n T + t``)::

    u_k   = A h_{k-1} + B x                    pyro.deterministic("u/{n}/{t}")
    eps_k ~ N(W u_k + w, s^2 I)                pyro.sample("eps/{n}/{t}"), event dims [L, D]
    h_k   = u_k + eps_k
    ...after T transitions:
    y     ~ N(C h_k, r^2 I)                    pyro.sample("y/{n}", obs=y), event dims [L, D_y]

with ``h_{-1} = h0`` a fixed buffer ``[L, D]`` (a plain tensor expanded over the enclosing plates, no
sample site: the eps sites are the only latent ones). Without ``y`` the program samples ``y/{n}``
(``step``: only with ``sample_y=True``), as the recursive model does. Shapes: ``x [..., B, L, D]``
and ``y [..., B, L, D_y]`` are real-valued; states ``[..., B, L, D]``; the matrices act on the last
dim only, so the ``L`` positions are independent copies. One plate ``data`` over ``B`` at dim -1,
leading (particle) dims broadcast, and ``truncate=True`` runs the first ``T - 1`` transitions of a
step without gradient and detaches the state at the step's end, exactly as the recursive model does.

Everything is linear-Gaussian, so with ``xi_k = (eps_k - W u_k - w) / s`` the standard-normal noise of
transition ``k``, ``h_k = F h_{k-1} + c + s xi_k`` (``F = (I + W) A``, ``c = (I + W) B x + w``) and

- the eps vector is affine in ``xi = [xi_0; ...; xi_{K-1}]``: ``eps = E xi + e``;
- the stacked observations are ``Y = G xi + g + r nu`` (``Y = [y; ...; y]``, one copy per step);

hence ``log p(Y | x) = log N(Y; g, G G^T + r^2 I)`` (:meth:`exact_log_evidence`) and the posterior
``xi | Y ~ N(G^T S^-1 (Y - g), I - G^T S^-1 G)``, ``S = G G^T + r^2 I``, mapped to eps by ``(E, e)``
(:meth:`exact_posterior`). :meth:`future_information` is the backward information filter
``log p(observations at transitions >= k | h_k) = -h^T J_k h / 2 + h^T eta_k + const`` that the exact
posterior guide (:mod:`gram_pyro.guides.linear_gaussian`) conditions each eps site on.

The toy has no decoder over tokens, no halt/value heads and no ``vocab_size``; guides read
``target_dim`` to embed its real-valued targets.
"""

from __future__ import annotations

import contextlib

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from gram_pyro.models.recursive import plates_shape


class LinearGaussianModel(nn.Module):
    """The toy above; ``init``/``step``/``forward`` as :class:`gram_pyro.models.RecursiveReasoningModel`.
    Parameters are drawn from ``seed`` (contractive ``A``) and are all trainable."""

    noise_sites = ("eps",)
    stochastic = True

    def __init__(self, dim: int = 2, length: int = 2, target_dim: int = 2, transitions: int = 1,
                 n_sup: int = 2, noise_scale: float = 0.7, obs_scale: float = 0.5, seed: int = 0):
        super().__init__()
        for name, value in (("dim", dim), ("length", length), ("target_dim", target_dim),
                            ("transitions", transitions), ("n_sup", n_sup)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.dim, self.length, self.target_dim = dim, length, target_dim
        self.transitions, self.n_sup = transitions, n_sup
        g = torch.Generator().manual_seed(seed)
        normal = lambda *shape: torch.randn(*shape, generator=g) / dim ** 0.5  # noqa: E731
        self.transition = nn.Parameter(0.6 * normal(dim, dim))       # A
        self.input_map = nn.Parameter(normal(dim, dim))              # B
        self.prior_map = nn.Parameter(0.3 * normal(dim, dim))        # W
        self.prior_shift = nn.Parameter(0.1 * normal(dim))           # w
        self.observation = nn.Parameter(normal(target_dim, dim) + torch.eye(target_dim, dim))  # C
        self.log_noise_scale = nn.Parameter(torch.tensor(float(noise_scale)).log())   # log s
        self.log_obs_scale = nn.Parameter(torch.tensor(float(obs_scale)).log())       # log r
        self.register_buffer("h0", torch.randn(length, dim, generator=g))
        self._data_plate: pyro.plate | None = None
        self._step_index = 0

    def prior(self, kind: str, u: torch.Tensor) -> dist.Distribution:
        """p(eps | u) = N(W u + w, s^2 I), event dims ``[L, D]``."""
        loc = u @ self.prior_map.T + self.prior_shift
        return dist.Normal(loc, self.log_noise_scale.exp().expand(loc.shape)).to_event(2)

    def init(self, state: dict, x: torch.Tensor) -> None:
        """``state["h"] = h0`` expanded to ``[..., B, L, D]`` over the enclosing plates."""
        pyro.module("model", self)
        self._data_plate = pyro.plate("data", x.shape[-3], dim=-1)
        self._step_index = 0
        state["h"] = self.h0.expand(*plates_shape(x.shape[:-2]), *self.h0.shape)

    def step(self, state: dict, x: torch.Tensor, y: torch.Tensor | None = None, truncate: bool = False,
             puzzle: torch.Tensor | None = None, sample_y: bool = False) -> torch.Tensor:
        """One supervision step; returns the observation mean ``C h [..., B, L, D_y]``. ``y/{n}`` is
        observed, sampled where ``y`` is None and ``sample_y``, or absent. ``puzzle`` is accepted for
        the interface of the recursive model and not used."""
        if self._data_plate is None:
            raise RuntimeError("call init(state, x) before step(state, x, ...)")
        n, h = self._step_index, state["h"]
        with self._data_plate:
            for t in range(self.transitions):
                with_grad = not truncate or t == self.transitions - 1
                with contextlib.nullcontext() if with_grad else torch.no_grad():
                    u = pyro.deterministic(f"u/{n}/{t}", h @ self.transition.T + x @ self.input_map.T, event_dim=2)
                    h = u + pyro.sample(f"eps/{n}/{t}", self.prior("eps", u))
            mean = h @ self.observation.T
            if y is not None or sample_y:
                pyro.sample(f"y/{n}", dist.Normal(mean, self.log_obs_scale.exp().expand(mean.shape)).to_event(2), obs=y)
        state["h"] = h.detach() if truncate else h
        self._step_index = n + 1
        return mean

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, n_sup: int | None = None,
                truncate: bool = False, puzzle: torch.Tensor | None = None, sample_y: bool = True) -> torch.Tensor:
        """The whole program (``init`` then ``n_sup`` steps); the last step's observation mean."""
        state: dict = {}
        self.init(state, x)
        for _ in range(n_sup or self.n_sup):
            mean = self.step(state, x, y, truncate=truncate, puzzle=puzzle, sample_y=sample_y)
        return mean

    # exact answers (float64) -----------------------------------------------------------------

    def _noise_form(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(E [K D, K D], e [..., B, L, K D], G [N D_y, K D], g [..., B, L, N D_y])`` with
        ``eps = E xi + e`` and the noise-free observations ``G xi + g`` (see the module docstring)."""
        A, B, W, C = (p.double() for p in (self.transition, self.input_map, self.prior_map, self.observation))
        w, s, x = self.prior_shift.double(), self.log_noise_scale.double().exp(), x.double()
        D, K = self.dim, self.n_sup * self.transitions
        h_lin = torch.zeros(D, K * D, dtype=torch.float64)     # h_k = h_lin xi + h_off
        h_off = self.h0.double().expand(*x.shape[:-1], D)
        eps_lin, eps_off, obs_lin, obs_off = [], [], [], []
        for k in range(K):
            u_lin, u_off = A @ h_lin, h_off @ A.T + x @ B.T
            noise = torch.zeros(D, K * D, dtype=torch.float64)
            noise[:, k * D:(k + 1) * D] = s * torch.eye(D, dtype=torch.float64)
            eps_lin.append(W @ u_lin + noise)
            eps_off.append(u_off @ W.T + w)
            h_lin, h_off = u_lin + eps_lin[-1], u_off + eps_off[-1]
            if k % self.transitions == self.transitions - 1:
                obs_lin.append(C @ h_lin)
                obs_off.append(h_off @ C.T)
        return torch.cat(eps_lin), torch.cat(eps_off, -1), torch.cat(obs_lin), torch.cat(obs_off, -1)

    def _observation_covariance(self, G: torch.Tensor) -> torch.Tensor:
        r = self.log_obs_scale.double().exp()
        return G @ G.T + r**2 * torch.eye(G.shape[0], dtype=torch.float64)

    def exact_log_evidence(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``log p(y/0, ..., y/{N-1} | x)`` (every step observes the same ``y``), ``[..., B]`` float64;
        differentiable in the parameters."""
        _, _, G, g = self._noise_form(x)
        observed = y.double().repeat(*[1] * (y.dim() - 1), self.n_sup)
        log_p = dist.MultivariateNormal(g, self._observation_covariance(G)).log_prob(observed)
        return log_p.sum(-1)

    def exact_posterior(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior of the eps vector ``[eps/0/0, eps/0/1, ..., eps/{N-1}/{T-1}]`` of each position:
        mean ``[..., B, L, K D]`` and covariance ``[K D, K D]`` (the same for every position and
        example), float64, ``K = N_sup T``."""
        E, e, G, g = self._noise_form(x)
        observed = y.double().repeat(*[1] * (y.dim() - 1), self.n_sup)
        gain = torch.linalg.solve(self._observation_covariance(G), G).T           # G^T S^-1
        mean = (observed - g) @ gain.T @ E.T + e
        cov = E @ (torch.eye(E.shape[0], dtype=torch.float64) - gain @ G) @ E.T
        return mean, cov

    def future_information(self, x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(J_k [D, D], eta_k [..., B, L, D]) for k in 0..K-1]`` with ``log p(observations at
        transitions >= k | h_k = h) = -h^T J_k h / 2 + h^T eta_k + const`` (model dtype)."""
        A, B, W, C = self.transition, self.input_map, self.prior_map, self.observation
        s2, r2 = (2 * self.log_noise_scale).exp(), (2 * self.log_obs_scale).exp()
        eye = torch.eye(self.dim, dtype=A.dtype)
        F = (eye + W) @ A
        c = x @ B.T @ (eye + W).T + self.prior_shift
        J, eta = torch.zeros_like(eye), torch.zeros_like(c)
        information = []
        for k in reversed(range(self.n_sup * self.transitions)):
            if k % self.transitions == self.transitions - 1:
                J, eta = J + C.T @ C / r2, eta + y @ C / r2
            information.append((J, eta))
            # integrate h_k ~ N(F h_{k-1} + c, s^2 I) against exp(-h^T J h / 2 + h^T eta)
            inverse = torch.linalg.inv(eye / s2 + J)
            J_pred, eta_pred = eye / s2 - inverse / s2**2, eta @ inverse / s2
            J, eta = F.T @ J_pred @ F, (eta_pred - c @ J_pred) @ F
        return information[::-1]
