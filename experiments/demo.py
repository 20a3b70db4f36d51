"""The main job (``make demo``): GRAM versus the deterministic TRM baseline on N-Queens 8x8, on CPU.

Both models are the same program at the same size and budget (``experiments/configs/demo.yaml``);
only the noise differs (GRAM: learned guidance + target-conditioned posterior; TRM: none). Each is
scored on held-out inputs with 20 trajectories drawn from the **prior**: accuracy (share of answers
that are valid completions) and coverage@20 (distinct valid completions found / all valid
completions of the input). Writes ``results.json`` and ``results.png`` into the demo directory.

The two runs train side by side in two processes, each with half of the CPU's cores (``jobs=2``, the
default where there are at least two cores; on the 2-core machine 305 s against 353 s one after the
other, from an empty compile cache, docs/performance.md); a run that finishes hands its cores to the
other. ``jobs=1`` trains them one after the other.

    python -m gram_pyro.experiments.demo [out=runs/demo] [jobs=1|2] [key=value overrides for both runs]
"""

from __future__ import annotations

import csv
import functools
import json
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from gram_pyro.config import UserError, command_line, compose_config  # noqa: E402
from gram_pyro.side_by_side import cores_per_run, train_side_by_side  # noqa: E402
from gram_pyro.training import train  # noqa: E402

MODELS = {"GRAM": ["model=gram", "guide=gaussian"], "TRM (deterministic)": ["model=trm", "guide=prior"]}


def final_scores(run_dir: Path) -> dict:
    with (run_dir / "eval.csv").open() as f:
        row = list(csv.DictReader(f))[-1]
    return {"accuracy": float(row["accuracy"]), "coverage": float(row["coverage"])}


def plot(results: dict, path: Path) -> None:
    names = list(results)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    for i, metric in enumerate(("accuracy", "coverage")):
        values = [100 * results[name][metric] for name in names]
        bars = ax.bar([j + (i - 0.5) * width for j in range(len(names))], values, width, label=metric)
        ax.bar_label(bars, fmt="%.1f")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("% (held-out inputs, 20 prior samples)")
    ax.set_ylim(0, 105)
    ax.set_title("N-Queens 8x8: accuracy and coverage@20")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train_model(cfg: DictConfig, out: Path, position: int = 0, threads=None) -> dict:
    """Train ``cfg`` into ``out/<noise>``, moving an older run there aside (the demo owns its directory);
    its final scores and train seconds. ``position`` is the line of its progress bar; ``threads`` as
    :func:`gram_pyro.training.train` (side by side: the cores of the runs that finish before it)."""
    run_dir = out / cfg.model.noise
    started = time.time()
    train(cfg, run_dir, overwrite=True, position=position, threads=threads)
    return {**final_scores(run_dir), "train_seconds": round(time.time() - started, 1), "run_dir": str(run_dir)}


def run_demo(out: Path, overrides: list[str], jobs: int = 2) -> dict:
    """Train and score both models (``jobs`` at a time, each with ``cores // jobs`` threads and then the
    cores of a finished run, unless ``trainer.threads`` is overridden); write and print the comparison;
    returns ``results.json``'s content."""
    started = time.time()
    own_threads = any(o.startswith("trainer.threads=") for o in overrides)
    if jobs > 1 and not own_threads:
        overrides = [*overrides, f"trainer.threads={cores_per_run(jobs)}"]
    configs = {name: compose_config("demo", [*choice, *overrides]) for name, choice in MODELS.items()}
    calls = {name: functools.partial(train_model, cfg, out) for name, cfg in configs.items()}
    results = train_side_by_side(calls, jobs, hand_over=not own_threads)
    # the runs differ only in model and guide: task and trainer are read from GRAM's config
    task, trainer = configs["GRAM"].task, configs["GRAM"].trainer
    summary = {"task": "nqueens", "n": task.n, "removals": list(task.removals),
               "held_out_inputs": trainer.eval_inputs, "samples_per_input": trainer.eval_samples,
               "batches": trainer.max_batches, "jobs": jobs, "total_seconds": round(time.time() - started, 1),
               "results": results}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    plot(results, out / "results.png")
    print(f"\nN-Queens {task.n}x{task.n}, {trainer.eval_inputs} held-out inputs, "
          f"{trainer.eval_samples} prior trajectories each")
    print(f"{'model':<22}{'accuracy':>10}{'coverage@' + str(trainer.eval_samples):>14}{'train s':>10}")
    for name, r in results.items():
        print(f"{name:<22}{100 * r['accuracy']:>9.1f}%{100 * r['coverage']:>13.1f}%{r['train_seconds']:>10.0f}")
    print(f"total {summary['total_seconds']:.0f} s; wrote {out / 'results.json'} and {out / 'results.png'}")
    return summary


@command_line("demo")
def main(argv: list[str]) -> int:
    out = Path("runs/demo")
    jobs = "2" if (os.cpu_count() or 1) >= 2 else "1"
    overrides = []
    for arg in argv:
        if arg.startswith("out="):
            out = Path(arg[4:])
        elif arg.startswith("jobs="):
            jobs = arg[5:]
        else:
            overrides.append(arg)
    if jobs not in ("1", "2"):
        raise UserError(f"jobs={jobs!r}; allowed: 1 (one run after the other), 2 (both runs at once)")
    out.mkdir(parents=True, exist_ok=True)
    run_demo(out, overrides, int(jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
