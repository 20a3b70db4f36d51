"""Data-parallel training over ``torch.distributed``: launched by ``torchrun``, one process per device.

    torchrun --nproc_per_node=4 -m gram_pyro.cli train task=sudoku trainer.batch_size=768

Every rank builds the same global batch ``b`` (a function of ``(trainer.seed, b)``, see
``gram_pyro.training.batch_at``) and keeps the rows ``rank, rank + P, rank + 2P, ...`` of it, so the
data a run sees does not depend on the world size ``P``. Each rank's loss is a mean over its own rows;
it is scaled by ``P * B_rank / B`` and the gradients of **every** parameter (model and guide: the whole
optimizer's list) are summed across ranks and divided by ``P``, which gives the gradient of the
global-batch mean whatever the split (an uneven split when ``P`` does not divide ``B`` included). The
parameters are not wrapped in ``DistributedDataParallel``: a Pyro program calls its networks'
submodules directly, never a wrapper's ``forward``, so the all-reduce is explicit
(:func:`average_gradients`), one flat buffer per step. All ranks then take the same optimizer step
and stay identical; only rank 0 logs, evaluates and writes checkpoints.

Randomness of the model (the eps draws) differs per rank: rank ``r`` seeds ``seed + r``. A
deterministic model therefore trains to the same parameters on ``P`` ranks as on one process (up to
floating-point summation order); a stochastic one matches in distribution.

Backends: NCCL on CUDA (rank ``r`` uses ``cuda:LOCAL_RANK``), gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gram_pyro.config import UserError
from gram_pyro.tasks.base import Batch


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched() -> World:
    """The world ``torchrun`` describes in the environment (a single process when it is absent)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def join(world: World, device: torch.device) -> torch.device:
    """Join the process group (when there is more than one process); returns this rank's device."""
    if not world.distributed:
        return device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(f"{world.local_rank + 1} or more processes per node on CUDA, but this node has "
                            f"{torch.cuda.device_count()} GPU(s): launch one process per GPU, or use trainer.device=cpu")
        torch.cuda.set_device(world.local_rank)
        device = torch.device("cuda", world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def leave(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard(batch: Batch, world: World) -> tuple[Batch, float]:
    """This rank's rows of the global ``batch`` and the factor ``P * B_rank / B`` its mean loss is
    scaled by, so that averaging gradients over ranks gives the global-batch mean's gradient."""
    if not world.distributed:
        return batch, 1.0
    rows = slice(world.rank, None, world.size)
    local = batch.rows(rows)
    return local, world.size * local.x.shape[0] / batch.x.shape[0]


def average_gradients(params: list[torch.Tensor], world: World) -> None:
    """Replace every gradient by its mean over ranks (one all-reduce of a flat buffer). A parameter
    without a gradient on this rank contributes zeros, so every rank reduces the same buffer."""
    if not world.distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()


def all_finite(loss: torch.Tensor, world: World) -> torch.Tensor:
    """Whether the loss is finite on every rank, as a bool tensor on the loss's device (no host sync;
    all ranks must skip a step together)."""
    finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(())
    if world.distributed:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return finite.bool()


def mean_over_ranks(values: dict[str, torch.Tensor], world: World) -> dict[str, torch.Tensor]:
    """Per-rank metric means averaged over ranks (for logging)."""
    if not world.distributed or not values:
        return values
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    dist.all_reduce(stacked)
    return dict(zip(values, stacked / world.size))


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
