"""What every training objective (posterior scheme) shares: the :class:`Objective` interface and the
loss helpers.

Interface. The trainer calls ``objective.check(model, guide)`` once before the first batch (a one-line
``ValueError`` for a combination the objective cannot train; by default every one is accepted), then
for each batch ``objective.loss(model, guide, batch, state, update)`` for ``update`` in
``range(updates_per_batch(model))``, one optimizer step after each call; ``state`` is a dict the
objective may use to carry the latent state between those calls. ``loss`` returns the loss and a dict
of scalar metrics. ``state_dict`` / ``load_state_dict`` hold what an objective keeps across batches
(saved in checkpoints).

Cost. ``cost(model)`` is the number of transitions one batch runs per training example, summed over
particles and extra programs (one transition of the recursive model is ``K_low + 1`` backbone passes).
It reads ``model.n_sup`` (``N_sup``) and ``model.transitions`` (``T``) only, so the model's config node
serves as well as the model. Every scheme states its rule; in short: ``N_sup T`` for the truncated
surrogates (twice that once the prior rollouts of :class:`~gram_pyro.objectives.TruncatedSurrogate`
join), ``K N_sup T`` for the particle schemes and Pyro's ELBOs with ``K`` particles (twice that for RWS
with ``insomnia < 1``), and the MCMC-EM formulas of :mod:`gram_pyro.objectives.mcmc_em`.

Normalization (the meaning of beta depends on it): every loss is divided by the number of supervised
target tokens in the batch (``B * S`` unless targets hold ``IGNORE`` positions). With ``beta = 1`` the
GRAM surrogate is therefore exactly the negative ELBO of one supervision step per target token; the KL
is summed over all ``L x D`` latent units of the transition before that division, not averaged.

Head losses (:func:`head_losses`), added by every objective: halt BCE towards "the step's answer is
correct" and the LPRM regression ``(v(z_T^(n)) - r)^2`` with ``r`` the correctness of the step's answer
(the task's ``judge``). The heads read a detached state, so these losses never reach the core.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
import torch.nn.functional as F
from pyro.distributions import Independent, Normal
from pyro.poutine.trace_struct import Trace
from torch.distributions import kl_divergence

from gram_pyro.tasks.base import IGNORE, Batch, most_likely, same_input_groups

Judge = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``judge(x, answer, y) -> bool [...]``: whether ``answer`` is a correct answer to ``x``."""
Nearest = Callable[..., torch.Tensor]
"""``nearest(x [B, S], logits [B, S, V], distinct=False) -> [B, S]``: the valid answer of ``x`` most likely
under ``logits``; with ``distinct``, different answers for equal rows of ``x`` (``Task.nearest_solution``)."""


def exact_match(x: torch.Tensor, answer: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default judge: the answer equals the target at every supervised position."""
    return ((answer == y) | (y == IGNORE)).all(-1)


def per_token(total: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A per-example quantity ``total [..., B]`` summed over the batch, averaged over leading (particle)
    dims and divided by the number of supervised tokens of ``y [B, S]``."""
    return total.sum(-1).mean() / (y != IGNORE).sum().clamp(min=1)


def step_logits(model_trace: Trace, n: int) -> torch.Tensor:
    """The decoder logits ``[..., B, S, V]`` of supervision step ``n`` (read off the masked likelihood)."""
    fn = model_trace.nodes[f"y/{n}"]["fn"]
    while not hasattr(fn, "logits"):
        fn = fn.base_dist
    return fn.logits


def gaussian_of(d) -> Normal:
    """The Normal inside ``Normal(...).to_event(k)``; other families have no analytic KL here."""
    base = d.base_dist if isinstance(d, Independent) else d
    if not isinstance(base, Normal):
        raise TypeError(f"the analytic KL needs Normal posteriors and priors, got {type(base).__name__}")
    return base


def balanced_kl(q, p, balance: float) -> torch.Tensor:
    """``balance * KL(sg(q) || p) + (1 - balance) * KL(q || sg(p))`` summed over event dims ``[L, D]``;
    shape ``[..., B]``. Its value is ``KL(q || p)``; only the gradients are balanced."""
    q, p = gaussian_of(q), gaussian_of(p)
    q_sg, p_sg = Normal(q.loc.detach(), q.scale.detach()), Normal(p.loc.detach(), p.scale.detach())
    kl = balance * kl_divergence(q_sg, p) + (1 - balance) * kl_divergence(q, p_sg)
    return kl.flatten(-2).sum(-1)


def overshooting_kl(q, u_q: torch.Tensor, p, u_p: torch.Tensor) -> torch.Tensor:
    """``KL(sg(N(u_q + mu_q, s_q^2)) || N(u_p + mu_p, s_p^2))`` summed over event dims ``[L, D]``; shape
    ``[..., B]``. The distributions of the states ``h = u + eps`` two chains reach at one transition:
    ``q`` (the eps distribution used at proposal ``u_q``, held fixed) and ``p`` (at proposal ``u_p``,
    trained): the gradient moves ``p`` and ``u_p`` only."""
    q, p = gaussian_of(q), gaussian_of(p)
    target = Normal((u_q + q.loc).detach(), q.scale.detach())
    return kl_divergence(target, Normal(u_p + p.loc, p.scale)).flatten(-2).sum(-1)


def head_losses(model_trace: Trace, x: torch.Tensor, y: torch.Tensor, n: int, judge: Judge,
                logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halt BCE and LPRM squared error at supervision step ``n`` (batch means), and the correctness
    ``[..., B]`` of the step's argmax answer. ``logits``: the step's decoder logits where the trace has
    no likelihood site to read them from (a step run without ``y``)."""
    logits = step_logits(model_trace, n) if logits is None else logits
    correct = judge(x, logits.argmax(-1), y).float()
    halt = F.binary_cross_entropy_with_logits(model_trace.nodes[f"halt/{n}"]["value"], correct)
    value = (model_trace.nodes[f"value/{n}"]["value"] - correct).square().mean()
    return halt, value, correct


def token_nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``-log p(y | logits)`` per example ``[..., B]``, summed over the supervised tokens of ``y [B, S]``
    (``logits [..., B, S, V]``)."""
    log_p = logits.float().log_softmax(-1).gather(-1, y.clamp(min=0).expand(logits.shape[:-1]).unsqueeze(-1))
    return -(log_p.squeeze(-1) * (y != IGNORE)).sum(-1)


def matched_targets(x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The batch's targets ``y [B, S]`` dealt out again among the rows of equal ``x [B, S]``, one each:
    row ``b`` may take the target of any row ``c`` of its input, scored ``log p(y_c | logits_b)`` over the
    supervised tokens (``logits [B, S, V]``), and the rows claim in order of their best score, each its best
    target that no earlier row took (:func:`~gram_pyro.tasks.base.most_likely` with groups). Returns
    ``[B, S]``, a permutation of the rows of ``y`` within each input. Rows of an input seen once keep their
    target; in unconditional generation every row is one input and this is a minibatch coupling of the
    prior's samples to the data's."""
    groups = same_input_groups(x)
    return most_likely(logits, y, allowed=groups[:, None] == groups[None, :], groups=groups)


class Objective(ABC):
    """A training objective (module docstring): ``updates_per_batch``, ``loss`` and ``cost`` are each
    scheme's own; ``check`` accepts every model and guide, and no state is kept across batches, unless
    a scheme says otherwise."""

    @abstractmethod
    def updates_per_batch(self, model) -> int:
        """Optimizer steps (calls of :meth:`loss`) per batch."""

    @abstractmethod
    def loss(self, model, guide, batch: Batch, state: dict, update: int) -> tuple[torch.Tensor, dict]:
        """The loss of update ``update`` of ``batch`` (per supervised target token) and its metrics."""

    @abstractmethod
    def cost(self, model) -> int:
        """Transitions one batch runs per training example, from ``model.n_sup`` and ``model.transitions``."""

    def run_cost(self, model, batches: int) -> int:
        """Transitions a run of ``batches`` batches spends per training example: ``batches * cost``
        unless a scheme's batches differ in cost."""
        return batches * self.cost(model)

    def check(self, model, guide) -> None:
        """A one-line ``ValueError`` if the objective cannot train ``model`` with ``guide``."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
