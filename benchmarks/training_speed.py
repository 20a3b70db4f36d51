"""Training speed on one device: step time, throughput and FLOP utilisation, measured in one run.

Builds a training run from the train config (``experiments/configs``; N-Queens 8x8 and the GRAM model
unless overridden) for every model width ``D`` in ``--dims`` (``ffn_hidden = --ffn-ratio x D``) and
global batch in ``--batches``, and times ``Run.train_batch``: one batch of the library's training
loop, i.e. ``N_sup`` optimizer updates of the objective (forward, backward, clipping, fused AdamW,
EMA), under bf16 autocast on CUDA when ``trainer.bf16``. Printed per configuration:

* ms per optimizer update and training throughput: examples per second through all ``N_sup``
  supervision steps (``batch / time of one batch``);
* model FLOPs of one batch, counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix
  multiplies and attention, forward and backward), the achieved FLOP/s, and the **utilisation**: achieved
  FLOP/s divided by the FLOP/s of a large matrix multiply (``--matmul-size``, fp32 on CPU, bf16 on CUDA
  when autocast is on) measured in the same run on the same device.

    python benchmarks/training_speed.py [--dims 128 256] [--batches 64] [--repeats 3]
                                        [--threads T] [--device auto] [override ...]

The defaults give the utilisation figure at D = 128 and 256; ``--dims 64 --batches 64 256 768`` the
throughput at the batch sizes of the paper's range (batch 768 at D = 256 needs more than 24 GB on CPU).

Overrides are Hydra overrides of the train config, e.g. ``model=gram_paper`` (then ``--ffn-ratio 1``).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch.utils.flop_counter import FlopCounterMode

from gram_pyro.config import compose_config
from gram_pyro.training import Run, batch_at, resolve_device

import harness


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Best FLOP/s of ``[size, size] @ [size, size]`` (``2 size^3`` FLOPs) over ``repeats`` timings."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up
    return 2 * size**3 / min(harness.seconds(lambda: a @ b, device) for _ in range(repeats))


def measure(overrides: list[str], repeats: int) -> dict:
    """Time and FLOPs of one training batch of the run composed from ``overrides``."""
    run = Run(compose_config("train", overrides))
    split = run.task.splits["train"]
    batches = [batch_at(split, i, run.cfg.trainer.batch_size, run.cfg.trainer.seed, run.device)
               for i in range(repeats + 1)]
    with FlopCounterMode(display=False) as counter:
        run.train_batch(batches[0])  # also the warm-up
    times = [harness.seconds(lambda: run.train_batch(batch), run.device) for batch in batches[1:]]
    updates = run.objective.updates_per_batch(run.model)
    seconds = statistics.median(times)
    return {"seconds": seconds, "update_ms": 1000 * seconds / updates, "updates": updates,
            "examples_per_s": run.cfg.trainer.batch_size / seconds, "flops": counter.get_total_flops(),
            "bf16": run.device.type == "cuda" and run.cfg.trainer.bf16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batches", type=int, nargs="+", default=[64])
    parser.add_argument("--ffn-ratio", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--matmul-size", type=int, default=None, help="default: 2048 on CPU, 8192 on CUDA")
    harness.add_threads_argument(parser)
    harness.add_config_arguments(parser)
    args = parser.parse_args()
    harness.setup(args)
    device = resolve_device(args.device)
    common = [f"trainer.device={device.type}", *args.overrides]
    rows = []
    for dim in args.dims:
        for batch in args.batches:
            rows.append((dim, batch, measure([*common, *harness.model_width(dim, args.ffn_ratio),
                                              f"trainer.batch_size={batch}"], args.repeats)))
    bf16 = rows[0][2]["bf16"]
    dtype = torch.bfloat16 if bf16 else torch.float32
    size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    peak = matmul_flops_per_s(device, dtype, size, max(args.repeats, 3))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, threads {torch.get_num_threads()}, {'bf16 autocast' if bf16 else 'fp32'}, "
          f"{args.repeats} repeats, overrides {args.overrides or 'none'}")
    print(f"matmul {size}x{size} {str(dtype).removeprefix('torch.')}: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'D':>5} {'batch':>6} {'ms/update':>10} {'examples/s':>11} {'GFLOP/batch':>12} {'GFLOP/s':>8} "
          f"{'utilisation':>12}")
    for dim, batch, m in rows:
        achieved = m["flops"] / m["seconds"]
        print(f"{dim:5d} {batch:6d} {m['update_ms']:10.1f} {m['examples_per_s']:11.1f} {m['flops'] / 1e9:12.2f} "
              f"{achieved / 1e9:8.1f} {achieved / peak:12.3f}")
    print(f"one batch = {rows[0][2]['updates']} optimizer updates (N_sup); examples/s = batch / time of one batch")


if __name__ == "__main__":
    harness.run(main)
