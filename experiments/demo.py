"""The main job (``make demo``): GRAM versus the deterministic TRM baseline on N-Queens 8x8, on CPU.

Both models are the same program at the same size and budget (``experiments/configs/demo.yaml``);
only the noise differs (GRAM: learned guidance + target-conditioned posterior; TRM: none). Each is
scored on held-out inputs with 20 trajectories drawn from the **prior**: accuracy (share of answers
that are valid completions) and coverage@20 (distinct valid completions found / all valid
completions of the input). Writes ``results.json`` and ``results.png`` into the demo directory.

    python -m gram_pyro.experiments.demo [out=runs/demo] [key=value overrides for both runs]
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gram_pyro.config import command_line, compose_config  # noqa: E402
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


def run_demo(out: Path, overrides: list[str]) -> dict:
    results = {}
    started = time.time()
    for name, choice in MODELS.items():
        cfg = compose_config("demo", [*choice, *overrides])
        run_dir = out / cfg.model.noise
        t0 = time.time()
        train(cfg, run_dir, overwrite=True)  # the demo owns its directory: a rerun moves the old runs aside
        results[name] = {**final_scores(run_dir), "train_seconds": round(time.time() - t0, 1),
                         "run_dir": str(run_dir)}
    # the runs differ only in model and guide: task and trainer are read from the last one's config
    summary = {"task": "nqueens", "n": cfg.task.n, "removals": list(cfg.task.removals),
               "held_out_inputs": cfg.trainer.eval_inputs, "samples_per_input": cfg.trainer.eval_samples,
               "batches": cfg.trainer.max_batches, "total_seconds": round(time.time() - started, 1),
               "results": results}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    plot(results, out / "results.png")
    print(f"\nN-Queens {cfg.task.n}x{cfg.task.n}, {cfg.trainer.eval_inputs} held-out inputs, "
          f"{cfg.trainer.eval_samples} prior trajectories each")
    print(f"{'model':<22}{'accuracy':>10}{'coverage@' + str(cfg.trainer.eval_samples):>14}{'train s':>10}")
    for name, r in results.items():
        print(f"{name:<22}{100 * r['accuracy']:>9.1f}%{100 * r['coverage']:>13.1f}%{r['train_seconds']:>10.0f}")
    print(f"total {summary['total_seconds']:.0f} s; wrote {out / 'results.json'} and {out / 'results.png'}")
    return summary


@command_line("demo")
def main(argv: list[str]) -> int:
    out = Path("runs/demo")
    overrides = []
    for arg in argv:
        if arg.startswith("out="):
            out = Path(arg[4:])
        else:
            overrides.append(arg)
    out.mkdir(parents=True, exist_ok=True)
    run_demo(out, overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
