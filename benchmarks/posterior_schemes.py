"""Cost of each posterior scheme per training step, as ratios to the truncated surrogate, in one run.

Builds one training run per scheme (every config of ``experiments/configs/objective/``, each with the
train config's guide, the paper's Gaussian, which every scheme trains with) at the same batch (one fixed
batch for all), and times ``gram_pyro.training.train_batch``: all optimizer updates of one batch (forward, backward,
clipping, AdamW, EMA). Printed per scheme: optimizer steps per batch, backbone passes per example and
optimizer step (counted by a hook on the backbone networks: the rows of every call, particles included,
over the batch size), the median ms per optimizer step and per batch, and both as ratios to the
truncated surrogate (``truncated``). Then the particle schemes (the configs with ``num_particles``: IWAE,
RWS, SMC and Pyro's ELBOs) at ``K = 1`` and ``K = --particles``: their ratio ``t(K) / t(1)`` must be at
most ``K`` (the particles are a tensor dim, not a loop), and ``K`` particles against one particle of a
``K`` times larger batch (the same number of rows through every network): a ratio near 1 says the
particle dim costs what batch rows cost, so where ``t(K) / t(1)`` exceeds ``K`` it is the machine's
cost of ``K`` times the rows, not the particles.

    python benchmarks/posterior_schemes.py [--batch 64] [--particles 8] [--repeats 3] [--threads T]
                                           [override ...] [--schemes truncated iwae ...]

Overrides are Hydra overrides of the train config (``task=coloring``, ``model.dim=128``, ...). MCMC-EM
runs a short chain (4 warm-up steps and 4 draws, 2 of them in the M-step) and is timed once;
``mcmc_em_short`` (HMC with a fixed short trajectory) runs its config's settings.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from gram_pyro.config import compose_config, group_options
from gram_pyro.run import Run
from gram_pyro.training import batch_at, train_batch

import harness

MCMC_SMALL = ["objective.num_samples=4", "objective.warmup_steps=4", "objective.m_step_samples=2"]


def time_scheme(scheme: str, overrides: list[str], batch_size: int, repeats: int) -> dict:
    """Median seconds of one batch of ``scheme``, its optimizer steps, and the backbone passes per example
    and optimizer step."""
    extra = MCMC_SMALL if scheme == "mcmc_em" else []
    cfg = compose_config("train", [f"objective={scheme}", *extra, *overrides, f"trainer.batch_size={batch_size}"])
    run = Run(cfg)
    batch = batch_at(run.task.splits["train"], 0, batch_size, cfg.trainer.seed, run.device)
    rows = []
    state_size = run.model.h0.numel()
    hooks = [net.register_forward_pre_hook(lambda module, args: rows.append(args[0].numel() // state_size))
             for net in {id(n): n for n in (run.model.core.f_low, run.model.core.f_high)}.values()]
    train_batch(run, batch)  # warm-up, counting backbone passes
    for hook in hooks:
        hook.remove()
    times = [harness.seconds(lambda: train_batch(run, batch), run.device)
             for _ in range(1 if scheme == "mcmc_em" else repeats)]
    steps = run.objective.updates_per_batch(run.model)
    seconds = statistics.median(times)
    return {"batch_s": seconds, "step_s": seconds / steps, "steps": steps,
            "passes": sum(rows) / batch_size / steps}


def has_particles(scheme: str) -> bool:
    """Whether the config of ``scheme`` sets ``num_particles`` (a scheme with ``K`` particles)."""
    return "num_particles" in compose_config("train", [f"objective={scheme}"]).objective


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    harness.add_threads_argument(parser)
    schemes = group_options("objective")
    parser.add_argument("--schemes", nargs="+", default=schemes, choices=schemes)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    harness.setup(args)
    schemes = ["truncated", *[s for s in args.schemes if s != "truncated"]]
    particle_schemes = [s for s in schemes if has_particles(s)]
    with_k = [f"objective.num_particles={args.particles}"]
    results = {s: time_scheme(s, [*(with_k if s in particle_schemes else []), *args.overrides], args.batch,
                              args.repeats) for s in schemes}
    single = {s: time_scheme(s, ["objective.num_particles=1", *args.overrides], args.batch, args.repeats)
              for s in particle_schemes}
    wide = {s: time_scheme(s, ["objective.num_particles=1", *args.overrides], args.particles * args.batch,
                           args.repeats) for s in single}
    base = results["truncated"]
    print(f"batch {args.batch}, threads {torch.get_num_threads()}, {args.repeats} repeats, K = {args.particles} "
          f"for {', '.join(particle_schemes) or 'no scheme'}, overrides {args.overrides or 'none'}")
    print(f"{'scheme':>20} {'steps/batch':>12} {'passes/step':>12} {'ms/step':>9} {'x trunc.':>9} "
          f"{'ms/batch':>9} {'x trunc.':>9}")
    for scheme, r in results.items():
        print(f"{scheme:>20} {r['steps']:12d} {r['passes']:12.1f} {1000 * r['step_s']:9.1f} "
              f"{r['step_s'] / base['step_s']:9.2f} {1000 * r['batch_s']:9.1f} {r['batch_s'] / base['batch_s']:9.2f}")
    print("passes/step: backbone passes per example and optimizer step, summed over particles")
    for scheme, one in single.items():
        many, rows = results[scheme]["step_s"], wide[scheme]["step_s"]
        print(f"{scheme}: K={args.particles} {1000 * many:.1f} ms/step, K=1 {1000 * one['step_s']:.1f} ms/step, "
              f"ratio {many / one['step_s']:.2f} (at most {args.particles}); K=1 at batch "
              f"{args.particles * args.batch} {1000 * rows:.1f} ms/step, particles / rows {many / rows:.2f}")


if __name__ == "__main__":
    harness.run(main)
