"""The paper's truncated GRAM surrogate (docs/paper.md "Training objective").

For supervision step ``n``

    L_n = -[ log p(y | z_T^(n)) - beta * KL_bal(q(eps_T^(n) | u, y) || p(eps_T^(n) | u)) ] / S

with Dreamer-style KL balancing ``KL_bal = a KL(sg(q) || p) + (1 - a) KL(q || sg(p))``
(value = KL(q || p); ``a`` = ``kl_balance``), ``S`` the number of supervised target tokens and the head
losses of :mod:`gram_pyro.objectives.base` added. The model runs with ``truncate=True``: gradient flows
through the final transition only and the state is detached between steps. One optimizer step per
supervision step (``updates_per_batch = N_sup``); the KL is analytic, so the guide must have one
(``check``). Options against the posterior shortcut (``docs/shortcut.md``), all off by default:

* a beta schedule: beta moves linearly from ``beta_start`` at the first batch to ``beta`` at batch
  ``beta_batches + 1`` and stays there (``beta_start: null``: beta is constant). Rising from a low
  price lets the posterior teach first and then makes it expensive to keep what the prior has not
  learned; falling from a high one keeps the prior in charge from the start;
* a KL cap (a rate target, as GECO's constraint): ``+ kl_cap_weight * max(0, KL / S - kl_cap)``, so
  the posterior may carry at most about ``kl_cap`` nats per target token per step before the penalty
  grows steeply;
* reconstruction from prior rollouts (the hybrid objective of Sohn et al., 2015): a second chain of
  supervision steps run with eps drawn from the **prior**, whose decoder is scored against a target,
  mixed in as ``(1 - prior_weight) * L_n + prior_weight * NLL_prior_n / S``. The target is the batch's
  (``prior_target=target``; on a task with several solutions per input it asks the prior chain for
  the average of them) or, with ``prior_target=nearest``, the valid answer of the input that the prior
  chain's own logits make most likely (``task.nearest_solution``): the prior chain learns to end in
  *some* solution, the posterior chain keeps every solution reachable. ``prior_target=distinct`` gives
  rollouts of the same input different answers (a greedy matching: each the nearest that no more
  confident rollout took), so that where one input has many solutions (unconditional generation) the
  rollouts are not all pulled to the one the prior already favours. ``prior_target=matched`` needs no
  solution set: the batch's own targets are dealt out again among the rollouts of the same input, each
  to the rollout whose logits make it most likely in a greedy matching
  (:func:`~gram_pyro.objectives.base.matched_targets`); in unconditional generation this couples a batch
  of prior samples to a batch of data one-to-one, so the rollouts are pulled towards the data's spread
  of answers, not towards the answers nearest to them. With ``prior_rollouts=R`` (and ``distinct``) the
  chain runs ``R`` rollouts of each of the first ``B / R`` inputs of the batch, at the same cost: on a
  task with several solutions per input the rollouts of one input learn to end in different ones. The
  prior chain joins after ``prior_start`` batches (before that the posterior chain alone has made the
  states worth finishing).

One more option runs on the same prior chain: **latent overshooting** (Hafner et al., 2019, PlaNet).
The prior chain has drawn every eps from the prior since ``z0``, so its state at step ``n`` is an
``(n + 1) T``-transition prediction of the prior alone; it pays

    + overshoot_weight * KL(sg(q(h_T^(n))) || p(h'_T^(n))) / S

between the distribution of the guided chain's final state, ``h_T^(n) = u + eps`` with eps from the
posterior (or from the prior at steps the posterior does not steer), and that of the prior chain's,
``h'_T^(n) = u' + eps'`` with ``eps' ~ p(eps | u')`` (:func:`~gram_pyro.objectives.base.overshooting_kl`).
The guided chain is the fixed target; the gradient reaches the prior head and the prior chain's
final transition. PlaNet averages over every distance from every posterior state; this term uses
one distance per step, the whole rollout from ``z0``.

The same chain can train the **halt and value heads** (``heads=prior``): they are scored at test time on
prior trajectories, where they pick an answer (``select=lprm`` / ``halt``) or weight the particles of
test-time SMC, so they learn there whether the prior chain's answer at step ``n`` is correct. Trained
on the guided chain (``heads=guided``, the paper's), they learn how often a trajectory that the target
steers is correct, which says little of a prior trajectory's answer. The heads read the state detached,
so where they are trained changes nothing else of the model. Before ``prior_start`` they train on the
guided chain.

Cost: ``N_sup T`` transitions per example and batch; ``2 N_sup T`` once the prior chain has joined
(``prior_weight > 0``, ``overshoot_weight > 0`` or ``heads=prior``: its own ``T`` transitions per
supervision step).
"""

from __future__ import annotations

import pyro.poutine as poutine
import torch

from gram_pyro.guides.base import proposal_site
from gram_pyro.objectives.base import (Judge, Nearest, Objective, balanced_kl, exact_match, head_losses,
                                       matched_targets, overshooting_kl, per_token, token_nll)
from gram_pyro.tasks.base import Batch

PRIOR_TARGETS = ("target", "nearest", "distinct", "matched")
HEAD_CHAINS = ("guided", "prior")


class TruncatedSurrogate(Objective):
    """The paper's truncated, per-supervision-step GRAM objective (module docstring)."""

    def __init__(self, beta: float = 1.0, kl_balance: float = 0.8, kl_cap: float | None = None,
                 kl_cap_weight: float = 10.0, prior_weight: float = 0.0, prior_target: str = "target",
                 prior_rollouts: int = 1, prior_start: int = 0, overshoot_weight: float = 0.0,
                 beta_start: float | None = None, beta_batches: int = 0, heads: str = "guided",
                 halt_weight: float = 1.0, value_weight: float = 1.0, judge: Judge = exact_match,
                 nearest: Nearest | None = None):
        if beta < 0 or not 0 <= kl_balance <= 1:
            raise ValueError(f"need beta >= 0 and 0 <= kl_balance <= 1, got beta={beta}, kl_balance={kl_balance}")
        if beta_start is not None and (isinstance(beta_start, bool) or not isinstance(beta_start, (int, float))
                                       or not 0 <= beta_start < float("inf")):
            raise ValueError(f"beta_start must be a finite number >= 0 or null, got {beta_start!r}")
        if isinstance(beta_batches, bool) or not isinstance(beta_batches, int) or beta_batches < 0 or \
                (beta_start is not None and beta_batches == 0):
            raise ValueError("beta_batches must be a whole number >= 0, and >= 1 with a beta_start, "
                             f"got {beta_batches!r}")
        if (kl_cap is not None and kl_cap < 0) or kl_cap_weight < 0 or not 0 <= prior_weight <= 1:
            raise ValueError(f"need kl_cap >= 0 (or null), kl_cap_weight >= 0 and 0 <= prior_weight <= 1, got "
                             f"kl_cap={kl_cap}, kl_cap_weight={kl_cap_weight}, prior_weight={prior_weight}")
        if prior_target not in PRIOR_TARGETS:
            raise ValueError(f"unknown prior_target {prior_target!r}; allowed: {', '.join(PRIOR_TARGETS)}")
        if prior_target in ("nearest", "distinct") and nearest is None:
            raise ValueError(f"prior_target={prior_target} needs the task's nearest_solution")
        if isinstance(prior_rollouts, bool) or not isinstance(prior_rollouts, int) or prior_rollouts < 1:
            raise ValueError(f"prior_rollouts must be a whole number >= 1, got {prior_rollouts!r}")
        if prior_rollouts > 1 and (prior_target != "distinct" or overshoot_weight or heads != "guided"):
            raise ValueError("prior_rollouts > 1 needs prior_target=distinct, and neither overshoot_weight nor "
                             "heads=prior (they pair each prior rollout with its guided one)")
        if isinstance(overshoot_weight, bool) or not isinstance(overshoot_weight, (int, float)) or \
                not 0 <= overshoot_weight < float("inf"):
            raise ValueError(f"overshoot_weight must be a finite number >= 0, got {overshoot_weight!r}")
        if isinstance(prior_start, bool) or not isinstance(prior_start, int) or prior_start < 0:
            raise ValueError(f"prior_start must be a whole number >= 0, got {prior_start!r}")
        if heads not in HEAD_CHAINS:
            raise ValueError(f"unknown heads {heads!r} (the chain the halt and value heads train on); allowed: "
                             f"{', '.join(HEAD_CHAINS)}")
        self.beta, self.kl_balance, self.beta_start, self.beta_batches = beta, kl_balance, beta_start, beta_batches
        self.kl_cap, self.kl_cap_weight, self.prior_weight = kl_cap, kl_cap_weight, prior_weight
        self.prior_target, self.nearest, self.prior_start = prior_target, nearest, prior_start
        self.prior_rollouts = prior_rollouts
        self.overshoot_weight, self.heads = overshoot_weight, heads
        self.halt_weight, self.value_weight, self.judge = halt_weight, value_weight, judge
        self.batches = 0  # batches seen, for prior_start (checkpointed)

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = state.get("batches", 0)

    @property
    def prior_chain(self) -> bool:
        """Whether a chain of prior rollouts runs (once ``prior_start`` batches have passed)."""
        return bool(self.prior_weight or self.overshoot_weight or self.heads == "prior")

    def prior_batch(self, batch: Batch) -> Batch:
        """The inputs of the prior chain, ``B`` rows as ``batch``: the batch, or with ``prior_rollouts=R``
        its rows ``i // R`` for ``i < B`` (the first ``ceil(B / R)`` inputs ``R`` times each, the last
        fewer where ``R`` does not divide ``B``; ``x``, ``y`` and ``puzzle``)."""
        if self.prior_rollouts == 1:
            return batch
        rows = torch.arange(len(batch.x), device=batch.x.device) // self.prior_rollouts
        return Batch(batch.x[rows], batch.y[rows], None if batch.puzzle is None else batch.puzzle[rows])

    def updates_per_batch(self, model) -> int:
        return model.n_sup

    def cost(self, model) -> int:
        """``N_sup T``, twice that with the prior chain (module docstring): the cost of a batch once the
        prior chain has joined."""
        return (2 if self.prior_chain else 1) * model.n_sup * model.transitions

    def run_cost(self, model, batches: int) -> int:
        """``N_sup T`` per batch, twice that for the batches after ``prior_start`` with the prior chain."""
        chained = max(batches - self.prior_start, 0) if self.prior_chain else 0
        return (batches + chained) * model.n_sup * model.transitions

    def check(self, model, guide) -> None:
        """A one-line ``ValueError`` if the guide's KL has no closed form (the surrogate needs one), or if
        latent overshooting is asked of a model whose states are not Gaussian (``norm_after_noise``)."""
        if not guide.analytic_kl:
            raise ValueError(f"guide {type(guide).__name__} has no analytic KL: use objective=truncated_mc "
                             "or a particle scheme (iwae, rws, smc)")
        if self.overshoot_weight and getattr(model, "norm_after_noise", False):
            raise ValueError("overshoot_weight compares the Gaussian states h = u + eps; with "
                             "model.norm_after_noise=true the states are normalized: set one of them off")

    def current_beta(self) -> float:
        """Beta of the batch in progress (``self.batches``, 1 for the first): ``beta``, or on the schedule
        ``beta_start + (beta - beta_start) * min(1, (batches - 1) / beta_batches)``."""
        if self.beta_start is None:
            return self.beta
        done = min(1.0, max(self.batches - 1, 0) / self.beta_batches)
        return self.beta_start + (self.beta - self.beta_start) * done

    def kl_penalty(self, kl: torch.Tensor) -> torch.Tensor:
        """``beta * KL`` (beta of :meth:`current_beta`) plus the cap's ``kl_cap_weight * max(0, KL - kl_cap)``
        (``kl`` per target token)."""
        penalty = self.current_beta() * kl
        if self.kl_cap is not None:
            penalty = penalty + self.kl_cap_weight * (kl - self.kl_cap).clamp(min=0)
        return penalty

    def loss(self, model, guide, batch: Batch, state: dict, update: int) -> tuple[torch.Tensor, dict]:
        if update == 0:
            state.clear()
            model.init(state, batch.x)
            self.batches += 1
            if self.prior_chain and self.batches > self.prior_start:
                state["prior"] = {}
                model.init(state["prior"], self.prior_batch(batch).x)
        n, last = update, model.transitions - 1
        prior_chain = "prior" in state
        if prior_chain:  # the prior chain's step n, before the guided one (both are site-named n)
            rollouts = self.prior_batch(batch)
            prior_trace = poutine.trace(model.step).get_trace(state["prior"], rollouts.x, truncate=True,
                                                              puzzle=rollouts.puzzle)
            prior_logits = prior_trace.nodes["_RETURN"]["value"]
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
        if prior_chain and self.heads == "prior":
            halt, value, prior_correct = head_losses(prior_trace, batch.x, batch.y, n, self.judge, prior_logits)
        loss = nll + self.kl_penalty(kl)
        metrics = {"nll": nll, "kl": kl}
        if self.beta_start is not None:
            metrics["beta"] = torch.tensor(self.current_beta(), device=loss.device)
        nan = None if prior_chain else torch.full((), float("nan"), device=loss.device)  # before prior_start
        if self.prior_weight:
            if prior_chain:
                if self.prior_target == "target":
                    target = rollouts.y
                elif self.prior_target == "matched":
                    target = matched_targets(rollouts.x, rollouts.y, prior_logits.detach())
                else:
                    target = self.nearest(rollouts.x, prior_logits.detach(), distinct=self.prior_target == "distinct")
                prior_nll = per_token(token_nll(prior_logits, target), rollouts.y)
                loss = (1 - self.prior_weight) * loss + self.prior_weight * prior_nll
            metrics["prior_nll"] = prior_nll if prior_chain else nan
        if self.overshoot_weight:
            if prior_chain:
                overshoot = torch.zeros_like(log_lik)
                for kind in model.noise_sites:
                    site = f"{kind}/{n}/{last}"
                    proposal = proposal_site(site)
                    overshoot = overshoot + overshooting_kl(
                        guide_trace.nodes[site]["fn"], model_trace.nodes[proposal]["value"],
                        prior_trace.nodes[site]["fn"], prior_trace.nodes[proposal]["value"])
                overshoot = per_token(overshoot, batch.y)
                loss = loss + self.overshoot_weight * overshoot
            metrics["overshoot"] = overshoot if prior_chain else nan
        if self.heads == "prior":
            metrics["prior_acc"] = prior_correct.mean() if prior_chain else nan
        loss = loss + self.halt_weight * halt + self.value_weight * value
        return loss, {"loss": loss, **metrics, "halt": halt, "value": value, "acc": correct.mean()}
