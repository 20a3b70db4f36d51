"""Width scaling of prior sampling: wall time and memory of N trajectories, as ratios measured in one run.

Builds the task and model of the train config (``experiments/configs``; untrained weights are fine
for timing) and samples ``N = 1, 2, 5, 10, 20, 50`` (``--widths``) trajectories of a fixed batch of test inputs at
the model's depth with :func:`gram_pyro.inference.sample_trajectories`.

* Time, under the default memory budget (its chunk plan is printed): for each N, the wall time of
  sampling the N trajectories together (batched) and of N calls that sample one trajectory each
  (one by one), back to back in the same repeat so that clock changes and other processes touch
  both alike. Printed: the median of each over the repeats, and the median over repeats of the ratio
  batched / one by one (at most 1: sampling N trajectories together costs at most N times one).
* Memory, unchunked: the growth of peak RSS on CPU (``torch.cuda.max_memory_allocated`` on CUDA) over
  the N = 1 run, divided by ``N - 1``, next to the estimate
  :func:`gram_pyro.inference.trajectory_bytes` plans chunks with.
* That the encoder reads ``x [B, S]`` once per supervision step, not ``[N, B, S]``.

``--compile`` and ``--precision`` are those of ``gram-pyro sample``: the networks compiled (one of
``none | default | max``; the widths' first, unchunked runs are also the compilations, so the timed
repeats run compiled code) and their matmuls in bf16 (``auto``: where the device has native bf16).

    python benchmarks/sampling.py [--batch 16] [--repeats 3] [--widths 1 2 5 ...] [--compile none]
                                  [--precision fp32] [--threads T] [--device auto] [override ...]

Overrides are Hydra overrides of the train config, e.g. ``model=trm`` or ``model.dim=128``.
"""

from __future__ import annotations

import argparse
import resource
import statistics

import torch

from gram_pyro.config import build, compose_config
from gram_pyro.inference import (ACTIVATION_FACTOR, default_memory_budget_mb, plan_chunks, sample_trajectories,
                                 trajectory_bytes)
from gram_pyro.nn import COMPILE_MODES, PRECISIONS, compile_networks, network_dtype, network_precision
from gram_pyro.run import resolve_device

import harness

WIDTHS = (1, 2, 5, 10, 20, 50)
MB = 2**20


def peak_bytes(device: torch.device) -> int:
    """Peak memory so far: the CUDA allocator's peak, or this process's peak RSS (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS), help="values of N, from 1 up")
    parser.add_argument("--compile", default="none", choices=COMPILE_MODES, help="compile mode of the networks")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS, help="the networks' matmul precision")
    harness.add_threads_argument(parser)
    harness.add_config_arguments(parser)
    args = parser.parse_args()
    widths = sorted(set(args.widths))
    if widths[0] != 1:
        parser.error("--widths must include 1 (the baseline)")
    harness.setup(args)
    device = resolve_device(args.device)
    cfg = compose_config("train", args.overrides)
    torch.manual_seed(0)
    task = build(cfg.task, "task")
    model = build(cfg.model, "model", vocab_size=task.vocab_size, seq_len=task.seq_len,
                  num_puzzles=task.num_puzzles).to(device).eval()
    compile_networks([model], args.compile)
    split = task.splits["test"]
    x = split.inputs[:args.batch].to(device)
    puzzle = None if split.puzzles is None else split.puzzles[:args.batch].to(device)
    encoder_calls = []
    hook = model.encoder.register_forward_pre_hook(lambda module, inputs: encoder_calls.append(tuple(inputs[0].shape)))

    dtype = network_dtype(args.precision, device)

    def sample(num_samples: int, budget_mb: float | None = None) -> float:
        with network_precision([model], dtype):
            return harness.seconds(lambda: sample_trajectories(model, x, num_samples, puzzle=puzzle, seed=0,
                                                               memory_budget_mb=budget_mb), device)

    sample(1)  # warm-up, recording the encoder's inputs during one run
    hook.remove()
    peaks = {}
    for width in widths:  # unchunked, increasing N: the peak so far is this N's peak
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sample(width, float("inf"))
        peaks[width] = peak_bytes(device)
    batched = {width: [] for width in widths}
    one_by_one = {width: [] for width in widths}
    for _ in range(args.repeats):
        for width in widths:
            batched[width].append(sample(width))
            one_by_one[width].append(sum(sample(1) for _ in range(width)))

    length, dim = model.h0.shape
    budget = default_memory_budget_mb(device)
    chunk = plan_chunks(widths[-1], x.shape[0], trajectory_bytes(model, 1), budget * MB)
    print(f"config: {type(task).__name__}, model noise={model.noise}, batch {x.shape[0]}, depth {model.n_sup}, "
          f"L={length}, D={dim}, device {device}, threads {torch.get_num_threads()}, {args.repeats} repeats, "
          f"compile {args.compile}, matmuls {str(dtype or torch.float32).removeprefix('torch.')}")
    once_per_step = encoder_calls == [tuple(x.shape)] * model.n_sup
    print(f"encoder inputs in one run: {encoder_calls[0]} x {len(encoder_calls)} calls "
          f"({'[B, S] once per step' if once_per_step else 'NOT once per step on [B, S]'})")
    print(f"default memory budget {budget:.0f} MB: chunks of {chunk[0]} trajectories x {chunk[1]} inputs")
    print(f"{'N':>4} {'batched s':>10} {'one by one s':>13} {'ratio':>6} {'MB/traj meas.':>14} {'MB/traj est.':>13}")
    estimate = trajectory_bytes(model, x.shape[0]) / MB
    for width in widths:
        ratio = statistics.median(b / o for b, o in zip(batched[width], one_by_one[width]))
        measured = f"{(peaks[width] - peaks[1]) / (width - 1) / MB:14.2f}" if width > 1 else f"{'-':>14}"
        print(f"{width:4d} {statistics.median(batched[width]):10.3f} {statistics.median(one_by_one[width]):13.3f} "
              f"{ratio:6.3f} {measured} {estimate:13.2f}")
    print(f"estimate = batch x L x D x {model.h0.element_size()} bytes x ACTIVATION_FACTOR {ACTIVATION_FACTOR}")


if __name__ == "__main__":
    harness.run(main)
