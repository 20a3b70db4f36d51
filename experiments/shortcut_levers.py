"""The posterior-shortcut levers side by side: one training run per lever, the same task and budget.

    python experiments/shortcut_levers.py [task=uncond_sudoku4] [jobs=4] [only=[paper,first_step]]
                                          [out=DIR] [trainer.max_batches=1000 model.dim=128 ...]

Settings: ``experiments/configs/shortcut_levers.yaml`` (the levers, each a list of train overrides, and
the overrides every run shares; any other ``key=value`` argument is added to those). Each lever trains with ``gram-pyro train task=<task> <train> <lever>``
into ``<out>/<lever>/`` (a process of its own; ``jobs`` of them at once, each with ``cores // jobs``
CPU threads unless ``trainer.threads`` is given). The evidence is the run's own held-out check at every ``trainer.eval_every`` batches
(``eval.csv``: prior-sampled accuracy / validity / coverage, posterior-path accuracy and KL per target
token, see :func:`gram_pyro.training.shortcut_scores`).

Writes ``<out>/levers.csv`` (each lever's last evaluation, with its training seconds) and
``<out>/levers.png`` (each lever's held-out curves: prior accuracy, posterior accuracy, coverage where
the task has it, KL per token against the information a solution choice needs) and ``<out>/levers_kl.png``
(each lever's KL per token of every transition: where the posterior acts). ``summarize=true``
writes them from the run directories already under ``out`` without training.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from gram_pyro.config import UserError, command_line, compose_config  # noqa: E402

CURVES = ("accuracy", "posterior_accuracy", "recognisable", "posterior_recognisable", "coverage", "kl_per_token")
"""Columns of ``eval.csv`` plotted per lever (where the task reports them)."""


SWEEP_KEYS = ("out", "jobs", "only", "train", "summarize")
"""Keys of the sweep's own config (and ``levers.<name>``); ``task=<name>`` picks the task group of every
run; every other argument is a train override."""


def settings(argv: list[str]):
    """The composed settings with ``only`` resolved to the levers to run (checked names), ``task`` taken
    from the command line and its other train overrides appended to ``train``."""
    own = [a for a in argv if a.partition("=")[0] in SWEEP_KEYS or a.startswith("levers.")]
    tasks = [a.partition("=")[2] for a in argv if a.startswith("task=")]
    cfg = compose_config("shortcut_levers", own)
    cfg.task = tasks[-1] if tasks else cfg.task
    cfg.train = [*cfg.train, *(a for a in argv if a not in own and not a.startswith("task="))]
    levers = OmegaConf.to_container(cfg.levers)
    only = list(cfg.only) if cfg.only is not None else list(levers)
    unknown = [name for name in only if name not in levers]
    if unknown:
        raise UserError(f"only: unknown lever(s) {', '.join(unknown)}; allowed: {', '.join(levers)}")
    if not isinstance(cfg.jobs, int) or cfg.jobs < 1:
        raise UserError(f"jobs must be a whole number of at least 1, got {cfg.jobs}")
    out = Path(cfg.out or f"runs/shortcut_levers/{cfg.task}")
    return cfg, {name: levers[name] for name in only}, out


def train_lever(name: str, overrides: list[str], out: Path, threads: int) -> tuple[str, float, int]:
    """Train one lever in a process of its own; returns ``(name, seconds, exit code)``. Its output goes to
    ``<out>/<name>.log``."""
    run_dir = out / name
    if not any(o.startswith("trainer.threads=") for o in overrides):
        overrides = [*overrides, f"trainer.threads={threads}"]
    argv = [sys.executable, "-m", "gram_pyro.cli", "train", *overrides, f"run_dir={run_dir}"]
    if (run_dir / "checkpoint.pt").is_file():
        argv.append(f"resume={run_dir}")
    start = time.time()
    with (out / f"{name}.log").open("w") as log:
        code = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT)
    return name, time.time() - start, code


def read_eval(run_dir: Path) -> list[dict[str, float]]:
    """The rows of ``run_dir/eval.csv`` as numbers (empty when the run wrote none)."""
    path = run_dir / "eval.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]


def plot(curves: dict[str, list[dict]], title: str, path: Path) -> None:
    """One panel per :data:`CURVES` column present, one line per lever (legend on the right)."""
    columns = [c for c in CURVES if any(c in row for rows in curves.values() for row in rows)]
    fig, axes = plt.subplots(1, len(columns), figsize=(3.6 * len(columns) + 2.2, 3.4), squeeze=False)
    colours = plt.get_cmap("tab20").colors
    for ax, column in zip(axes[0], columns):
        for i, (name, rows) in enumerate(curves.items()):
            points = [(row["batch"], row[column]) for row in rows if column in row]
            if points:
                ax.plot(*zip(*points), marker=".", color=colours[(2 * i) % 20 + (2 * i) // 20 % 2],
                        linestyle=("-", "--", ":")[i % 3], label=name)
        info = [row["info_per_token"] for rows in curves.values() for row in rows if "info_per_token" in row]
        if column == "kl_per_token" and info:
            ax.axhline(info[0], color="black", linewidth=2, alpha=0.4, label="log(solutions) / token")
            ax.set_yscale("symlog", linthresh=0.01)
        ax.set_title(column.replace("_", " "))
        ax.set_xlabel("batch")
    save_with_legend(fig, axes[0][-1], title, path, legend_inches=2.0)


def save_with_legend(fig, ax, title: str, path: Path, legend_inches: float) -> None:
    """``fig`` with ``ax``'s legend in a margin of ``legend_inches`` on the right and ``title`` on top,
    saved to ``path`` and closed."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - legend_inches / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_transitions(curves: dict[str, list[dict]], title: str, path: Path) -> bool:
    """One panel per lever: the KL per target token of each transition (``kl_per_token/<n>/<t>``, step
    ``n``, transition ``t``) over the held-out checks, on the same axes for every lever, against what a
    choice of solution needs (``info_per_token``, where the task counts solutions). Whether it wrote
    the figure (not where no run logged the KL: ``trainer.shortcut_action=off``)."""
    levers = {name: rows for name, rows in curves.items() if any(key.startswith("kl_per_token/") for key in
                                                                   (rows[0] if rows else {}))}
    if not levers:
        return False
    fig, axes = plt.subplots(1, len(levers), figsize=(3.2 * len(levers) + 1.6, 3.2), squeeze=False, sharey=True)
    for ax, (name, rows) in zip(axes[0], levers.items()):
        keys = [key for key in rows[0] if key.startswith("kl_per_token/")]
        colours = plt.get_cmap("viridis")([i / max(len(keys) - 1, 1) for i in range(len(keys))])
        for key, colour in zip(keys, colours):
            n, t = key.split("/")[1:]
            ax.plot([row["batch"] for row in rows], [row[key] for row in rows], marker=".", color=colour,
                    label=f"step {n}, transition {t}")
        if "info_per_token" in rows[0]:
            ax.axhline(rows[0]["info_per_token"], color="black", linewidth=2, alpha=0.4,
                       label="log(solutions) / token")
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("batch")
    axes[0][0].set_ylabel("KL per target token (nats)")
    save_with_legend(fig, axes[0][-1], title, path, legend_inches=1.6)
    return True


def shortcut_levers(argv: list[str]) -> Path:
    cfg, levers, out = settings(argv)
    out.mkdir(parents=True, exist_ok=True)
    threads = max((os.cpu_count() or 1) // cfg.jobs, 1)
    shared = [f"task={cfg.task}", *cfg.train]
    seconds, codes = dict.fromkeys(levers, 0.0), dict.fromkeys(levers, 0)
    with ThreadPoolExecutor(cfg.jobs) as pool, tqdm(total=len(levers), desc="levers",
                                                    disable=cfg.summarize) as progress:
        futures = [] if cfg.summarize else [pool.submit(train_lever, name, [*shared, *overrides], out, threads)
                                            for name, overrides in levers.items()]
        for future in as_completed(futures):
            name, seconds[name], codes[name] = future.result()
            progress.set_postfix_str(f"{name}: exit {codes[name]}")
            progress.update(1)
    curves = {name: read_eval(out / name) for name in levers}
    rows = []
    for name in levers:
        last = curves[name][-1] if curves[name] else {}
        rows.append({"lever": name, "exit": codes[name], "seconds": round(seconds[name], 1), **last})
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with (out / "levers.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    plot(curves, f"{cfg.task}: held-out curves per lever", out / "levers.png")
    written = [out / "levers.csv", out / "levers.png"]
    if plot_transitions(curves, f"{cfg.task}: KL per transition", out / "levers_kl.png"):
        written.append(out / "levers_kl.png")
    for row in rows:
        print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                        if not k.startswith("kl_per_token/")))
    print(f"wrote {', '.join(map(str, written))}")
    return out


@command_line("shortcut_levers")
def main(argv: list[str]) -> int:
    shortcut_levers(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
