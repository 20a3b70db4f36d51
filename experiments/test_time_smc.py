"""Test-time SMC against vote@N and best-of-N at equal compute, on one trained run.

    python experiments/test_time_smc.py run=runs/demo_check/learned [samples=[8,20]] [inputs=200]
        [smc=[{potential:value,tempering:10.0,threshold:0.5}]] [figure=docs/posteriors/test_time_smc.png]

Settings: ``experiments/configs/test_time_smc.yaml``. For ``inputs`` held-out inputs and every ``N`` of
``samples``, each method spends the same compute, ``N`` trajectories of ``depth`` supervision steps per
input (``N * depth * T`` transitions):

* ``vote``, ``lprm`` (best-of-N by the LPRM value), ``halt`` (best-of-N by the halt logit): one answer
  picked among ``N`` independent prior trajectories. All ``N`` are read off one run of ``max(samples)``
  trajectories (keyed randomness: trajectory ``i`` is the same whatever ``N``);
* ``smc <potential> tau=<t> thr=<r>``, one per entry of ``smc``: test-time SMC
  (:mod:`gram_pyro.test_time_smc`), the vote among its ``N`` survivors. Its lanes draw the same noise
  as the independent trajectories, so with ``tau = 0`` it would give exactly the vote's row.

Per row: ``accuracy`` of the selected answer and ``pass@N`` (some candidate valid) with 95% intervals
over inputs, ``coverage@N`` of the ``N`` candidates (independent trajectories, or SMC's survivors) where
the task scores coverage (multi-solution tasks; not Sudoku), ``sample_accuracy`` (share of valid
candidates); for SMC the mean ESS after each step's weighting and the share of inputs resampled after
each step. Also the AUC of the value and halt heads at the last step for telling a valid answer from an
invalid one (over all independent trajectories): a potential the heads cannot tell apart gives SMC
nothing to work with.

Writes ``<out>/results.json`` (settings, command, rows, head AUCs), ``<out>/results.md`` (table) and
``<out>/results.png`` (accuracy and coverage, or pass@N, against ``N``; ESS / N by step), and the figure also to
``figure`` when given.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from gram_pyro.config import UserError, command_line, compose_config
from gram_pyro.evaluation import interval, json_ready
from gram_pyro.run import load_run
from gram_pyro.inference import sample_trajectories
from gram_pyro.selection import select
from gram_pyro.tasks.base import held_out_index
from gram_pyro.test_time_smc import as_smc_options, smc_trajectories

CONFIG = "test_time_smc"
BASELINES = ("vote", "lprm", "halt")


def auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``score`` for ``positive`` (flat tensors): the probability that a
    positive outscores a negative, ties counted one half (Mann-Whitney, average ranks); NaN without
    both classes."""
    score, positive = score.flatten().double(), positive.flatten()
    count, negatives = int(positive.sum()), int((~positive).sum())
    if count == 0 or negatives == 0:
        return float("nan")
    values, inverse, counts = torch.unique(score, return_inverse=True, return_counts=True)
    first_rank = counts.cumsum(0) - counts + 1
    ranks = (first_rank + (counts - 1) / 2)[inverse]
    return ((ranks[positive].sum() - count * (count + 1) / 2) / (count * negatives)).item()


def scores(task, split: str, index: torch.Tensor, answers: torch.Tensor, selected: torch.Tensor) -> dict:
    """The row's metrics from candidates ``answers [N, B, S]`` and the selected answers ``[B, S]``
    (``coverage`` only where the task scores it)."""
    everything = task.per_input(split, index, answers)
    chosen = task.per_input(split, index, selected[None])
    row = {"accuracy": interval(chosen["accuracy"]), "sample_accuracy": everything["accuracy"].mean().item(),
           "pass": interval((everything["accuracy"] > 0).double())}
    if "coverage" in everything:
        row["coverage"] = interval(everything["coverage"])
    return row


def compare(cfg) -> dict:
    """Every row of the comparison (module docstring) and the heads' AUCs."""
    loaded = load_run(cfg.run, cfg.device)
    task, model = loaded.task, loaded.model
    if cfg.split not in task.splits:
        raise UserError(f"unknown split {cfg.split!r}; this task has: {', '.join(task.splits)}")
    if not list(cfg.samples) or min(cfg.samples) < 1:
        raise UserError(f"samples must list at least one N >= 1, got {list(cfg.samples)}")
    variants = [as_smc_options(OmegaConf.to_container(spec)) for spec in cfg.smc]
    data = task.splits[cfg.split]
    index = held_out_index(len(data), cfg.inputs, cfg.seed)
    x = data.inputs[index].to(loaded.device)
    puzzle = None if data.puzzles is None else data.puzzles[index].to(loaded.device)
    depth = cfg.depth or model.n_sup
    sampling = dict(depth=depth, puzzle=puzzle, memory_budget_mb=cfg.memory_budget_mb, seed=cfg.seed)
    start = time.perf_counter()
    paths = sample_trajectories(model, x, max(cfg.samples), **sampling)
    independent_seconds = time.perf_counter() - start
    answers, value, halt = paths.answers.cpu(), paths.value.cpu(), paths.halt_logit.cpu()
    valid = task.judge(data.inputs[index], answers)  # [N, B]
    rows = []
    for n in sorted(cfg.samples):
        cost = n * depth * model.transitions
        for rule in BASELINES:
            selected, _ = select(rule, answers[:n], value[:n], halt[:n])
            rows.append({"method": rule, "samples": n, "transitions": cost,
                         **scores(task, cfg.split, index, answers[:n], selected)})
        for options in variants:
            start = time.perf_counter()
            result = smc_trajectories(model, x, n, options, **sampling)
            seconds = time.perf_counter() - start
            survivors = result.trajectories.answers.cpu()
            selected, _ = select("smc", survivors)
            rows.append({"method": f"smc {options.potential} tau={options.tempering:g} thr={options.threshold:g}",
                         "samples": n, "transitions": cost, **scores(task, cfg.split, index, survivors, selected),
                         "ess_by_step": result.ess.mean(1).tolist(),
                         "resampled_by_step": result.resampled.double().mean(1).tolist(),
                         "seconds": round(seconds, 1)})
            print(f"{rows[-1]['method']} N={n}: {seconds:.1f} s", file=sys.stderr)
    return {"run": str(cfg.run), "task": task.name, "split": cfg.split, "inputs": len(index), "depth": depth,
            "transitions_per_step": model.transitions, "seed": cfg.seed,
            "independent_seconds": round(independent_seconds, 1),
            "head_auc": {"value": auc(value, valid), "halt": auc(halt, valid)},
            "valid_share": valid.double().mean().item(), "rows": rows}


def percent(metric: dict) -> str:
    low, high = metric["ci95"]
    return f"{100 * metric['mean']:.1f} ± {100 * (high - low) / 2:.1f}"


def markdown(results: dict, command: str) -> str:
    """The rows as a markdown table, with the settings and the heads' AUCs."""
    lines = [f"`{command}`", "",
             f"{results['task']} {results['split']}: {results['inputs']} held-out inputs, depth {results['depth']}; "
             f"AUC of the last step's heads for a valid answer: value {results['head_auc']['value']:.3f}, "
             f"halt {results['head_auc']['halt']:.3f} (valid share {100 * results['valid_share']:.1f}%).", "",
             "| method | N | transitions / input | accuracy % | coverage@N % | sample accuracy % | pass@N % "
             "| mean ESS by step | resampled by step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        ess = " ".join(f"{e:.1f}" for e in r["ess_by_step"]) if "ess_by_step" in r else "–"
        share = " ".join(f"{s:.2f}" for s in r["resampled_by_step"]) if "resampled_by_step" in r else "–"
        coverage = percent(r["coverage"]) if "coverage" in r else "–"
        lines.append(f"| {r['method']} | {r['samples']} | {r['transitions']} | {percent(r['accuracy'])} "
                     f"| {coverage} | {100 * r['sample_accuracy']:.1f} | {percent(r['pass'])} | {ess} | {share} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, paths: list[Path]) -> None:
    """Accuracy and coverage@N (pass@N where the task has no coverage) against N per method (95%
    intervals), and each SMC setting's ESS / N by step at the largest N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colour = dict(zip(methods, plt.get_cmap("tab10").colors))
    sizes = sorted({r["samples"] for r in rows})
    second = "coverage" if "coverage" in rows[0] else "pass"
    figure, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for i, method in enumerate(methods):
        mine = [r for r in rows if r["method"] == method]
        shift = 1 + 0.012 * (i - len(methods) / 2)  # side by side, so that the intervals stay readable
        for axis, key in zip(axes[:2], ("accuracy", second)):
            means = [100 * r[key]["mean"] for r in mine]
            errors = [100 * (r[key]["ci95"][1] - r[key]["ci95"][0]) / 2 for r in mine]
            axis.errorbar([r["samples"] * shift for r in mine], means, yerr=errors, marker="o", capsize=2,
                          label=method, color=colour[method], linestyle="--" if method.startswith("smc") else "-")
    widest = sizes[-1]
    for r in rows:
        if r["samples"] == widest and "ess_by_step" in r:
            steps = range(1, len(r["ess_by_step"]) + 1)
            axes[2].plot(steps, [e / widest for e in r["ess_by_step"]], marker="o", color=colour[r["method"]],
                         linestyle="--")
    titles = ("accuracy % (selected answer)", f"{second}@N %", f"ESS / N after each step (N = {widest})")
    for axis, title in zip(axes, titles):
        axis.set_title(title, fontsize=9)
    for axis in axes[:2]:
        axis.set_xscale("log")
        axis.set_xticks(sizes, [str(n) for n in sizes])
        axis.minorticks_off()
        axis.set_xlabel("N (trajectories per input, all methods)")
    axes[2].set_xticks(list(steps))
    axes[2].set_xlabel("supervision step")
    axes[2].set_ylim(0, 1.05)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)
    figure.suptitle(f"{results['task']}: test-time SMC against vote and best-of-N at equal compute "
                    f"({results['inputs']} held-out inputs)", fontsize=10)
    figure.tight_layout(rect=(0, 0.14, 1, 1))
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=80)
    plt.close(figure)


@command_line("test_time_smc")
def main(argv: list[str]) -> int:
    cfg = compose_config(CONFIG, argv)
    if cfg.run is None:
        raise UserError("give run=<run directory>")
    results = compare(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python experiments/test_time_smc.py", *argv])
    (out / "results.json").write_text(json.dumps(json_ready({"command": command, **results}), indent=1))
    table = markdown(results, command)
    (out / "results.md").write_text(table)
    plot(results, [out / "results.png", *([Path(cfg.figure)] if cfg.figure else [])])
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
