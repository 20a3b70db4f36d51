"""Sampling trajectories: width (N trajectories per input), depth (supervision steps), ACT halting,
chunking to a memory budget, and the naive-stochasticity / PTRM baselines.

``sample_trajectories(model, x [B, S], N)`` drives the model contract (``model.init`` then
``model.step`` per supervision step) itself, so that it can halt, perturb the state between steps and
read the heads after every step. The ``N`` trajectories are a tensor dim: a ``pyro.plate``
``trajectories`` at dim -2 (outside the model's ``data`` plate at dim -1) makes the state
``[n, b, L, D]`` for a chunk of ``n`` trajectories and ``b`` inputs; the encoder still reads ``x [b, S]``
(``e_x [b, L, D]`` broadcasts over the trajectories). The answer of a step is the argmax of its logits
``[n, b, S, V]``; the halt logit and LPRM value are the step's ``halt/{n}`` and ``value/{n}`` sites.

Halting (``halting=True``, ACT as the paper's code): a trajectory halts after the first step whose
``sigmoid(halt_logit) > 0.5`` (``halt_logit > 0``), or at ``depth``. From then on its answer, halt
logit, value and step count are frozen (``torch.where`` on the halted mask) while the rest of the
chunk runs on; a chunk stops early once all of its trajectories have halted (unless every step is
recorded). Without halting every trajectory runs ``depth`` steps (any depth: more steps than training
used is fine).

Keyed randomness: every random number of trajectory ``i`` (global index ``0 <= i < N``) for input row
``r`` (its index in ``x`` plus ``first_row``) comes from a counter-based stream of its own, computed by
integer tensor arithmetic on the device of ``x`` (there is no generator state): the SplitMix64 stream
with the key ``k(i, r) = mix(mix(mix(seed) + i) + r)``, whose ``j``-th 64-bit value is
``mix(k + (j + 1) * 0x9E3779B97F4A7C15)``, ``mix`` being SplitMix64's finalizer and all arithmetic
modulo ``2^64`` (:func:`mix64`). The ``d``-th draw of a trajectory (in program order) of ``E`` values
per input takes the values ``j = d * 2^32 + k``: two 23-bit fields of value ``k`` give
``u1, u2 = (field + 1/2) / 2^23`` and Box-Muller's pair of standard normals ``e = 2k`` and ``2k + 1``
(``sqrt(-2 ln u1)`` times ``cos`` and ``sin`` of ``2 pi u2``); a uniform draw ``e`` is ``u1`` and an
Exp(1) draw ``-ln u1``, of value ``k = e``. The draws of a trajectory, in order: ``h0``, ``l0``
(perturbation ``z0``), then per step the model's noise sites in program order (each eps site becomes
``loc + t * scale * z``, a :class:`KeyedNoise` messenger, ``t`` the prior temperature below), the
decoder's Gumbel noise (perturbation ``decoder``) and the latent noise (perturbation ``ptrm``). Lane
``i = -1``, which no trajectory has, is the stream of test-time SMC's resampler
(:mod:`gram_pyro.test_time_smc`). So every random number is a function of ``(seed, i, r, d, e)``
alone and the result of ``(seed, model, x)``: chunked and unchunked sampling agree (up to the float
rounding of matmul kernels picked for other chunk sizes), trajectory ``i`` is the same whatever ``N``,
an input's trajectories do not depend on the other inputs (a batch fed in blocks, each with its
``first_row``, gives the answers of the whole batch at once), and a chunk computes only its own rows'
numbers. The network always runs batched over the chunk. CPU and CUDA compute the same streams (their
float functions may round the last bit differently).

Chunking: one trajectory over ``b`` inputs needs about
``b * L * D * element size * ACTIVATION_FACTOR`` bytes of working memory (:func:`trajectory_bytes`;
the factor covers the state, the transient activations of the widest layer, the noise and the
logits, measured with ``benchmarks/sampling.py``). :func:`plan_chunks` splits ``N`` (and, when one
trajectory over the whole batch does not fit, ``B``) so that a chunk fits ``memory_budget_mb``. The
result tensors themselves are not counted, but a request whose results alone would not fit the
device's memory is refused (:func:`check_result_size`). The default budget (:func:`default_memory_budget_mb`) is
half the free memory of a CUDA device, and the size of the last-level cache on CPU: there a chunk
whose working set outgrows the cache is slower per trajectory (measured with
``benchmarks/sampling.py``: at one thread, 50 trajectories of 16 inputs cost 1.25 times one
trajectory each in chunks of 20 trajectories, 1.0 in chunks of 2).

Deterministic models (``model.stochastic`` False) without a perturbation run once and their outputs
are expanded to ``N`` (views). Perturbations (:class:`Perturbation`), the baselines of docs/paper.md
("Inference-time scaling"), apply to any model:

* ``ptrm``: ``state[which] += sigma * z`` after every supervision step but the last (PTRM's test-time
  noise on the latent of a trained deterministic model; ``which`` is ``h`` or ``l``);
* ``decoder``: the answer is a draw from ``Categorical(logits / temperature)`` (Gumbel-max:
  ``argmax(logits / temperature - log E)``, ``E ~ Exp(1)``) instead of the argmax;
* ``z0``: ``h0`` and ``l0`` are replaced by fresh ``N(0, I)`` draws per trajectory and input.

A deterministic model under ``decoder`` alone runs the network on one lane and samples ``N`` decodes.

The prior temperature ``t`` (``prior_temperature``, default 1: the prior itself) scales the standard
deviation of the model's own noise, ``eps ~ N(mu, (t * sigma)^2)``: below 1 the trajectories keep closer
to the prior's mean (fewer, surer answers), above 1 they spread (more distinct answers, more errors).
It is the usual temperature of a generative model's latent noise, a test-time choice like ``N``; it
changes nothing for a deterministic model.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields, replace
from functools import cache
from pathlib import Path
from typing import Mapping

import pyro
import torch
from pyro.poutine.messenger import Messenger

from gram_pyro.config import UserError
from gram_pyro.objectives.base import step_logits

PERTURBATION_KINDS = ("ptrm", "decoder", "z0")
LATENTS = ("h", "l")
SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
MIX_MULTIPLIERS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
DRAW_STRIDE = 2**32
"""Counter values each draw of a keyed stream owns: at most this many numbers per trajectory and input."""
ACTIVATION_FACTOR = 40
"""Peak working memory of one trajectory in units of its state ``h`` (``L x D`` elements): measured as
peak RSS growth per trajectory on CPU, 14-33 over dims 64-128, ffn_hidden 2-4 x dim, MLP-mixer and
attention (33 at the demo config); 40 leaves a margin."""
CPU_CACHE_FALLBACK_MB = 32.0
"""The CPU budget where the last-level cache size cannot be read (not Linux)."""


def _is_number(value) -> bool:
    """Whether ``value`` is an int or a float (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_positive_finite(value) -> bool:
    """Whether ``value`` is a finite int or float above 0 (a bool is not a number here)."""
    return _is_number(value) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class Perturbation:
    """A test-time source of randomness (see the module docstring): ``kind`` in ``ptrm`` | ``decoder``
    | ``z0``; ``sigma`` and ``which`` (``h`` | ``l``) for ``ptrm``; ``temperature`` for ``decoder``."""

    kind: str
    sigma: float = 0.1
    which: str = "h"
    temperature: float = 1.0

    def __post_init__(self):
        if self.kind not in PERTURBATION_KINDS:
            raise UserError(f"unknown perturbation kind {self.kind!r}; allowed: {', '.join(PERTURBATION_KINDS)}")
        if self.which not in LATENTS:
            raise UserError(f"unknown perturbation latent which={self.which!r}; allowed: {', '.join(LATENTS)}")
        for name in ("sigma", "temperature"):
            value = getattr(self, name)
            if not is_positive_finite(value):
                raise UserError(f"perturbation {name} must be a positive finite number, got {value!r}")

    @property
    def perturbs_latent(self) -> bool:
        return self.kind in ("ptrm", "z0")


def as_perturbation(spec: Perturbation | Mapping | str | None) -> Perturbation | None:
    """A :class:`Perturbation` from itself, a mapping of its fields (a config node), a kind alone (its
    defaults) or ``None``."""
    if spec is None or isinstance(spec, Perturbation):
        return spec
    if isinstance(spec, str):
        return Perturbation(spec)
    allowed = [f.name for f in fields(Perturbation)]
    unknown = sorted(set(spec) - set(allowed))
    if unknown or "kind" not in spec:
        problem = f"unknown perturbation option {unknown[0]!r}" if unknown else "perturbation needs a kind"
        raise UserError(f"{problem}; allowed: {', '.join(allowed)}")
    return Perturbation(**spec)


@dataclass
class Trajectories:
    """``N`` trajectories for ``B`` inputs. ``answers [N, B, S]`` (the answer each trajectory ends with),
    ``halt_logit [N, B]`` and ``value [N, B]`` at the step that answer was taken, ``steps [N, B]``
    (supervision steps used), the ``seed`` of the keyed streams, and with ``record_steps`` every step's
    decoded answer ``step_answers [depth, N, B, S]``, ``step_halt_logit`` and ``step_value``
    ``[depth, N, B]`` (recorded whether or not the trajectory had halted)."""

    answers: torch.Tensor
    halt_logit: torch.Tensor
    value: torch.Tensor
    steps: torch.Tensor
    seed: int
    step_answers: torch.Tensor | None = None
    step_halt_logit: torch.Tensor | None = None
    step_value: torch.Tensor | None = None

    def expand(self, num_samples: int) -> "Trajectories":
        """The same trajectories repeated to ``num_samples`` (views), from a run with one trajectory."""
        grow = {name: _expand_dim(getattr(self, name), dim, num_samples) for name, dim in _FIELD_SAMPLE_DIM.items()}
        return replace(self, **grow)


_FIELD_SAMPLE_DIM = {"answers": 0, "halt_logit": 0, "value": 0, "steps": 0,
                     "step_answers": 1, "step_halt_logit": 1, "step_value": 1}
"""The sample (``N``) dim of each tensor field of :class:`Trajectories`; the inputs (``B``) dim follows."""


def _expand_dim(tensor: torch.Tensor | None, dim: int, size: int) -> torch.Tensor | None:
    if tensor is None:
        return None
    shape = list(tensor.shape)
    shape[dim] = size
    return tensor.expand(shape)


def int64(value: int) -> int:
    """The int64 with the low 64 bits of ``value``: torch's integers are signed and its integer
    arithmetic wraps modulo ``2^64``, which the keyed streams rely on."""
    value &= 2**64 - 1
    return value - 2**64 if value >= 2**63 else value


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """The logical (unsigned) right shift of int64 words."""
    return (z >> bits).bitwise_and_((1 << (64 - bits)) - 1)


def _mix64_(z: torch.Tensor) -> torch.Tensor:
    """:func:`mix64` in place (``z`` is overwritten and returned)."""
    z.bitwise_xor_(_shift_right(z, 30)).mul_(int64(MIX_MULTIPLIERS[0]))
    z.bitwise_xor_(_shift_right(z, 27)).mul_(int64(MIX_MULTIPLIERS[1]))
    return z.bitwise_xor_(_shift_right(z, 31))


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 words (a bijection of 64-bit words; arithmetic modulo ``2^64``)."""
    return _mix64_(z.clone())


def _uniform(words: torch.Tensor, shift: int) -> torch.Tensor:
    """Uniform draws in (0, 1) (float32, never 0 or 1) from the 23 bits of ``words`` above bit ``shift``."""
    return _shift_right(words, shift).bitwise_and_(2**23 - 1).float().add_(0.5).mul_(2**-23)


class KeyedRandom:
    """The keyed streams (module docstring) of the trajectories ``lanes`` for the input rows ``rows``
    (global indices of both). Each draw computes ``[len(lanes), len(rows), *tail]`` numbers, those
    rows' and no others."""

    def __init__(self, seed: int, lanes: range, rows: range, device: torch.device, dtype: torch.dtype):
        lane = mix64(mix64(torch.tensor(int64(seed), device=device)) + torch.arange(lanes.start, lanes.stop,
                                                                                   device=device))
        self.keys = mix64(lane[:, None] + torch.arange(rows.start, rows.stop, device=device))  # [n, b]
        self.dtype, self.draws = dtype, 0

    def __len__(self) -> int:
        return self.keys.shape[0]

    def _words(self, count: int) -> torch.Tensor:
        """The next draw's ``count`` 64-bit values per stream, ``[n, b, count]`` (int64 words)."""
        if count > DRAW_STRIDE:
            raise ValueError(f"a draw of {count} values per trajectory and input exceeds {DRAW_STRIDE}")
        counter = torch.arange(count, device=self.keys.device) + (self.draws * DRAW_STRIDE + 1)
        self.draws += 1
        return _mix64_(self.keys[..., None] + counter * int64(SPLITMIX_GAMMA))

    def normal(self, tail: torch.Size) -> torch.Tensor:
        """Standard normal draws ``[n, b, *tail]``: Box-Muller's pair (cosine, sine) from each value."""
        count = math.prod(tail)
        words = self._words((count + 1) // 2)
        radius = _uniform(words, 41).log_().mul_(-2).sqrt_()
        angle = _uniform(words, 18).mul_(2 * math.pi)
        pairs = torch.stack((radius * angle.cos(), radius.mul_(angle.sin_())), -1).flatten(-2)
        return pairs[..., :count].reshape(*self.keys.shape, *tail).to(self.dtype)

    def uniform(self, tail: torch.Size) -> torch.Tensor:
        """Uniform draws in (0, 1) ``[n, b, *tail]`` (23 bits each, never 0 or 1)."""
        words = self._words(math.prod(tail))
        return _uniform(words, 41).reshape(*self.keys.shape, *tail).to(self.dtype)

    def exponential(self, tail: torch.Size) -> torch.Tensor:
        """Exp(1) draws ``[n, b, *tail]``."""
        words = self._words(math.prod(tail))
        return _uniform(words, 41).log_().neg_().reshape(*self.keys.shape, *tail).to(self.dtype)


class KeyedNoise(Messenger):
    """Draws every sample site named ``{kind}/...`` with ``kind`` in ``sites`` (the model's Normal noise
    sites) as ``loc + temperature * scale * z``, ``z`` from ``keyed.normal``: the prior draw (at
    ``temperature`` 1), with keyed randomness."""

    def __init__(self, sites: tuple[str, ...], keyed: KeyedRandom, temperature: float = 1.0):
        super().__init__()
        self.sites, self.keyed, self.temperature = sites, keyed, temperature

    def _pyro_sample(self, msg: dict) -> None:
        if msg["name"].partition("/")[0] not in self.sites or msg["is_observed"] or msg["value"] is not None:
            return
        normal = msg["fn"].base_dist
        if not isinstance(normal, pyro.distributions.Normal):
            raise TypeError(f"site {msg['name']}: keyed noise needs a Normal prior, got {type(normal).__name__}")
        msg["value"] = normal.loc + self.temperature * normal.scale * self.keyed.normal(msg["fn"].event_shape)


class HeadRecorder(Messenger):
    """Keeps the latest value of the ``halt/{n}`` and ``value/{n}`` sites under ``"halt"``, ``"value"``."""

    HEADS = ("halt", "value")

    def __init__(self):
        super().__init__()
        self.values: dict[str, torch.Tensor] = {}

    def _pyro_post_sample(self, msg: dict) -> None:
        kind = msg["name"].partition("/")[0]
        if kind in self.HEADS:
            self.values[kind] = msg["value"]


def trajectory_bytes(model, batch: int) -> int:
    """Estimated working memory of one trajectory over ``batch`` inputs:
    ``batch * L * D * element size * ACTIVATION_FACTOR`` bytes."""
    length, dim = model.h0.shape
    return batch * length * dim * model.h0.element_size() * ACTIVATION_FACTOR


@cache
def last_level_cache_mb() -> float:
    """The largest CPU cache of CPU 0 in MB, from Linux sysfs (read once per process);
    :data:`CPU_CACHE_FALLBACK_MB` where that cannot be read."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        match = re.fullmatch(r"(\d+)([KMG]?)", entry.read_text().strip())
        if match:
            sizes.append(int(match[1]) * {"": 2**-20, "K": 2**-10, "M": 1, "G": 2**10}[match[2]])
    return max(sizes, default=CPU_CACHE_FALLBACK_MB)


def default_memory_budget_mb(device: torch.device) -> float:
    """Half the free memory of a CUDA device; the last-level cache (:func:`last_level_cache_mb`) on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2 / 2**20
    return last_level_cache_mb()


def plan_chunks(num_samples: int, batch: int, bytes_per_input: int, budget_bytes: float) -> tuple[int, int]:
    """``(trajectories, inputs)`` per chunk such that ``trajectories * inputs * bytes_per_input`` fits
    ``budget_bytes``: all inputs and as many trajectories as fit, or one trajectory and as many inputs
    as fit (at least one of each, whatever the budget; an infinite budget is one chunk)."""
    per_trajectory = batch * bytes_per_input
    if per_trajectory <= budget_bytes:
        return max(1, int(min(num_samples, budget_bytes / per_trajectory))), batch
    return 1, max(1, int(budget_bytes / bytes_per_input))


def _decode(logits: torch.Tensor, perturbation: Perturbation | None, keyed: KeyedRandom) -> torch.Tensor:
    """Answers ``[n, b, S]`` from logits ``[n | 1, b, S, V]``: argmax, or a keyed Gumbel-max draw from
    ``Categorical(logits / temperature)`` under the ``decoder`` perturbation."""
    if perturbation is not None and perturbation.kind == "decoder":
        return (logits / perturbation.temperature - keyed.exponential(logits.shape[-2:]).log()).argmax(-1)
    return logits.argmax(-1)


def _sample_chunk(model, x: torch.Tensor, puzzle: torch.Tensor | None, depth: int, halting: bool,
                  perturbation: Perturbation | None, keyed: KeyedRandom, record_steps: bool,
                  prior_temperature: float) -> dict:
    """The trajectories of one chunk (``x [b, S]``, ``len(keyed)`` trajectories) as a dict of the
    :class:`Trajectories` tensor fields, each with leading dims ``[n | 1, b]`` (after ``depth`` for the
    step fields)."""
    lanes = len(keyed) if model.stochastic or (perturbation is not None and perturbation.perturbs_latent) else 1
    state: dict = {}
    heads = HeadRecorder()
    halted = torch.zeros(lanes, x.shape[0], dtype=torch.bool, device=x.device)
    steps = torch.zeros_like(halted, dtype=torch.long)
    answer = halt = value = None
    recorded: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    noise = KeyedNoise(model.noise_sites, keyed, prior_temperature)
    with pyro.plate("trajectories", lanes, dim=-2), noise, heads:
        model.init(state, x)
        if perturbation is not None and perturbation.kind == "z0":
            state["h"], state["l"] = keyed.normal(model.h0.shape), keyed.normal(model.l0.shape)
        for n in range(depth):
            step_answer = _decode(model.step(state, x, puzzle=puzzle), perturbation, keyed)
            step_halt, step_value = heads.values["halt"], heads.values["value"]
            if answer is None:
                answer, halt, value = step_answer, step_halt, step_value
            else:
                answer = torch.where(halted[..., None], answer, step_answer)
                halt, value = torch.where(halted, halt, step_halt), torch.where(halted, value, step_value)
            steps += ~halted
            if record_steps:
                recorded.append((step_answer, step_halt, step_value))
            if halting:
                halted |= step_halt > 0
                if not record_steps and bool(halted.all()):
                    break
            if perturbation is not None and perturbation.kind == "ptrm" and n < depth - 1:
                latent = state[perturbation.which]
                state[perturbation.which] = latent + perturbation.sigma * keyed.normal(latent.shape[-2:])
    out = {"answers": answer, "halt_logit": halt, "value": value, "steps": steps}
    if record_steps:
        step_fields = ("step_answers", "step_halt_logit", "step_value")
        out.update({name: torch.stack(values) for name, values in zip(step_fields, zip(*recorded))})
    return out


@torch.no_grad()
def sample_trajectories(model, x: torch.Tensor, num_samples: int, depth: int | None = None,
                        halting: bool = False, puzzle: torch.Tensor | None = None,
                        memory_budget_mb: float | None = None, seed: int | None = None,
                        perturbation: Perturbation | Mapping | str | None = None,
                        record_steps: bool = False, first_row: int = 0, prior_temperature: float = 1.0
                        ) -> Trajectories:
    """``num_samples`` prior trajectories of ``depth`` (default ``model.n_sup``) supervision steps for
    each input of ``x [B, S]`` (``puzzle [B]`` where the model embeds puzzle identifiers); see the
    module docstring. ``seed=None`` draws the seed from torch's global generator;
    ``memory_budget_mb=None`` is :func:`default_memory_budget_mb` of ``x``'s device; ``first_row`` is
    the row index of ``x[0]`` in the keyed streams (a block of a larger batch passes its offset);
    ``prior_temperature`` scales the noise's standard deviation (module docstring)."""
    perturbation = as_perturbation(perturbation)
    depth, memory_budget_mb, seed = resolve_sampling(model, x, num_samples, depth, memory_budget_mb, seed,
                                                     prior_temperature)
    lanes = num_samples if model.stochastic or perturbation is not None else 1
    check_result_size(lanes, x.shape[0], x.shape[-1], depth if record_steps else 0, x.device)
    sampled = _sample(model, x, lanes, depth, halting, puzzle, memory_budget_mb, seed, perturbation, record_steps,
                      first_row, prior_temperature)
    return sampled.expand(num_samples) if lanes < num_samples else sampled


def resolve_sampling(model, x: torch.Tensor, num_samples: int, depth: int | None, memory_budget_mb: float | None,
                     seed: int | None, prior_temperature: float = 1.0) -> tuple[int, float, int]:
    """``(depth, memory_budget_mb, seed)`` of a sampler call with their defaults filled in (the trained
    depth, :func:`default_memory_budget_mb` of ``x``'s device, a seed from torch's global generator);
    a count, depth, budget or prior temperature out of range is a one-line :class:`UserError`."""
    depth = model.n_sup if depth is None else depth
    if num_samples < 1 or depth < 1:
        raise UserError(f"need at least one trajectory and one step, got num_samples={num_samples}, depth={depth}")
    if not is_positive_finite(prior_temperature):
        raise UserError(f"prior_temperature must be a positive finite number, got {prior_temperature!r}")
    if memory_budget_mb is None:
        memory_budget_mb = default_memory_budget_mb(x.device)
    if not memory_budget_mb > 0:
        raise UserError(f"memory_budget_mb must be positive, got {memory_budget_mb}")
    return depth, memory_budget_mb, int(torch.randint(2**32, ())) if seed is None else seed


def result_bytes(num_samples: int, batch: int, seq_len: int, recorded_steps: int) -> int:
    """Bytes of the :class:`Trajectories` tensors of ``num_samples`` trajectories of ``batch`` inputs:
    answers (int64), halt logit and value (float32), steps (int64), and per recorded step an answer,
    halt logit and value."""
    return num_samples * batch * ((seq_len * 8 + 16) + recorded_steps * (seq_len * 8 + 8))


def memory_bytes(device: torch.device) -> int | None:
    """The memory of ``device``: a CUDA device's total memory, or the machine's physical memory
    (``None`` where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_result_size(num_samples: int, batch: int, seq_len: int, recorded_steps: int, device: torch.device
                      ) -> None:
    """A one-line :class:`UserError` where the results alone (:func:`result_bytes`) would not fit the
    memory of ``device``: asking for that many trajectories is a mistake, not a job to start."""
    needed, available = result_bytes(num_samples, batch, seq_len, recorded_steps), memory_bytes(device)
    if available is not None and needed > available:
        raise UserError(f"{num_samples} trajectories of {batch} inputs need {needed / 2**30:.1f} GiB for their "
                        f"answers alone, more than the {available / 2**30:.1f} GiB of memory of {device.type}; "
                        f"allowed: fewer samples or inputs")


def _sample(model, x, num_samples, depth, halting, puzzle, memory_budget_mb, seed, perturbation,
            record_steps, first_row, prior_temperature) -> Trajectories:
    """:func:`sample_trajectories` once its arguments are checked: chunk, sample, assemble."""
    batch = x.shape[0]
    per_chunk, inputs_per_chunk = plan_chunks(num_samples, batch, trajectory_bytes(model, 1),
                                              memory_budget_mb * 2**20)
    out: dict[str, torch.Tensor] = {}
    for first in range(0, num_samples, per_chunk):
        lanes = range(first, min(num_samples, first + per_chunk))
        for row in range(0, batch, inputs_per_chunk):
            rows = slice(row, min(batch, row + inputs_per_chunk))
            keyed = KeyedRandom(seed, lanes, range(first_row + rows.start, first_row + rows.stop), x.device,
                                model.h0.dtype)
            chunk = _sample_chunk(model, x[rows], None if puzzle is None else puzzle[rows], depth, halting,
                                  perturbation, keyed, record_steps, prior_temperature)
            for name, tensor in chunk.items():
                lead = (slice(None),) * _FIELD_SAMPLE_DIM[name]
                if name not in out:
                    shape = (*tensor.shape[:len(lead)], num_samples, batch, *tensor.shape[len(lead) + 2:])
                    out[name] = tensor.new_empty(shape)
                out[name][(*lead, slice(lanes.start, lanes.stop), rows)] = tensor
    return Trajectories(seed=seed, **out)


@torch.no_grad()
def guided_trajectory(model, guide, x: torch.Tensor, y: torch.Tensor, puzzle: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One trajectory per input drawn from the **guide** ``q(eps | u, y)`` (the whole untruncated program):
    the final step's answers ``[B, S]`` and the single-sample KL estimate per transition ``[B, N_sup, T]``:
    ``log q(eps) - log p(eps)`` of the transition's eps sites (``eps/{n}/{t}``, and ``eps_l/{n}/{t}`` with
    ``noise_on_low``), in nats, zero where the guide follows the prior. Compared with prior trajectories it
    is the training-time shortcut check."""
    was_training = guide.training
    guide.eval()
    try:
        model_trace, guide_trace = guide.run(model.forward, x, y=y, puzzle=puzzle)
    finally:
        guide.train(was_training)
    kl = torch.zeros(*x.shape[:-1], model.n_sup, model.transitions, device=x.device)
    for name, node in guide_trace.nodes.items():
        if node["type"] == "sample" and name.startswith("eps"):
            value = node["value"]
            n, t = (int(i) for i in name.split("/")[1:])
            kl[..., n, t] += (node["fn"].log_prob(value) - model_trace.nodes[name]["fn"].log_prob(value)).float()
    return step_logits(model_trace, model.n_sup - 1).argmax(-1), kl
