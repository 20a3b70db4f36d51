"""Pyro's overhead on one GRAM training step, as a ratio measured in one run.

One training step = one supervision step of the truncated surrogate: forward, backward, clip and an
AdamW update. Path A runs it through the Pyro program and guide (``TruncatedSurrogate.loss``);
path B computes the identical loss in plain torch on the same modules (``gram_pyro.reference``).
The two alternate, repeats are timed separately, and the script prints the median time of each and
the median of the per-repeat ratios A / B. Target on CPU at D = 256 (the default): at most 1.10.

    python benchmarks/step_overhead.py [--repeats 15] [--batch 128] [--dim 256] [--threads T]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from gram_pyro.objectives import TruncatedSurrogate
from gram_pyro.reference import supervision_step, surrogate_loss
from gram_pyro.tasks.nqueens import NQueensTask
from guides import TargetConditionedGaussian
from models import RecursiveReasoningModel

import harness


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=256)
    harness.add_threads_argument(parser)
    args = parser.parse_args()
    harness.setup(args)
    torch.manual_seed(0)
    task = NQueensTask()
    model = RecursiveReasoningModel(task.vocab_size, task.seq_len, dim=args.dim, ffn_hidden=2 * args.dim)
    guide = TargetConditionedGaussian(model)
    batch = task.splits["train"].batch(torch.arange(args.batch), torch.Generator().manual_seed(0))
    x, y = batch.x, batch.y
    params = [*model.parameters(), *guide.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    objective = TruncatedSurrogate(beta=1.0)  # exact-match judge, as the reference

    def update(loss):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    def pyro_step():  # update 0 of a batch: the objective runs model.init itself
        update(objective.loss(model, guide, batch, {}, 0)[0])

    def torch_step():
        h, l = model.h0.expand(x.shape[0], -1, -1), model.l0.expand(x.shape[0], -1, -1)
        step = supervision_step(model, guide, x, y, h, l, truncate=True, posterior_everywhere=False)
        update(surrogate_loss(model, step, x, y, beta=1.0))

    for fn in (pyro_step, torch_step):  # warm-up
        fn()
    pyro_times, torch_times = [], []
    for _ in range(args.repeats):
        pyro_times.append(harness.seconds(pyro_step))
        torch_times.append(harness.seconds(torch_step))
    ratios = [p / t for p, t in zip(pyro_times, torch_times)]
    print(f"config: N-Queens 8x8, batch {args.batch}, dim {args.dim}, K={model.core.low_steps}, "
          f"T={model.transitions}, threads {torch.get_num_threads()}, {args.repeats} repeats")
    print(f"pyro program + guide : median {1000 * statistics.median(pyro_times):8.1f} ms/step")
    print(f"plain torch          : median {1000 * statistics.median(torch_times):8.1f} ms/step")
    print(f"overhead ratio       : median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    harness.run(main)
