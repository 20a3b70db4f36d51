"""Width and depth at inference: accuracy and coverage against N trajectories, supervision steps and
total compute, for trained runs and the naive-stochasticity baselines, on the same axes.

    python experiments/scaling.py runs.GRAM=runs/demo/learned runs.TRM=runs/demo/none

Each entry of ``runs`` is sampled once with ``max(samples)`` trajectories of ``max(depths)`` steps
per input, recording every step (``gram_pyro.inference.sample_trajectories(record_steps=True)``).
Because trajectory ``i`` is the same whatever ``N`` (keyed randomness), the first ``N`` trajectories
and the first ``d`` steps of that one run are exactly what a run with ``N`` trajectories of depth
``d`` would give; every (N, d) point is read off it. A deterministic run is also sampled under each of
``baselines`` (PTRM latent noise with ``ptrm_sigma``, decoder sampling, random z0; docs/paper.md, "Inference-time scaling")
and labelled ``<run>+<baseline>``.

For each point: ``accuracy`` of the answer ``select`` picks among the N, and ``coverage`` (distinct
valid solutions among the N / all valid solutions) where the task defines it. Compute is the number
of latent transitions evaluated per input, ``N * d * T``; a deterministic run without a baseline
computes one trajectory whatever N (its N copies are identical, and decoder sampling draws N answers
from that one trajectory's logits), so its compute is ``d * T``.

Writes ``<out>/scaling.csv`` and ``<out>/scaling.png`` (three panels: against N at the trained depth,
against depth at the largest N, against compute) and prints the table.
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from gram_pyro.config import UserError, command_line, compose_config
from gram_pyro.run import load_run
from gram_pyro.inference import sample_trajectories
from gram_pyro.selection import select
from gram_pyro.tasks.base import held_out_index

PERTURBATIONS = {"ptrm": lambda cfg: {"kind": "ptrm", "sigma": cfg.ptrm_sigma, "which": "h"},
                 "decoder": lambda cfg: {"kind": "decoder"}, "z0": lambda cfg: {"kind": "z0"}}
FIELDS = ["label", "samples", "depth", "compute", "accuracy", "coverage"]


def sweep(label: str, loaded, index: torch.Tensor, cfg, perturbation: dict | None) -> list[dict]:
    """Every (N, depth) point of one model (and perturbation) from a single recorded sampling run."""
    task, model = loaded.task, loaded.model
    data = task.splits[cfg.split]
    puzzle = None if data.puzzles is None else data.puzzles[index].to(loaded.device)
    paths = sample_trajectories(model, data.inputs[index].to(loaded.device), max(cfg.samples),
                                depth=max(cfg.depths), puzzle=puzzle, seed=cfg.seed, perturbation=perturbation,
                                memory_budget_mb=cfg.memory_budget_mb, record_steps=True)
    one_lane = not model.stochastic and (perturbation is None or perturbation["kind"] == "decoder")
    rows = []
    for depth in cfg.depths:
        answers = paths.step_answers[depth - 1].cpu()
        values, halts = paths.step_value[depth - 1].cpu(), paths.step_halt_logit[depth - 1].cpu()
        for n in cfg.samples:
            selected, _ = select(cfg.select, answers[:n], values[:n], halts[:n])
            chosen = task.per_input(cfg.split, index, selected[None])
            everything = task.per_input(cfg.split, index, answers[:n])
            rows.append({"label": label, "samples": n, "depth": depth,
                         "compute": (1 if one_lane else n) * depth * model.transitions,
                         "accuracy": chosen["accuracy"].mean().item(),
                         "coverage": everything["coverage"].mean().item() if "coverage" in everything else ""})
    return rows


def plot(rows: list[dict], trained_depth: int, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["accuracy"] + (["coverage"] if any(r["coverage"] != "" for r in rows) else [])
    widest = max(r["samples"] for r in rows)
    figure, axes = plt.subplots(len(metrics), 3, figsize=(13, 3.6 * len(metrics)), squeeze=False)
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label]
        for i, metric in enumerate(metrics):
            panels = [([r for r in mine if r["depth"] == trained_depth], "samples", f"N (depth {trained_depth})"),
                      ([r for r in mine if r["samples"] == widest], "depth", f"supervision steps (N = {widest})"),
                      (sorted(mine, key=lambda r: r["compute"]), "compute", "transitions per input")]
            for axis, (points, key, xlabel) in zip(axes[i], panels):
                if key == "compute":  # the best value reachable with at most this much compute
                    best, frontier = -1.0, {}
                    for r in points:
                        best = max(best, r[metric])
                        frontier[r["compute"]] = {"compute": r["compute"], metric: best}
                    points = list(frontier.values())
                axis.plot([r[key] for r in points], [r[metric] for r in points], marker="o", label=label)
                axis.set_xscale("log")
                axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                axis.set_xlabel(xlabel)
                axis.set_ylabel(metric)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


@command_line("scaling")
def main(overrides: list[str]) -> int:
    # runs.<label>=<dir> adds a key to the empty ``runs`` mapping, which Hydra spells +runs.<label>
    cfg = compose_config("scaling", [f"+{o}" if o.startswith("runs.") else o for o in overrides])
    if not cfg.runs:
        raise UserError("give at least one run: runs.<label>=<run dir>")
    if cfg.select == "smc":
        raise UserError("select=smc resamples while it samples, so its points cannot be read off one recorded "
                        "run; use experiments/test_time_smc.py")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, trained_depth = [], None
    for label, run_dir in cfg.runs.items():
        loaded = load_run(run_dir, cfg.device)
        trained_depth = trained_depth or loaded.model.n_sup
        data = loaded.task.splits[cfg.split]
        index = held_out_index(len(data), cfg.inputs, cfg.seed)
        variants = [(label, None)]
        if not loaded.model.stochastic:
            variants += [(f"{label}+{name}", PERTURBATIONS[name](cfg)) for name in cfg.baselines]
        for name, perturbation in variants:
            start = time.perf_counter()
            rows += sweep(name, loaded, index, cfg, perturbation)
            print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    with (out / "scaling.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, trained_depth, out / "scaling.png")
    OmegaConf.save(cfg, out / "config.yaml")
    print(f"{'label':18s} {'N':>4s} {'depth':>5s} {'compute':>8s} {'accuracy':>8s} {'coverage':>8s}")
    for r in rows:
        coverage = f"{r['coverage']:8.3f}" if r["coverage"] != "" else f"{'':8s}"
        print(f"{r['label']:18s} {r['samples']:4d} {r['depth']:5d} {r['compute']:8d} {r['accuracy']:8.3f} {coverage}")
    print(f"wrote {out / 'scaling.csv'} and {out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
