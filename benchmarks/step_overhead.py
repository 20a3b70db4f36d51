"""Pyro's overhead on one GRAM training step, as a ratio measured in one run.

One training step = one supervision step of the truncated surrogate: forward, backward, clip and an
AdamW update. Path A runs it through the Pyro program and guide (``TruncatedSurrogate.loss``);
path B computes the identical loss in plain torch on the same modules (``gram_pyro.reference``).
The two alternate, repeats are timed separately, and the script prints the median time of each and
the median of the per-repeat ratios A / B. Both run under training's autocast (``trainer.precision``:
bf16 on CUDA by default). Targets: at most 1.10 on CPU at D = 256 (the default), at most 1.05 on CUDA
at the paper's configuration (``--dim 512 --batch 768 --ffn-ratio 1 model=gram_paper``).

    python benchmarks/step_overhead.py [--repeats 15] [--batch 128] [--dim 256] [--ffn-ratio 2]
                                       [--threads T] [--device auto] [override ...]

Overrides are Hydra overrides of the train config (N-Queens 8x8 and the GRAM model unless overridden).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from gram_pyro.config import compose_config
from gram_pyro.objectives import TruncatedSurrogate
from gram_pyro.reference import supervision_step, surrogate_loss
from gram_pyro.nn import autocast_to
from gram_pyro.nn import training_dtype
from gram_pyro.run import Run, resolve_device
from gram_pyro.training import batch_at

import harness


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--ffn-ratio", type=float, default=2.0)
    harness.add_threads_argument(parser)
    harness.add_config_arguments(parser)
    args = parser.parse_args()
    harness.setup(args)
    device = resolve_device(args.device)
    run = Run(compose_config("train", [f"trainer.device={device.type}", *args.overrides,
                                       *harness.model_width(args.dim, args.ffn_ratio), f"trainer.batch_size={args.batch}"]))
    model, guide = run.model, run.guide
    batch = batch_at(run.task.splits["train"], 0, args.batch, 0, device)
    x, y = batch.x, batch.y
    params = [*model.parameters(), *guide.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    objective = TruncatedSurrogate(beta=1.0)  # exact-match judge, as the reference
    dtype = training_dtype(run.cfg.trainer.precision, device)
    bf16 = dtype is not None

    def update(loss_fn):
        with autocast_to(dtype, device):
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    def pyro_step():  # update 0 of a batch: the objective runs model.init itself
        update(lambda: objective.loss(model, guide, batch, {}, 0)[0])

    def torch_loss():
        h, l = model.h0.expand(x.shape[0], -1, -1), model.l0.expand(x.shape[0], -1, -1)
        step = supervision_step(model, guide, x, y, h, l, truncate=True, posterior_everywhere=False)
        return surrogate_loss(model, step, x, y, beta=1.0)

    def torch_step():
        update(torch_loss)

    for fn in (pyro_step, torch_step):  # warm-up
        fn()
    pyro_times, torch_times = [], []
    for _ in range(args.repeats):
        pyro_times.append(harness.seconds(pyro_step, device))
        torch_times.append(harness.seconds(torch_step, device))
    ratios = [p / t for p, t in zip(pyro_times, torch_times)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, threads {torch.get_num_threads()}"
    print(f"config: {run.cfg.task._target_.rsplit('.', 1)[-1]}, batch {args.batch}, dim {args.dim}, "
          f"mixer {run.cfg.model.mixer}, K={model.core.low_steps}, T={model.transitions}, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, {name}, {args.repeats} repeats")
    print(f"pyro program + guide : median {1000 * statistics.median(pyro_times):8.1f} ms/step")
    print(f"plain torch          : median {1000 * statistics.median(torch_times):8.1f} ms/step")
    print(f"overhead ratio       : median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    harness.run(main)
