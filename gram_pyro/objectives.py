"""Training objectives (posterior schemes): ``objective.loss(model, guide, batch, state, update)``.

An objective is called ``updates_per_batch(model)`` times per batch, one optimizer step after each
call; ``state`` is a dict it may use to carry the latent state between those calls. An objective may
define ``check(model, guide)``, raising a one-line ``ValueError`` for a combination it cannot train
(the trainer calls it before the first batch).

Normalization (the meaning of beta depends on it): every loss is divided by the number of supervised
target tokens in the batch (``B * S`` unless targets hold ``IGNORE`` positions). With ``beta = 1`` the
GRAM surrogate is therefore exactly the negative ELBO of one supervision step per target token; the KL
is summed over all ``L x D`` latent units of the transition before that division, not averaged.

- :class:`TruncatedSurrogate` (the paper's, docs/paper.md "Training objective"): for supervision step ``n``

      L_n = -[ log p(y | z_T^(n)) - beta * KL_bal(q(eps_T^(n) | u, y) || p(eps_T^(n) | u)) ] / S

  with Dreamer-style KL balancing ``KL_bal = a KL(sg(q) || p) + (1 - a) KL(q || sg(p))``
  (value = KL(q || p); ``a`` = ``kl_balance``). The model runs with ``truncate=True``: gradient flows
  through the final transition only and the state is detached between steps. One optimizer step per
  supervision step (``updates_per_batch = n_sup``). Two options against the posterior shortcut
  (``docs/shortcut.md``), both off by default:

  * a KL cap (a rate target, as GECO's constraint): ``+ kl_cap_weight * max(0, KL / S - kl_cap)``, so
    the posterior may carry at most about ``kl_cap`` nats per target token per step before the penalty
    grows steeply;
  * reconstruction from prior rollouts (the hybrid objective of Sohn et al., 2015): a second chain of
    supervision steps run with eps drawn from the **prior**, whose decoder is scored against a target,
    mixed in as ``(1 - prior_weight) * L_n + prior_weight * NLL_prior_n / S``. The target is the batch's
    (``prior_target=target``; on a task with several solutions per input it asks the prior chain for
    the average of them) or, with ``prior_target=nearest``, the valid answer of the input that the prior
    chain's own logits make most likely (``task.nearest_solution``): the prior chain learns to end in
    *some* solution, the posterior chain keeps every solution reachable. The prior chain joins after
    ``prior_start`` batches (before that the posterior chain alone has made the states worth finishing).
- :class:`PyroELBO`: Pyro's ``Trace_ELBO`` / ``TraceMeanField_ELBO``, unchanged, on the untruncated
  whole program (every supervision step observes ``y``); one optimizer step per batch.

Both add the head losses (:func:`head_losses`): halt BCE towards "the step's answer is correct" and
the LPRM regression ``(v(z_T^(n)) - r)^2`` with ``r`` the correctness of the step's answer. The heads
read a detached state, so these losses never reach the core.
"""

from __future__ import annotations

from typing import Callable

import pyro.infer
import torch
import torch.nn.functional as F
from pyro.distributions import Independent, Normal
from pyro.poutine.trace_struct import Trace
from torch.distributions import kl_divergence

from gram_pyro.tasks.base import IGNORE, Batch
from models.recursive import MAX_PLATE_NESTING

Judge = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``judge(x, answer, y) -> bool [...]``: whether ``answer`` is a correct answer to ``x``."""
Nearest = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``nearest(x [B, S], logits [B, S, V]) -> [B, S]``: the valid answer of ``x`` most likely under ``logits``."""
PRIOR_TARGETS = ("target", "nearest")


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


def head_losses(model_trace: Trace, x: torch.Tensor, y: torch.Tensor, n: int, judge: Judge
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halt BCE and LPRM squared error at supervision step ``n`` (batch means), and the correctness
    ``[..., B]`` of the step's argmax answer."""
    logits = step_logits(model_trace, n)
    correct = judge(x, logits.argmax(-1), y).float()
    halt = F.binary_cross_entropy_with_logits(model_trace.nodes[f"halt/{n}"]["value"], correct)
    value = (model_trace.nodes[f"value/{n}"]["value"] - correct).square().mean()
    return halt, value, correct


def token_nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``-log p(y | logits)`` per example ``[..., B]``, summed over the supervised tokens of ``y [B, S]``
    (``logits [..., B, S, V]``)."""
    log_p = logits.float().log_softmax(-1).gather(-1, y.clamp(min=0).expand(logits.shape[:-1]).unsqueeze(-1))
    return -(log_p.squeeze(-1) * (y != IGNORE)).sum(-1)


class Objective:
    """What every objective shares: state kept across batches (``state_dict`` / ``load_state_dict``, saved
    in checkpoints so that a resumed run continues exactly); none by default."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TruncatedSurrogate(Objective):
    """The paper's truncated, per-supervision-step GRAM objective (see the module docstring)."""

    def __init__(self, beta: float = 1.0, kl_balance: float = 0.8, kl_cap: float | None = None,
                 kl_cap_weight: float = 10.0, prior_weight: float = 0.0, prior_target: str = "target",
                 prior_start: int = 0, halt_weight: float = 1.0, value_weight: float = 1.0,
                 judge: Judge = exact_match, nearest: Nearest | None = None):
        if beta < 0 or not 0 <= kl_balance <= 1:
            raise ValueError(f"need beta >= 0 and 0 <= kl_balance <= 1, got beta={beta}, kl_balance={kl_balance}")
        if (kl_cap is not None and kl_cap < 0) or kl_cap_weight < 0 or not 0 <= prior_weight <= 1:
            raise ValueError(f"need kl_cap >= 0 (or null), kl_cap_weight >= 0 and 0 <= prior_weight <= 1, got "
                             f"kl_cap={kl_cap}, kl_cap_weight={kl_cap_weight}, prior_weight={prior_weight}")
        if prior_target not in PRIOR_TARGETS:
            raise ValueError(f"unknown prior_target {prior_target!r}; allowed: {', '.join(PRIOR_TARGETS)}")
        if prior_target == "nearest" and nearest is None:
            raise ValueError("prior_target=nearest needs the task's nearest_solution")
        if isinstance(prior_start, bool) or not isinstance(prior_start, int) or prior_start < 0:
            raise ValueError(f"prior_start must be a whole number >= 0, got {prior_start!r}")
        self.beta, self.kl_balance = beta, kl_balance
        self.kl_cap, self.kl_cap_weight, self.prior_weight = kl_cap, kl_cap_weight, prior_weight
        self.prior_target, self.nearest, self.prior_start = prior_target, nearest, prior_start
        self.halt_weight, self.value_weight, self.judge = halt_weight, value_weight, judge
        self.batches = 0  # batches seen, for prior_start (checkpointed)

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = state.get("batches", 0)

    def updates_per_batch(self, model) -> int:
        return model.n_sup

    def check(self, model, guide) -> None:
        """A one-line ``ValueError`` if the guide's KL has no closed form (the surrogate needs one)."""
        if not guide.analytic_kl:
            raise ValueError(f"guide {type(guide).__name__} has no analytic KL: use objective=truncated_mc "
                             "or a particle scheme (iwae, rws, smc)")

    def kl_penalty(self, kl: torch.Tensor) -> torch.Tensor:
        """``beta * KL`` plus the cap's ``kl_cap_weight * max(0, KL - kl_cap)`` (``kl`` per target token)."""
        penalty = self.beta * kl
        if self.kl_cap is not None:
            penalty = penalty + self.kl_cap_weight * (kl - self.kl_cap).clamp(min=0)
        return penalty

    def loss(self, model, guide, batch: Batch, state: dict, update: int) -> tuple[torch.Tensor, dict]:
        if update == 0:
            state.clear()
            model.init(state, batch.x)
            self.batches += 1
            if self.prior_weight and self.batches > self.prior_start:
                state["prior"] = {}
                model.init(state["prior"], batch.x)
        n, last = update, model.transitions - 1
        prior_chain = "prior" in state
        if prior_chain:  # the prior chain's step n, before the guided one (both are site-named n)
            prior_logits = model.step(state["prior"], batch.x, truncate=True, puzzle=batch.puzzle)
            model._step_index = n
        model_trace, guide_trace = guide.run(model.step, state, batch.x, y=batch.y, truncate=True,
                                             puzzle=batch.puzzle)
        observed = model_trace.nodes[f"y/{n}"]
        log_lik = observed["fn"].log_prob(observed["value"])  # [B], summed over supervised tokens
        kl = torch.zeros_like(log_lik)
        for kind in model.noise_sites:
            site = f"{kind}/{n}/{last}"
            kl = kl + balanced_kl(guide_trace.nodes[site]["fn"], model_trace.nodes[site]["fn"], self.kl_balance)
        nll, kl = -per_token(log_lik, batch.y), per_token(kl, batch.y)
        halt, value, correct = head_losses(model_trace, batch.x, batch.y, n, self.judge)
        loss = nll + self.kl_penalty(kl)
        metrics = {"nll": nll, "kl": kl}
        if prior_chain:
            target = batch.y if self.prior_target == "target" else self.nearest(batch.x, prior_logits.detach())
            prior_nll = per_token(token_nll(prior_logits, target), batch.y)
            loss = (1 - self.prior_weight) * loss + self.prior_weight * prior_nll
            metrics["prior_nll"] = prior_nll
        elif self.prior_weight:  # the same columns in every row of metrics.csv; NaN before prior_start
            metrics["prior_nll"] = torch.full((), float("nan"), device=loss.device)
        loss = loss + self.halt_weight * halt + self.value_weight * value
        return loss, {"loss": loss, **metrics, "halt": halt, "value": value, "acc": correct.mean()}


ELBOS = {"Trace_ELBO": pyro.infer.Trace_ELBO, "TraceMeanField_ELBO": pyro.infer.TraceMeanField_ELBO}


class PyroELBO(Objective):
    """Pyro's own ELBO estimators, unchanged, on the whole untruncated program."""

    def __init__(self, elbo: str = "Trace_ELBO", num_particles: int = 1, halt_weight: float = 1.0,
                 value_weight: float = 1.0, judge: Judge = exact_match):
        if elbo not in ELBOS:
            raise ValueError(f"unknown elbo {elbo!r}; allowed: {', '.join(ELBOS)}")
        self.elbo = ELBOS[elbo](num_particles=num_particles, vectorize_particles=num_particles > 1,
                                max_plate_nesting=MAX_PLATE_NESTING)
        self.halt_weight, self.value_weight, self.judge = halt_weight, value_weight, judge

    def updates_per_batch(self, model) -> int:
        return 1

    def loss(self, model, guide, batch: Batch, state: dict, update: int) -> tuple[torch.Tensor, dict]:
        negative_elbo = self.elbo.differentiable_loss(model, guide, batch.x, y=batch.y, puzzle=batch.puzzle)
        negative_elbo = negative_elbo / (batch.y != IGNORE).sum().clamp(min=1)
        model_trace, _ = guide.get_traces()  # the run the ELBO just made (particles as a leading dim)
        halt = value = torch.zeros(())
        for n in range(model.n_sup):
            step_halt, step_value, correct = head_losses(model_trace, batch.x, batch.y, n, self.judge)
            halt, value = halt + step_halt / model.n_sup, value + step_value / model.n_sup
        loss = negative_elbo + self.halt_weight * halt + self.value_weight * value
        return loss, {"loss": loss, "neg_elbo": negative_elbo, "halt": halt, "value": value, "acc": correct.mean()}
