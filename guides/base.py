"""Effect-based guides for the ``eps/{n}/{t}`` sites of a recursive reasoning model.

A guide is a :class:`pyro.poutine.guide.GuideMessenger`: it runs *with* the model, so every
transition's backbone pass happens once; at each eps site it reads the proposal ``u/{n}/{t}`` that
the model has just recorded (``upstream_value``) and returns the posterior to sample from.

``posterior_transitions`` says which eps sites the posterior covers:

- ``"all"``: every transition (the full trajectory ELBO).
- ``"last"``: only the final transition of each supervision step; earlier transitions follow the
  prior, i.e. the variational family sets ``q(eps_t) = p(eps_t | u_t)`` there. This is the family
  under which the paper's truncated surrogate (KL paid on the final transition only) is an exact
  ELBO of the step, and it keeps the target from flowing into the state through transitions that
  pay no KL (docs/shortcut.md).

``posterior_steps`` (``None``: all) limits the posterior to the first that many supervision steps;
later steps follow the prior and are trained on the target they are handed, so they learn to finish
from a state that a low-KL posterior has only steered (``docs/shortcut.md``).

The target ``y`` is read from the arguments of the program the guide runs (its ``y`` parameter).
"""

from __future__ import annotations

import inspect
from typing import Callable

import pyro
import torch
from pyro.poutine.guide import GuideMessenger
from pyro.poutine.trace_struct import Trace
from torch import nn

POSTERIOR_TRANSITIONS = ("last", "all")


def proposal_site(eps_site: str) -> str:
    """``eps/{n}/{t} -> u/{n}/{t}`` and ``eps_l/{n}/{t} -> u_l/{n}/{t}``."""
    kind, rest = eps_site.split("/", 1)
    return f"u{kind[3:]}/{rest}"


class EpsGuide(GuideMessenger, nn.Module):
    """Base of the guide families: routes eps sites to :meth:`posterior`, everything else to its
    prior. Subclasses implement ``posterior(kind, u, y, prior)`` for ``kind`` in ``{"eps", "eps_l"}``.
    ``analytic_kl``: the posterior is a diagonal Normal, so KL(q || p) has a closed form."""

    analytic_kl = True

    def __init__(self, model: nn.Module, posterior_transitions: str = "last", posterior_steps: int | None = None):
        nn.Module.__init__(self)
        GuideMessenger.__init__(self, model)
        if posterior_transitions not in POSTERIOR_TRANSITIONS:
            raise ValueError(f"unknown posterior_transitions {posterior_transitions!r}; "
                             f"allowed: {', '.join(POSTERIOR_TRANSITIONS)}")
        if posterior_steps is not None and (isinstance(posterior_steps, bool) or not isinstance(posterior_steps, int)
                                            or posterior_steps < 1):
            raise ValueError(f"posterior_steps must be a whole number >= 1 or null, got {posterior_steps!r}")
        self.posterior_transitions, self.posterior_steps = posterior_transitions, posterior_steps
        self._program_signature: inspect.Signature | None = None

    def hidden_width(self, hidden: int | None) -> int:
        """The width of a family's hidden layer: ``hidden``, or ``2 * model.dim`` when ``None``."""
        if hidden is None:
            return 2 * self.model.dim
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a whole number >= 1 or null (2 * model.dim), got {hidden!r}")
        return hidden

    def __call__(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Run the whole model program under the guide (what Pyro's ELBOs call)."""
        pyro.module("guide", self)
        self._program_signature = inspect.signature(self.model.forward)
        return super().__call__(*args, **kwargs)

    def run(self, program: Callable, *args, **kwargs) -> tuple[Trace, Trace]:
        """Run any program of the model (``model.step`` for one supervision step) under the guide and
        return ``(model_trace, guide_trace)``; the model trace's eps sites carry the prior."""
        self._program_signature = inspect.signature(program)
        self.args_kwargs = args, kwargs
        try:
            with self:
                program(*args, **kwargs)
        finally:
            del self.args_kwargs
        return self.get_traces()

    def argument(self, name: str):
        """The argument ``name`` the model program was called with (``None`` if it was not passed)."""
        args, kwargs = self.args_kwargs
        return self._program_signature.bind(*args, **kwargs).arguments.get(name)

    def target(self) -> torch.Tensor:
        """The target ``y`` the model program was called with."""
        y = self.argument("y")
        if y is None:
            raise ValueError("the posterior needs the target: call the program with y=<targets>")
        return y

    def covers(self, name: str) -> bool:
        """Whether the posterior (rather than the prior) is used at site ``name``."""
        if not name.startswith("eps"):
            return False
        if self.posterior_steps is not None and int(name.split("/")[1]) >= self.posterior_steps:
            return False
        if self.posterior_transitions == "all":
            return True
        return int(name.rsplit("/", 1)[1]) == self.model.transitions - 1

    def get_posterior(self, name: str, prior):
        if not self.covers(name):
            return prior
        return self.posterior(name.split("/", 1)[0], self.upstream_value(proposal_site(name)), self.target(), prior)

    def posterior(self, kind: str, u: torch.Tensor, y: torch.Tensor, prior):
        raise NotImplementedError


class PriorGuide(EpsGuide):
    """Prior as guide: no posterior at all. Training then fits the model on its own prior samples
    (the naive-stochasticity ablation); for a deterministic model it is the only sensible guide."""

    def covers(self, name: str) -> bool:
        return False
