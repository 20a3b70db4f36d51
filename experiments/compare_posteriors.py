"""The posterior comparison: one model configuration trained under several (guide, objective) pairs at
equal compute, each run then scored on held-out inputs from its own files.

    python experiments/compare_posteriors.py [out=DIR] [compare.pairs=[[gaussian,truncated],[prior,smc]]]
                                             [task=coloring] [model.dim=64] [key=value ...]
    python experiments/compare_posteriors.py comparison=uncond_sudoku4 [trainer.seed=1] [out=DIR]

Settings: ``experiments/configs/compare_posteriors.yaml`` (the train config plus ``out`` and
``compare``); ``comparison=<name>`` adds a task's preset from ``experiments/configs/comparison/``
(its model, trainer, budget and pairs). Guide and objective come from each pair; every objective with
particles gets ``compare.num_particles``; all other keys (task, model, trainer) are shared by every run.
A pair is ``[guide, objective]`` (its run is named ``<guide>-<objective>``) or a mapping ``{name,
guide, objective, overrides}`` whose ``overrides`` (train-config ``key=value`` strings) apply to that
run alone: a task's recipe, or a lever given to every scheme (``guide.posterior_steps=1``).

Equal compute. Cost is counted in transitions (one transition of the recursive model is
``K_low + 1`` backbone passes, the same model in every run) per training example. What one batch costs
is the objective's own ``cost(model)`` (:class:`gram_pyro.objectives.Objective`; each scheme's module
states its rule), read by :func:`transitions_per_batch` from the config alone: the objective built from
``cfg.objective``, its cost taken on the model config (``n_sup`` and ``transitions`` are all it reads).
The rules:

* ``N_sup * T`` for the truncated surrogates (one particle, ``T`` transitions per supervision step),
  twice that for ``objective=truncated`` with ``prior_weight > 0`` (the prior rollouts' own chain);
* ``K * N_sup * T`` for IWAE, SMC, Trace_ELBO and RWS with ``K`` particles (truncated or not), twice that
  for RWS with ``insomnia < 1`` (sleep-phi runs ``K`` whole prior programs per batch);
* ``N_sup * T * (1 + (warmup + samples) * leapfrog steps per draw + m_step_samples)`` for MCMC-EM with
  Pyro's kernels (HMC: ``num_steps``; NUTS: its maximum ``2^max_tree_depth``; nominal, the chain's
  adaptation adds some), and exactly ``N_sup * T * (1 + 1 + (warmup + samples) * num_steps +
  m_step_samples)`` with ``short_hmc`` (``objective=mcmc_em_short``: the guide's sample, the potential at
  it, one program per leapfrog step, the M-step's draws; without leapfrog steps no potential at the start).

The budget is ``compare.budget_batches * N_sup * T`` transitions per training example (what
``budget_batches`` batches of the truncated surrogate cost) and a pair trains for the most batches of
the same batch size whose cost (the objective's ``run_cost``: the sum of its batches' costs, so that
the prior chain is charged only from ``prior_start`` on) fits the budget: ``K`` particles buy ``K`` times
fewer batches and optimizer steps. A pair whose first batch costs more than the budget is a one-line
error.

Measured per run (``test`` split, EMA weights, seeded so every run sees the same inputs and targets):

* ``accuracy`` (share of all ``compare.eval_samples`` answers per input that the task's judge accepts;
  validity on the unconditional tasks) and ``coverage@N`` from prior trajectories on
  ``compare.eval_inputs`` inputs (:func:`gram_pyro.evaluation.evaluate_run`), with 95% intervals; where
  the task pools every answer instead (unconditional 4x4 Sudoku: distinct valid grids / 288), that
  set-level ``coverage``, without an interval;
* ``log_evidence``: mean over ``evidence_inputs`` inputs of ``log p(y | x)`` in nats per example (``y``
  observed at every supervision step), by importance sampling with the run's guide as proposal
  (``evidence_particles`` particles, :func:`gram_pyro.diagnostics.evidence.importance_log_evidence`; a
  lower bound whose gap depends on the guide), ``ess``, the mean effective sample size of its weights,
  and the PSIS ``k-hat`` of the same weights (:func:`gram_pyro.diagnostics.importance.importance_khat`:
  how well the run's guide covers its own model's posterior): ``khat`` its mean over the inputs,
  ``khat_high`` the share of inputs above 0.7, where the importance estimate cannot be trusted (``inf``
  below about 25 particles: too few weights for a Pareto tail);
* ``kl``: the training ``kl`` metric (KL of the final transition, nats per target token), the median of
  the last quarter of ``metrics.csv`` rows (one batch's spike does not make it), where the objective
  reports one (the truncated surrogates);
* ``optimizer_steps`` (the checkpoint's EMA update count), ``transitions`` and ``backbone_passes`` spent
  per training example, ``train_seconds`` (the run's training and its own final evaluation, as its
  checkpoint keeps them across resumed invocations) and ``eval_seconds`` (the measurements above).

A rerun with the same ``out`` keeps every finished run, resumes a stopped one from its checkpoint and
trains the missing ones (:func:`gram_pyro.training.train_or_keep`; a directory holding a run of another
config is a one-line error before anything trains), then measures them all again. Writes
``<out>/<name>/`` (each run), ``<out>/comparison.csv``, ``<out>/comparison.md``
(a markdown table, each pair's overrides under it) and ``<out>/comparison.png`` (bars of accuracy, coverage and log p(y | x)). Every
number comes from the run directories. The config sets ``trainer.threads: 1`` (on a CPU shared with
other jobs one thread is much faster at this size); training sets it, and the measurements that
follow each run keep it. ``compare.jobs`` > 1 trains that many pairs at once, each in a process of its
own (on a machine with the cores, or on one GPU with small models); a pair's run is the same either way,
but its ``train_seconds`` then include waiting for the device that the pairs share.
"""

from __future__ import annotations

import csv
import math
import re
import statistics
import sys
import time
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from gram_pyro.checkpoint import load_checkpoint  # noqa: E402
from gram_pyro.config import UserError, build, command_line, compose_config  # noqa: E402
from gram_pyro.diagnostics.evidence import importance_log_evidence  # noqa: E402
from gram_pyro.diagnostics.importance import KHAT_LIMIT, importance_khat  # noqa: E402
from gram_pyro.evaluation import evaluate_run  # noqa: E402
from gram_pyro.run import load_run  # noqa: E402
from gram_pyro.side_by_side import worker_pool  # noqa: E402
from gram_pyro.tasks.base import held_out_index  # noqa: E402
from gram_pyro.training import RUN_KEYS, batches_done, train_or_keep  # noqa: E402

CONFIG = "compare_posteriors"
PER_PAIR = ("guide", "objective")
PAIR_KEYS = ("name", "guide", "objective", "overrides")
COLUMNS = ["name", "guide", "objective", "particles", "batches", "optimizer_steps", "transitions", "backbone_passes",
           "train_seconds", "eval_seconds", "accuracy", "accuracy_ci95", "coverage", "coverage_ci95",
           "log_evidence", "ess", "khat", "khat_high", "kl", "run_dir"]


@dataclass(frozen=True)
class Pair:
    """One entry of ``compare.pairs``: its run's ``name``, guide, objective and own train overrides."""

    name: str
    guide: str
    objective: str
    overrides: tuple[str, ...] = ()


def read_pair(entry) -> Pair:
    """A :class:`Pair` from ``[guide, objective]`` or ``{name, guide, objective, overrides}`` (module
    docstring); anything else is a one-line :class:`UserError`."""
    if OmegaConf.is_list(entry) and len(entry) == 2:
        guide, objective = entry
        return Pair(f"{guide}-{objective}", str(guide), str(objective))
    if not OmegaConf.is_dict(entry) or not {"guide", "objective"} <= set(entry) or set(entry) - set(PAIR_KEYS):
        raise UserError(f"compare.pairs: each pair is [guide, objective] or {{{', '.join(PAIR_KEYS)}}} "
                        f"(name and overrides optional), got {entry}")
    overrides = entry.get("overrides")
    if overrides is None:
        overrides = []
    elif not OmegaConf.is_list(overrides) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise UserError(f"compare.pairs: overrides of a pair are a list of key=value strings, got {overrides}")
    for override in overrides:
        if override.lstrip("+~").partition("=")[0] in PER_PAIR:
            raise UserError(f"compare.pairs: {override}: a pair's guide and objective are its own keys")
    guide, objective = str(entry.guide), str(entry.objective)
    name = str(entry.get("name") or f"{guide}-{objective}")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise UserError(f"compare.pairs: name {name!r} is a run directory: letters, digits, '_', '-' and '.' only")
    return Pair(name, guide, objective, tuple(overrides))


def pair_config(overrides: list[str], pair: Pair, num_particles: int) -> DictConfig:
    """The train config of one pair: the comparison's shared keys, the pair's guide and objective, the
    comparison's ``num_particles`` where the objective has particles, then the pair's own overrides."""
    chosen = [*overrides, f"guide={pair.guide}", f"objective={pair.objective}"]
    if "num_particles" in compose_config(CONFIG, chosen).objective:
        chosen.append(f"objective.num_particles={num_particles}")
    return OmegaConf.masked_copy(compose_config(CONFIG, [*chosen, *pair.overrides]), list(RUN_KEYS))


def scheme(cfg: DictConfig):
    """The objective built from ``cfg.objective``, for its cost rule (module docstring). No model is
    built; the task only for ``prior_target=nearest`` or ``distinct``, which need the task's
    nearest-solution search to be built at all (the judge, used by the loss alone, keeps its default)."""
    nearest = cfg.objective.get("prior_target") in ("nearest", "distinct")
    solutions = {"nearest": build(cfg.task, "task").nearest_solution} if nearest else {}
    return build(cfg.objective, "objective", **solutions)


def transitions_spent(cfg: DictConfig, batches: int) -> int:
    """Transitions per training example that ``batches`` batches of ``cfg``'s objective run (its
    ``run_cost`` on the model config)."""
    return scheme(cfg).run_cost(cfg.model, batches)


def batches_within(cfg: DictConfig, budget: int) -> int:
    """The most batches of ``cfg``'s objective whose cost is at most ``budget`` transitions per example
    (every batch costs at least one, so at most ``budget``)."""
    objective = scheme(cfg)
    low, high = 0, budget
    while low < high:
        middle = (low + high + 1) // 2
        if objective.run_cost(cfg.model, middle) <= budget:
            low = middle
        else:
            high = middle - 1
    return low


def plan(settings: DictConfig, overrides: list[str]) -> list[tuple[Pair, DictConfig]]:
    """``(pair, config)`` per pair, ``trainer.max_batches`` set by the budget rule."""
    compare = settings.compare
    if compare.budget_batches < 1:
        raise UserError(f"compare.budget_batches must be at least 1, got {compare.budget_batches}")
    runs = []
    for pair in map(read_pair, compare.pairs):
        if any(pair.name == other.name for other, _ in runs):
            raise UserError(f"compare.pairs: two pairs are named {pair.name!r}: give each its own name")
        cfg = pair_config(overrides, pair, compare.num_particles)
        budget = compare.budget_batches * cfg.model.n_sup * cfg.model.transitions
        batches = batches_within(cfg, budget)
        if batches == 0:
            raise UserError(f"pair {pair.name}: one batch costs {transitions_spent(cfg, 1)} transitions per example, "
                            f"more than the budget of {budget}; raise compare.budget_batches")
        cfg.trainer.max_batches = batches
        runs.append((pair, cfg))
    return runs


def training_kl(run_dir: Path) -> float:
    """The median of the ``kl`` column over the last quarter of ``metrics.csv`` rows (nan if absent)."""
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    if not rows or "kl" not in rows[0]:
        return math.nan
    tail = rows[-max(len(rows) // 4, 1):]
    return statistics.median(float(row["kl"]) for row in tail)


def ci_half_width(metric: dict) -> float:
    low, high = metric["ci95"]
    return (high - low) / 2


def measure(run_dir: Path, compare: DictConfig) -> dict:
    """The held-out scores and costs of a finished run, read from its directory (module docstring)."""
    start = time.perf_counter()
    loaded = load_run(run_dir)
    report, _ = evaluate_run(loaded, num_inputs=compare.eval_inputs, num_samples=compare.eval_samples)
    metrics = report["metrics"]
    data = loaded.task.splits["test"]
    index = held_out_index(len(data), compare.evidence_inputs, 0)
    batch = data.batch(index, torch.Generator().manual_seed(0)).to(loaded.device)
    evidence = importance_log_evidence(loaded.model, loaded.guide, batch, compare.evidence_particles,
                                       compare.evidence_chunk)
    khat = importance_khat(evidence.log_weights)
    coverage = metrics.get(f"coverage@{compare.eval_samples}")
    if coverage is None and "coverage" in metrics:  # a set-level score (4x4 grids): no interval
        coverage = {"mean": metrics["coverage"], "ci95": [math.nan, math.nan]}
    batches = loaded.cfg.trainer.max_batches
    spent = transitions_spent(loaded.cfg, batches)
    return {"batches": batches,
            "optimizer_steps": load_checkpoint(run_dir / "checkpoint.pt")["ema"]["updates"],
            "transitions": spent, "backbone_passes": spent * (loaded.cfg.model.low_steps + 1),
            "eval_seconds": round(time.perf_counter() - start, 1),
            "accuracy": metrics["sample_accuracy"]["mean"],
            "accuracy_ci95": ci_half_width(metrics["sample_accuracy"]),
            "coverage": math.nan if coverage is None else coverage["mean"],
            "coverage_ci95": math.nan if coverage is None else ci_half_width(coverage),
            "log_evidence": evidence.log_evidence.mean().item(), "ess": evidence.ess.mean().item(),
            "khat": khat.mean().item(), "khat_high": (khat > KHAT_LIMIT).double().mean().item(),
            "kl": training_kl(run_dir)}


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=COLUMNS)
        out.writeheader()
        out.writerows(rows)


def number(value: float, digits: int) -> str:
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def with_interval(value: float, half_width: float) -> str:
    """A percentage and the half-width of its 95% interval where it has one (a set-level score has none)."""
    return number(value, 1) + ("" if math.isnan(half_width) else f" ± {half_width:.1f}")


def write_markdown(rows: list[dict], pairs: list[Pair], settings: DictConfig, command: str, path: Path) -> None:
    """The table of ``rows`` with the settings it was measured under and the pairs' own overrides."""
    compare = settings.compare
    samples = compare.eval_samples
    lines = [f"`{command}`", "",
             f"Budget: {compare.budget_batches * settings.model.n_sup * settings.model.transitions} transitions "
             f"per training example (batch {settings.trainer.batch_size}); accuracy and coverage@{samples}: "
             f"{compare.eval_inputs} held-out inputs x {samples} prior trajectories (95% intervals); "
             f"log p(y|x): {compare.evidence_inputs} inputs, K = {compare.evidence_particles}, guide as proposal; "
             f"PSIS k-hat of those weights: mean over the inputs (share above {KHAT_LIMIT}).",
             "",
             f"| run | guide | objective | K | batches | steps | train s | accuracy % | coverage@{samples} % "
             f"| log p(y\\|x) | ESS / {compare.evidence_particles} | k-hat | KL |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['guide']} | {r['objective']} | {r['particles']} | {r['batches']} "
                     f"| {r['optimizer_steps']} "
                     f"| {r['train_seconds']:.0f} | {100 * r['accuracy']:.1f} ± {100 * r['accuracy_ci95']:.1f} "
                     f"| {with_interval(100 * r['coverage'], 100 * r['coverage_ci95'])} "
                     f"| {r['log_evidence']:.2f} | {r['ess']:.1f} | {r['khat']:.2f} ({100 * r['khat_high']:.0f}%) "
                     f"| {number(r['kl'], 3)} |")
    own = [f"- {pair.name}: `{' '.join(pair.overrides)}`" for pair in pairs if pair.overrides]
    lines += ["", "Overrides of single runs:", *own] if own else []
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], num_samples: int, path: Path) -> None:
    """Bars of accuracy, coverage (with 95% intervals) and log p(y | x) per pair."""
    labels = [r["name"] for r in rows]
    panels = [("accuracy", "accuracy %", 100), ("coverage", f"coverage@{num_samples} %", 100),
              ("log_evidence", "log p(y|x), nats", 1)]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for axis, (key, title, scale) in zip(axes, panels):
        values = [scale * r[key] for r in rows]
        errors = [scale * r[f"{key}_ci95"] for r in rows] if f"{key}_ci95" in rows[0] else None
        axis.bar(range(len(rows)), values, yerr=errors, color="tab:blue", capsize=2)
        axis.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
        axis.set_title(title, fontsize=9)
    axes[2].set_yscale("symlog")  # a guide far from the posterior can be thousands of nats below the rest
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def train_and_measure(pair: Pair, cfg: DictConfig, run_dir: Path, compare: DictConfig, quiet: bool) -> dict:
    """Train one pair into ``run_dir`` (or keep or resume the run there) and measure it: its row of
    ``comparison.csv``."""
    seconds = train_or_keep(pair.name, cfg, run_dir, quiet)
    return {"name": pair.name, "guide": pair.guide, "objective": pair.objective,
            "particles": cfg.objective.get("num_particles", 1), "train_seconds": round(seconds, 1),
            "run_dir": str(run_dir), **measure(run_dir, compare)}


def train_in_parallel(runs: list[tuple[Pair, DictConfig]], out: Path, compare: DictConfig, jobs: int,
                      quiet: bool) -> list[dict]:
    """:func:`train_and_measure` for every pair, ``jobs`` pairs at a time in fresh (spawned) processes;
    the rows in the order of ``runs``. Each pair's run is the same as in one process (its own seed)."""
    with worker_pool(min(jobs, len(runs))) as pool:
        futures = {pool.submit(train_and_measure, pair, cfg, out / pair.name, compare, True): i
                   for i, (pair, cfg) in enumerate(runs)}
        rows: list[dict | None] = [None] * len(runs)
        for done, future in enumerate(as_completed(futures), 1):
            rows[futures[future]] = row = future.result()
            if not quiet:
                print(f"[{done}/{len(runs)}] {row['name']}: {row['batches']} batches in "
                      f"{row['train_seconds']:.0f} s, accuracy {100 * row['accuracy']:.1f}%", flush=True)
    return rows


def compare_posteriors(overrides: list[str], quiet: bool = False) -> list[dict]:
    """Train and measure every pair (module docstring); returns the rows of ``comparison.csv``."""
    for override in overrides:
        if override.lstrip("+~").partition("=")[0] in PER_PAIR:
            raise UserError(f"{override}: guide and objective are set per pair; use compare.pairs=[[guide,objective],...]")
    settings = compose_config(CONFIG, overrides)
    out = Path(settings.out)
    runs = plan(settings, overrides)
    for pair, cfg in runs:  # before any training: a directory of another run is an error now, not later
        batches_done(out / pair.name, cfg)
    jobs = settings.compare.jobs
    if not isinstance(jobs, int) or jobs < 1:
        raise UserError(f"compare.jobs must be a whole number of at least 1, got {jobs}")
    if jobs == 1:
        rows = []
        for pair, cfg in runs:
            if not quiet:
                print(f"[{len(rows) + 1}/{len(runs)}] {pair.name}: {cfg.trainer.max_batches} batches", flush=True)
            rows.append(train_and_measure(pair, cfg, out / pair.name, settings.compare, quiet))
    else:
        rows = train_in_parallel(runs, out, settings.compare, jobs, quiet)
    command = " ".join(["python experiments/compare_posteriors.py", *overrides])
    write_csv(rows, out / "comparison.csv")
    write_markdown(rows, [pair for pair, _ in runs], settings, command, out / "comparison.md")
    plot(rows, settings.compare.eval_samples, out / "comparison.png")
    return rows


@command_line("compare_posteriors")
def main(argv: list[str]) -> int:
    compare_posteriors(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
