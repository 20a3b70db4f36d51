"""GRAM and its deterministic / naive-noise baselines as one Pyro program.

The program (docs/paper.md, "The model"; docs/method.md, "The program"): for supervision step ``n`` and transition
``t``::

    l      <- f_L(l, h + e_x)                         K times
    u      =  f_H(h, l)                               pyro.deterministic("u/{n}/{t}")
    eps    ~  p(eps | u) = N(mu(u), sigma(u)^2 I)     pyro.sample("eps/{n}/{t}"), event dims [L, D]
    h      =  u + eps                                 (rms_norm(u + eps) with norm_after_noise)
    ...after T transitions:
    y      ~  Categorical(f_dec(h))                   pyro.sample("y/{n}", obs=y), event dim [S]
                                                      (positions where y == IGNORE are masked out)
    answer =  argmax f_dec(h)                         pyro.deterministic("answer/{n}"), event dim [S]

``noise`` picks the prior of eps: ``learned`` (GRAM), ``zero_mean`` N(0, sigma(u)^2) and ``fixed``
N(0, s^2) (the paper's ablations) or ``none`` (deterministic TRM/HRM: no eps sites, ``h = u``).
With ``noise_on_low`` a second site ``eps_l/{n}/{t}`` perturbs the refined ``l`` the same way
(deterministic proposal ``u_l/{n}/{t}``) before f_H reads it.

``norm_after_noise`` puts every perturbed state back at unit RMS per token, ``h = rms_norm(u + eps)``,
as every state of the deterministic recursion is (the backbone ends in an RMSNorm). Without it the
noise heads' mean is a residual branch outside every norm, and under the truncated surrogate it can
grow until it swamps the state (on Sudoku 9x9 after 2,000 batches: docs/tasks/sudoku.md, "Longer
training"). The latent sites and their densities are the same either way; only the deterministic map
from ``(u, eps)`` to ``h`` differs.

Shapes: ``x, y [..., B, S]`` tokens, ``puzzle [B]`` identifiers (tasks with ``num_puzzles > 0``);
states ``h, l, e_x [..., B, L, D]`` with ``L = P + S``; leading
dims (vectorized particles, parallel trajectories) broadcast through everything. One plate
``data`` over ``B`` at dim -1, so ``max_plate_nesting = 1``.

The likelihood is observed at every supervision step (deep supervision), so the program's joint is
``prod_n p(y | z_T^(n)) prod_t p(eps_t | u_t)``. Without ``y`` the program (``forward``) is generative:
it samples ``y/{n}`` from the likelihood, as Pyro's convention for a generative model has it, so
``pyro.infer.Predictive`` returns sampled answers ``y/{n}`` and decoded ones ``answer/{n}``. ``step``
called alone by a driver (the samplers of :mod:`gram_pyro.inference`, SMC) samples ``y/{n}`` only
when asked (``sample_y=True``): a driver that decodes the logits itself draws no random numbers for it.

``z0 = (h0, l0)`` is a fixed part of the model (buffers drawn once at construction, kept in the
checkpoint), not a latent variable: it enters as plain tensors expanded over the enclosing plates
(:func:`plates_shape`), so that every particle of a particle plate owns a state (``SMCFilter``
resamples along it) and the only latent sites are the eps sites (what MCMC, autoguides and
``Predictive`` see).

Truncation (the paper's surrogate) is how the program is run, not a different program: with
``truncate=True`` the first ``T - 1`` transitions of a step run without gradient and the state is
detached when the step ends.

The halt logit and LPRM value are recorded as ``pyro.deterministic`` sites ``halt/{n}`` and
``value/{n}`` computed from a detached ``h``: they are not part of the generative model, never
enter an importance weight, and their losses (in the objective) never reach the core.
"""

from __future__ import annotations

import contextlib
import math

import pyro
import pyro.distributions as dist
import torch
from pyro.poutine.runtime import get_plates
from torch import nn

from gram_pyro.nn import GaussianHead, RecursiveCore, ScalarHead, TokenDecoder, TokenEncoder, rms_norm
from gram_pyro.tasks.base import IGNORE

NOISE_KINDS = ("learned", "zero_mean", "fixed", "none")
MAX_PLATE_NESTING = 1


def check_sizes(**sizes) -> None:
    """``ValueError`` naming the first size that is not a whole number of at least 1 (``num_prefix``: 0;
    ``noise_hidden``: also ``None``, meaning ``ffn_hidden``)."""
    for name, value in sizes.items():
        if name == "noise_hidden" and value is None:
            continue
        lowest = 0 if name == "num_prefix" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise ValueError(f"{name} must be an integer >= {lowest}, got {value!r}")


def plates_shape(batch_shape: torch.Size) -> torch.Size:
    """``batch_shape`` broadcast with the sizes of the enclosing vectorized plates at their dims (a
    particle plate of ``K`` at dim -2 around ``[B]`` gives ``[K, B]``)."""
    frames = [frame for frame in get_plates() if frame.vectorized]
    plates = [1] * max([-frame.dim for frame in frames], default=0)
    for frame in frames:
        plates[frame.dim] = frame.size
    return torch.broadcast_shapes(batch_shape, torch.Size(plates))


class RecursiveReasoningModel(nn.Module):
    """A recursive reasoning model with optional stochastic guidance on the high-level state.

    ``init(state, x)`` / ``step(state, x, y=None, truncate=False)`` follow the interface of
    :class:`pyro.infer.SMCFilter`; ``forward(x, y=None, n_sup=None, truncate=False)`` is the whole
    program (``init`` then ``n_sup`` steps) and is what Pyro's inference classes are given (SVI and
    its ELBOs, ``Predictive``, ``MCMC``).
    """

    def __init__(self, vocab_size: int, seq_len: int, dim: int = 64, ffn_hidden: int = 128,
                 num_layers: int = 2, mixer: str = "mlp", num_heads: int = 4, low_steps: int = 2,
                 transitions: int = 2, n_sup: int = 4, num_prefix: int = 16, shared: bool = True,
                 noise: str = "learned", noise_on_low: bool = False, init_scale: float = 1.0,
                 fixed_scale: float = 0.1, noise_hidden: int | None = None, norm_after_noise: bool = False,
                 num_puzzles: int = 0):
        super().__init__()
        if noise not in NOISE_KINDS:
            raise ValueError(f"unknown noise {noise!r}; allowed: {', '.join(NOISE_KINDS)}")
        if noise == "none" and noise_on_low:
            raise ValueError("noise_on_low needs a noise kind other than 'none'")
        if not isinstance(norm_after_noise, bool):
            raise ValueError(f"norm_after_noise must be true or false, got {norm_after_noise!r}")
        check_sizes(dim=dim, ffn_hidden=ffn_hidden, num_layers=num_layers, num_heads=num_heads,
                    low_steps=low_steps, transitions=transitions, n_sup=n_sup, num_prefix=num_prefix,
                    noise_hidden=noise_hidden)
        for name, value in (("init_scale", init_scale), ("fixed_scale", fixed_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if mixer == "attention" and (dim % num_heads or dim // num_heads % 2):
            raise ValueError(f"attention needs dim / num_heads to be an even integer (rotary positions turn "
                             f"pairs of features), got dim={dim}, num_heads={num_heads}")
        self.seq_len, self.vocab_size, self.dim, self.num_prefix = seq_len, vocab_size, dim, num_prefix
        self.transitions, self.n_sup, self.noise, self.fixed_scale = transitions, n_sup, noise, fixed_scale
        self.norm_after_noise = norm_after_noise
        length = num_prefix + seq_len
        self.encoder = TokenEncoder(vocab_size, dim, num_prefix, num_puzzles)
        self.core = RecursiveCore(dim, ffn_hidden, length, num_layers, mixer, num_heads, low_steps, shared)
        self.decoder = TokenDecoder(dim, vocab_size, num_prefix)
        self.halt_head = ScalarHead(dim)
        self.value_head = ScalarHead(dim)
        learned_scale = noise in ("learned", "zero_mean")
        sites = ["eps"] + (["eps_l"] if noise_on_low else [])
        self.noise_heads = nn.ModuleDict(
            {site: GaussianHead(dim, noise_hidden or ffn_hidden, init_scale) for site in sites}
            if learned_scale else {}
        )
        self.noise_sites = tuple(sites) if noise != "none" else ()
        # z0 = (h0, l0) ~ N(0, I), drawn once and kept in the checkpoint (docs/paper.md, "The model").
        self.register_buffer("h0", torch.randn(length, dim))
        self.register_buffer("l0", torch.randn(length, dim))
        self._data_plate: pyro.plate | None = None
        self._step_index = 0

    @property
    def stochastic(self) -> bool:
        return bool(self.noise_sites)

    def prior(self, kind: str, u: torch.Tensor) -> dist.Distribution:
        """p(eps | u) for ``kind`` in ``noise_sites``: Normal with event dims ``[L, D]``."""
        if self.noise == "fixed":
            return dist.Normal(torch.zeros_like(u), self.fixed_scale).to_event(2)
        loc, scale = self.noise_heads[kind](u)
        if self.noise == "zero_mean":
            loc = torch.zeros_like(loc)
        return dist.Normal(loc, scale).to_event(2)

    def _perturb(self, kind: str, n: int, t: int, u: torch.Tensor) -> torch.Tensor:
        """Record the proposal ``u{kind[3:]}/{n}/{t}`` and return ``u + eps`` (``rms_norm(u + eps)`` with
        ``norm_after_noise``), ``eps ~ p(eps | u)`` at site ``{kind}/{n}/{t}``."""
        pyro.deterministic(f"u{kind[3:]}/{n}/{t}", u, event_dim=2)
        state = u + pyro.sample(f"{kind}/{n}/{t}", self.prior(kind, u))
        return rms_norm(state) if self.norm_after_noise else state

    def init(self, state: dict, x: torch.Tensor) -> None:
        """Set ``state`` to z0 = (h0, l0), each ``[..., B, L, D]`` over the enclosing plates (no sample
        site: z0 is part of the model, see the module docstring)."""
        pyro.module("model", self)
        self._data_plate = pyro.plate("data", x.shape[-2], dim=-1)
        self._step_index = 0
        shape = plates_shape(x.shape[:-1])
        state["h"], state["l"] = self.h0.expand(*shape, *self.h0.shape), self.l0.expand(*shape, *self.l0.shape)

    def likelihood(self, n: int, logits: torch.Tensor, y: torch.Tensor | None, sample_y: bool) -> None:
        """The site ``y/{n}`` of ``Categorical(logits)`` (``logits [..., B, S, V]``, event dim ``[S]``):
        observing ``y`` (``IGNORE`` positions masked out), sampled where ``y`` is None and
        ``sample_y``, absent otherwise; and the decoded answer ``answer/{n}`` (argmax, ``[..., B, S]``)."""
        if y is not None:
            likelihood = dist.Categorical(logits=logits).mask(y != IGNORE).to_event(1)
            pyro.sample(f"y/{n}", likelihood, obs=y.clamp(min=0))
        elif sample_y:
            pyro.sample(f"y/{n}", dist.Categorical(logits=logits).to_event(1))
        pyro.deterministic(f"answer/{n}", logits.argmax(-1), event_dim=1)

    def step(self, state: dict, x: torch.Tensor, y: torch.Tensor | None = None,
             truncate: bool = False, puzzle: torch.Tensor | None = None, sample_y: bool = False) -> torch.Tensor:
        """One supervision step of ``T`` transitions from ``state``; returns the decoder logits
        ``[..., B, S, V]`` and updates ``state`` in place. Target positions equal to ``IGNORE`` are
        masked out of the likelihood; ``puzzle [B]`` feeds the per-puzzle prefix embedding;
        ``sample_y``: sample ``y/{n}`` where ``y`` is None (:meth:`likelihood`)."""
        if self._data_plate is None:
            raise RuntimeError("call init(state, x) before step(state, x, ...)")
        n = self._step_index
        h, l = state["h"], state["l"]
        e_x = self.encoder(x, puzzle)  # [..., B, L, D]; re-embedded per step so each step owns its graph
        with self._data_plate:
            for t in range(self.transitions):
                with_grad = not truncate or t == self.transitions - 1
                with contextlib.nullcontext() if with_grad else torch.no_grad():
                    l = self.core.refine_low(l, h, e_x)
                    if "eps_l" in self.noise_sites:
                        l = self._perturb("eps_l", n, t, l)
                    u = self.core.propose_high(h, l)
                    if self.stochastic:
                        h = self._perturb("eps", n, t, u)
                    else:
                        h = pyro.deterministic(f"u/{n}/{t}", u, event_dim=2)
            logits = self.decoder(h)
            self.likelihood(n, logits, y, sample_y)
            pyro.deterministic(f"halt/{n}", self.halt_head(h.detach()))
            pyro.deterministic(f"value/{n}", self.value_head(h.detach()).sigmoid())
        if truncate:
            h, l = h.detach(), l.detach()
        state["h"], state["l"] = h, l
        self._step_index = n + 1
        return logits

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, n_sup: int | None = None,
                truncate: bool = False, puzzle: torch.Tensor | None = None, sample_y: bool = True) -> torch.Tensor:
        """The whole program: ``init`` then ``n_sup`` (default: the trained number) supervision steps,
        sampling ``y/{n}`` where ``y`` is None unless ``sample_y=False``. Returns the last step's
        logits ``[..., B, S, V]``."""
        state: dict = {}
        self.init(state, x)
        for _ in range(n_sup or self.n_sup):
            logits = self.step(state, x, y, truncate=truncate, puzzle=puzzle, sample_y=sample_y)
        return logits
