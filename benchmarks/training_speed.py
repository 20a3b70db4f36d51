"""Training speed on one device: step time, throughput and FLOP utilisation, measured in one run.

Builds a training run from the train config (``experiments/configs``; N-Queens 8x8 and the GRAM model
unless overridden) for every model width ``D`` in ``--dims`` (``ffn_hidden = --ffn-ratio x D``),
global batch in ``--batches``, ``trainer.compile`` mode in ``--compile`` and ``trainer.precision`` in
``--precision`` (the compiler's caches are cleared between configurations), and times
``gram_pyro.training.train_batch``: one batch of the library's training loop, i.e. ``N_sup`` optimizer updates of the
objective (forward, backward, clipping, fused AdamW, EMA), under the autocast of ``trainer.precision``
(``gram_pyro.nn.training_dtype``). The first batch of each configuration is the warm-up and,
when compiling, the compilation: its seconds are printed apart. Printed per configuration:

* ms per optimizer update and training throughput: examples per second through all ``N_sup``
  supervision steps (``batch / time of one batch``);
* model FLOPs of one batch, counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix
  multiplies and attention, forward and backward), the achieved FLOP/s, and the **utilisation**: achieved
  FLOP/s divided by the FLOP/s of a large matrix multiply (``--matmul-size``, fp32 on CPU, bf16 on CUDA
  when autocast is on) measured in the same run on the same device.

    python benchmarks/training_speed.py [--dims 128 256] [--batches 64] [--repeats 3]
                                        [--compile none default max] [--precision fp32 bf16]
                                        [--json FILE]
                                        [--threads T] [--device auto] [override ...]

``--json FILE`` writes every row (device, config, batch, compile_mode, precision, updates_per_s,
examples_per_s, utilisation, first_batch_s) under ``rows``, the fastest row's fields at the top level
(the headline figure) and ``demo_seconds`` where ``--demo-seconds`` gives the wall time of ``make demo``
measured on the same machine. Utilisation is against the fp32 matmul rate of the same run, and against
the bf16 one for the rows whose step runs in bf16.

The defaults give the utilisation figure at D = 128 and 256; ``--dims 64 --batches 64 256 768`` the
throughput at the batch sizes of the paper's range (batch 768 at D = 256 needs more than 24 GB on CPU).

Overrides are Hydra overrides of the train config, e.g. ``model=gram_paper`` (then ``--ffn-ratio 1``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from gram_pyro.config import compose_config
from gram_pyro.nn import PRECISIONS
from gram_pyro.nn import COMPILE_MODES
from gram_pyro.nn import training_dtype
from gram_pyro.run import Run, resolve_device
from gram_pyro.training import batch_at, train_batch

import harness


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Best FLOP/s of ``[size, size] @ [size, size]`` (``2 size^3`` FLOPs) over ``repeats`` timings."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up
    return 2 * size**3 / min(harness.seconds(lambda: a @ b, device) for _ in range(repeats))


def measure(overrides: list[str], repeats: int) -> dict:
    """Time and FLOPs of one training batch of the run composed from ``overrides``."""
    torch._dynamo.reset()  # a compiled forward is cached per function: each configuration compiles its own
    run = Run(compose_config("train", overrides))
    split = run.task.splits["train"]
    batches = [batch_at(split, i, run.cfg.trainer.batch_size, run.cfg.trainer.seed, run.device)
               for i in range(repeats + 2)]
    first = harness.seconds(lambda: train_batch(run, batches[0]), run.device)  # warm-up and compilation
    with FlopCounterMode(display=False) as counter, torch.compiler.set_stance("force_eager"):
        train_batch(run, batches[1])  # eager: counting under a compiled forward would recompile it
    times = [harness.seconds(lambda: train_batch(run, batch), run.device) for batch in batches[2:]]
    updates = run.objective.updates_per_batch(run.model)
    seconds = statistics.median(times)
    return {"seconds": seconds, "update_ms": 1000 * seconds / updates, "updates": updates,
            "examples_per_s": run.cfg.trainer.batch_size / seconds, "flops": counter.get_total_flops(),
            "first_batch_s": first, "dtype": training_dtype(run.cfg.trainer.precision, run.device) or torch.float32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batches", type=int, nargs="+", default=[64])
    parser.add_argument("--ffn-ratio", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--matmul-size", type=int, default=None, help="default: 2048 on CPU, 8192 on CUDA")
    parser.add_argument("--compile", nargs="+", default=["none"], choices=COMPILE_MODES,
                        help="trainer.compile modes, each measured")
    parser.add_argument("--precision", nargs="+", default=["auto"], choices=PRECISIONS,
                        help="trainer.precision values, each measured")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    parser.add_argument("--demo-seconds", type=float, default=None, help="make demo's wall time, for the JSON")
    harness.add_threads_argument(parser)
    harness.add_config_arguments(parser)
    args = parser.parse_args()
    harness.setup(args)
    device = resolve_device(args.device)
    common = [f"trainer.device={device.type}", *args.overrides]
    rows = []
    for dim in args.dims:
        for batch in args.batches:
            for precision in args.precision:
                for mode in args.compile:
                    overrides = [*common, *harness.model_width(dim, args.ffn_ratio), f"trainer.batch_size={batch}",
                                 f"trainer.compile={mode}", f"trainer.precision={precision}"]
                    rows.append((dim, batch, mode, measure(overrides, args.repeats)))
    size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    peaks = {dtype: matmul_flops_per_s(device, dtype, size, max(args.repeats, 3))
             for dtype in {m["dtype"] for *_, m in rows}}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, threads {torch.get_num_threads()}, {args.repeats} repeats, "
          f"overrides {args.overrides or 'none'}")
    for dtype, peak in peaks.items():
        print(f"matmul {size}x{size} {str(dtype).removeprefix('torch.')}: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'D':>5} {'batch':>6} {'compile':>8} {'dtype':>6} {'first s':>8} {'ms/update':>10} {'examples/s':>11} "
          f"{'GFLOP/batch':>12} {'GFLOP/s':>8} {'utilisation':>12}")
    records = []
    for dim, batch, mode, m in rows:
        dtype, precision = m["dtype"], "bf16" if m["dtype"] == torch.bfloat16 else "fp32"
        achieved = m["flops"] / m["seconds"]
        print(f"{dim:5d} {batch:6d} {mode:>8} {precision:>6} {m['first_batch_s']:8.1f} "
              f"{m['update_ms']:10.1f} {m['examples_per_s']:11.1f} {m['flops'] / 1e9:12.2f} {achieved / 1e9:8.1f} "
              f"{achieved / peaks[dtype]:12.3f}")
        records.append({"device": name, "threads": torch.get_num_threads(),
                        "config": {"dim": dim, "ffn_hidden": round(args.ffn_ratio * dim), "overrides": args.overrides},
                        "batch": batch, "compile_mode": mode, "precision": precision,
                        "first_batch_s": round(m["first_batch_s"], 2), "updates_per_s": round(1000 / m["update_ms"], 3),
                        "examples_per_s": round(m["examples_per_s"], 2),
                        "utilisation": round(achieved / peaks[dtype], 4)})
    print(f"one batch = {rows[0][3]['updates']} optimizer updates (N_sup); examples/s = batch / time of one batch")
    if args.json:
        fastest = max(records, key=lambda record: record["updates_per_s"])
        summary = {**fastest, "demo_seconds": args.demo_seconds, "rows": records}
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    harness.run(main)
