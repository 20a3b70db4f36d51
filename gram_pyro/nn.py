"""Plain-torch networks of a recursive reasoning model. No Pyro here.

Shapes: every module accepts arbitrary leading batch dims. A latent state is ``[..., L, D]`` with
``L = P + S``: ``P`` prefix ("puzzle embedding") tokens followed by the ``S`` board tokens.

Pieces (docs/paper.md, "The model"):

- :func:`rms_norm`: ``x / sqrt(mean(x^2) + eps)`` over the last dim, parameter free (as TRM).
- :class:`SwiGLU`: ``W_o (silu(W_g x) * W_u x)``.
- :class:`Attention`: multi-head self-attention (not causal) with rotary positions, through
  ``scaled_dot_product_attention``.
- :class:`Block`: post-norm ``x <- norm(x + mix(x)); x <- norm(x + SwiGLU(x))`` where ``mix`` is
  attention or, for the MLP-mixer variant, a SwiGLU over the sequence axis.
- :class:`ReasoningNet`: ``net(z, injection) = blocks(z + injection)``. The last block ends in an
  RMSNorm, so the output always has unit RMS per token (the "final RMSNorm" that keeps the state and
  the KL from blowing up; a second norm would be the identity).
- :class:`RecursiveCore`: the TRM/HRM recursion of one transition:
  ``l <- f_L(l, h + e_x)`` K times, then ``u = f_H(h, l)``. TRM-style uses one shared network for both
  levels, HRM-style two.
- :class:`TokenEncoder`, :class:`GaussianHead`, :class:`TokenDecoder`, :class:`ScalarHead`.
- Precision: :data:`PRECISIONS` and what each means where (:func:`native_bf16`: whether a device runs
  bf16 matmuls natively; :func:`network_dtype` for inference, :func:`training_dtype` for a training
  step); :func:`network_precision`: the backbone's matmuls under bf16 autocast (inference), its
  outputs and every density in the model's dtype. The Gaussian heads always run in the model's dtype
  (:class:`GaussianHead`).
- :func:`compile_networks`: ``torch.compile`` the same networks (``trainer.compile``, and ``compile`` of
  eval / solve / sample).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from gram_pyro.config import UserError

NORM_EPS = 1e-5


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dim."""
    return F.rms_norm(x, (x.shape[-1],), eps=NORM_EPS)


class SwiGLU(nn.Module):
    """``[..., d_in] -> [..., d_out]``: ``W_o (silu(W_g x) * W_u x)``."""

    def __init__(self, d_in: int, hidden: int, d_out: int | None = None):
        super().__init__()
        # two projections rather than one fused and chunked: the chunk's backward is a concatenation
        # that cost ~20% of a SwiGLU forward+backward on CPU at the demo size
        self.gate = nn.Linear(d_in, hidden, bias=False)
        self.up = nn.Linear(d_in, hidden, bias=False)
        self.down = nn.Linear(hidden, d_out or d_in, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables ``[seq_len, head_dim]`` for rotary position embeddings."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., L, head_dim]`` by position: ``x cos + rotate_half(x) sin``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Non-causal multi-head self-attention with RoPE: ``[..., L, D] -> [..., L, D]``."""

    def __init__(self, dim: int, num_heads: int, seq_len: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        cos, sin = rotary_tables(seq_len, dim // num_heads)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, length, dim = x.shape
        qkv = self.qkv(x).reshape(-1, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [N, heads, L, head_dim]
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(*lead, length, dim))


class SequenceMLP(nn.Module):
    """MLP-mixer token mixing: a SwiGLU over the sequence axis, ``[..., L, D] -> [..., L, D]``."""

    def __init__(self, seq_len: int, hidden: int):
        super().__init__()
        self.mlp = SwiGLU(seq_len, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.transpose(-1, -2)).transpose(-1, -2)


class Block(nn.Module):
    """Post-norm block: ``x <- norm(x + mix(x)); x <- norm(x + SwiGLU(x))``."""

    def __init__(self, dim: int, ffn_hidden: int, seq_len: int, mixer: str, num_heads: int):
        super().__init__()
        if mixer == "attention":
            self.mix = Attention(dim, num_heads, seq_len)
        elif mixer == "mlp":
            self.mix = SequenceMLP(seq_len, ffn_hidden)
        else:
            raise ValueError(f"unknown mixer {mixer!r}; allowed: attention, mlp")
        self.mlp = SwiGLU(dim, ffn_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rms_norm(x + self.mix(x))
        return rms_norm(x + self.mlp(x))


class ReasoningNet(nn.Module):
    """``net(z, injection) = blocks(z + injection)``, output with unit RMS per token. Counted as one
    backbone pass per call (tests hook ``forward``)."""

    def __init__(self, dim: int, ffn_hidden: int, seq_len: int, num_layers: int, mixer: str, num_heads: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, ffn_hidden, seq_len, mixer, num_heads) for _ in range(num_layers)
        )
        self.compute_dtype: torch.dtype | None = None  # set by network_precision

    def forward(self, z: torch.Tensor, injection: torch.Tensor) -> torch.Tensor:
        return self.run_blocks(z + injection)

    def run_blocks(self, z: torch.Tensor) -> torch.Tensor:
        """``blocks(z)``, the part :func:`compile_networks` compiles. The sum ``z + injection`` stays
        outside it: the sum is a fresh tensor that requires grad wherever either term does, so one
        graph per grad mode serves every call, where the two terms' own layouts would each be a
        guard (the first state is ``z0`` expanded, with stride 0; a truncated step's first call
        takes a detached state) and cost a recompilation apiece."""
        dtype = z.dtype
        with autocast_to(self.compute_dtype, z.device):
            for block in self.blocks:
                z = block(z)
        return z.to(dtype)


PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively on ``device``: a CUDA GPU with bf16 support, or a CPU with
    AVX512-BF16 or AMX tiles (where oneDNN's bf16 kernels are about 3x its fp32 ones)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def network_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of :func:`network_precision` for ``precision`` (one of
    :data:`PRECISIONS`; ``auto`` is bf16 where :func:`native_bf16`, else fp32); ``None`` for fp32."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if native_bf16(device) else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def training_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a training step for ``trainer.precision`` (``None``: no autocast). ``fp32``
    none; ``bf16`` bf16 where the device runs bf16 matmuls natively (:func:`native_bf16`: a CUDA GPU,
    or a CPU with AVX512-BF16 or AMX; elsewhere bf16 would be slower than fp32, so none); ``auto`` that
    on CUDA and none on CPU (CPU runs stay fp32 unless asked)."""
    wanted = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if wanted and native_bf16(device) else None


def autocast_to(dtype: torch.dtype | None, device: torch.device):
    """Autocast to ``dtype`` on ``device``; for ``None`` no context at all (a disabled autocast would
    switch off an outer one, as CUDA training's)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype)


@contextlib.contextmanager
def network_precision(modules: list[nn.Module], dtype: torch.dtype | None):
    """Within the block, every :class:`ReasoningNet` in ``modules`` runs its matmuls under autocast to
    ``dtype`` (``None``: as it is) and returns the model's dtype. The residual stream stays in the
    model's dtype, and every density is built there from the networks' outputs by Gaussian heads that
    run in that dtype (:class:`GaussianHead`), so log-probabilities are exact for the trajectories drawn:
    only the backbone's maps are computed at lower precision."""
    nets = [m for module in modules for m in module.modules() if isinstance(m, ReasoningNet)]
    previous = [net.compute_dtype for net in nets]
    previous_fp32 = torch.backends.cuda.matmul.fp32_precision
    devices = {p.device for module in modules for p in module.parameters()}
    for net in nets:
        net.compute_dtype = dtype
    for device in devices:
        tf32_beside_bf16(dtype, device)
    try:
        yield
    finally:
        for net, value in zip(nets, previous):
            net.compute_dtype = value
        torch.backends.cuda.matmul.fp32_precision = previous_fp32


def tf32_beside_bf16(dtype: torch.dtype | None, device: torch.device) -> None:
    """Where the backbone's matmuls run in bf16 on CUDA, let the float32 matmuls beside them (the
    Gaussian heads, :class:`GaussianHead`) use TF32 tensor cores: their inputs rounded to 2^-11, not
    their outputs to bf16's 2^-8, at the tensor-core rate rather than the float32 one (about an eighth
    of it on an H100). A process-wide setting of CUDA (``torch.backends.cuda.matmul.fp32_precision``);
    nothing elsewhere or with ``dtype`` None (float32 runs stay IEEE float32)."""
    if dtype == torch.bfloat16 and device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"


COMPILE_MODES = ("none", "default", "max")
"""``trainer.compile`` and the sampling commands' ``compile``: no compilation, ``torch.compile``'s
default mode, or its autotuning mode without CUDA graphs (``max-autotune-no-cudagraphs``). CUDA
graphs are left out because a transition calls the same network several times and keeps earlier
outputs: a graph replay overwrites them (on an H200 the training step failed at its first batch with
"accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run")."""


def compile_networks(modules: list[nn.Module], mode: str) -> int:
    """Compile every :class:`ReasoningNet` and :class:`GaussianHead` in ``modules`` in place under
    ``mode`` (one of :data:`COMPILE_MODES`): a head's ``forward`` (``nn.Module.compile``), a backbone's
    :meth:`ReasoningNet.run_blocks`. These are where the time goes and hold no Pyro effect: the program around
    them, its sample sites and the guide's messengers stay eager, so every trace is unchanged. Returns
    the number of networks compiled."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; allowed: {', '.join(COMPILE_MODES)}")
    if mode == "none":
        return 0
    torch_mode = None if mode == "default" else "max-autotune-no-cudagraphs"
    nets = {id(m): m for module in modules for m in module.modules() if isinstance(m, (ReasoningNet, GaussianHead))}
    for net in nets.values():
        if isinstance(net, ReasoningNet):
            net.run_blocks = torch.compile(net.run_blocks, mode=torch_mode)
        else:
            net.compile(mode=torch_mode)
    return len(nets)


class RecursiveCore(nn.Module):
    """The deterministic parts of one transition (docs/paper.md, "The model"):

        refine_low:   l <- f_L(l, h + e_x)   (K times, h held fixed)
        propose_high: u  = f_H(h, l)

    ``shared=True`` is TRM (one network for f_L and f_H), ``False`` is HRM-style (two networks).
    All tensors ``[..., L, D]``.
    """

    def __init__(self, dim: int, ffn_hidden: int, seq_len: int, num_layers: int, mixer: str,
                 num_heads: int, low_steps: int, shared: bool):
        super().__init__()
        self.low_steps = low_steps
        self.f_low = ReasoningNet(dim, ffn_hidden, seq_len, num_layers, mixer, num_heads)
        self.f_high = self.f_low if shared else ReasoningNet(dim, ffn_hidden, seq_len, num_layers, mixer, num_heads)

    def refine_low(self, l: torch.Tensor, h: torch.Tensor, e_x: torch.Tensor) -> torch.Tensor:
        injection = h + e_x
        for _ in range(self.low_steps):
            l = self.f_low(l, injection)
        return l

    def propose_high(self, h: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        return self.f_high(h, l)


class TokenEncoder(nn.Module):
    """``x [..., S] -> e_x [..., P + S, D]``: token embedding scaled by sqrt(D), after ``P`` prefix
    tokens. Single-task data (``num_puzzles = 0``): the prefix is zero, keeping token 0 free for the
    heads. With ``num_puzzles > 0`` (ARC) the prefix is a learned per-puzzle embedding ``[P, D]``
    (zero at initialisation) looked up by ``puzzle [B]``."""

    def __init__(self, vocab_size: int, dim: int, num_prefix: int, num_puzzles: int = 0):
        super().__init__()
        self.num_prefix, self.num_puzzles = num_prefix, num_puzzles
        self.scale = math.sqrt(dim)
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=1.0 / self.scale)
        if num_puzzles:
            self.puzzle_embed = nn.Embedding(num_puzzles, num_prefix * dim)
            nn.init.zeros_(self.puzzle_embed.weight)

    def forward(self, x: torch.Tensor, puzzle: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.scale * self.embed(x)
        shape = (*x.shape[:-1], self.num_prefix, tokens.shape[-1])
        if self.num_puzzles:
            if puzzle is None:
                raise ValueError("this model embeds puzzle identifiers: pass puzzle [B]")
            prefix = self.puzzle_embed(puzzle).to(tokens.dtype).unflatten(-1, shape[-2:]).expand(shape)
        else:
            prefix = tokens.new_zeros(shape)
        return torch.cat([prefix, tokens], dim=-2)


class GaussianHead(nn.Module):
    """``u [..., L, D] -> (mu, sigma)`` each ``[..., L, D]``; one SwiGLU per parameter,
    ``sigma = softplus(.) + min_scale``. The mean starts at zero and the scale at ``init_scale``.

    Always computed in the head's own dtype (the model's), with any autocast switched off: the KL of
    a posterior head against the prior's is ``sum (mu_q - mu_p)^2 / 2 sigma_p^2 + ...`` over ``L x D``
    units, and bf16 rounds each mean to 2^-8 of its size on its own, so the difference carries rounding
    that neither head can train away. On a Sudoku 9x9 checkpoint whose means had grown to about 1,
    bf16 heads doubled the KL the surrogate trains on (0.049 against 0.025 nats per token, beta 10)."""

    def __init__(self, dim: int, hidden: int, init_scale: float, min_scale: float = 1e-3):
        super().__init__()
        if init_scale <= min_scale:
            raise ValueError(f"init_scale {init_scale} must exceed min_scale {min_scale}")
        self.min_scale = min_scale
        self.loc = SwiGLU(dim, hidden)
        self.raw_scale = SwiGLU(dim, hidden)
        nn.init.zeros_(self.loc.down.weight)
        nn.init.zeros_(self.raw_scale.down.weight)
        # softplus(bias) + min_scale == init_scale at initialisation
        self.scale_bias = nn.Parameter(torch.tensor(math.log(math.expm1(init_scale - min_scale))))

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = u.to(self.scale_bias.dtype)  # a no-op for the model's own residual stream
        with torch.autocast(u.device.type, enabled=False):
            return self.loc(u), F.softplus(self.raw_scale(u) + self.scale_bias) + self.min_scale


class TokenDecoder(nn.Module):
    """``h [..., P + S, D] -> logits [..., S, V]``: a linear read-out of the board tokens."""

    def __init__(self, dim: int, vocab_size: int, num_prefix: int):
        super().__init__()
        self.num_prefix = num_prefix
        self.linear = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h[..., self.num_prefix:, :])


class ScalarHead(nn.Module):
    """``h [..., L, D] -> [...]``: a linear read-out of the first (prefix) token; used for the halt
    logit and the LPRM value logit."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 1)
        nn.init.zeros_(self.linear.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h[..., 0, :]).squeeze(-1)
