"""``diagnose``: every posterior diagnostic of a trained model and guide on held-out inputs, written
to a directory (docs/diagnostics.md explains each number and figure).

``out_dir`` receives

- ``diagnostics.nc``: an ArviZ InferenceData (netCDF) with
  ``posterior.eps_projection [chain=1, draw=K, input, step, transition, projection]`` (the K guide
  particles' eps projected on fixed random unit vectors), ``sample_stats`` (``log_weight`` and
  ``kl [chain, draw, input, ...]``, ``khat`` and ``ess [input]``), ``posterior_predictive.answers``
  (answers decoded along guide trajectories), ``prior_predictive.answers`` (along N prior
  trajectories) and ``observed_data`` (``inputs`` and ``targets [input, position]``);
- ``mcmc.nc`` (with ``mcmc_chains >= 2``): the NUTS chains' projections in its ``posterior`` group;
- ``report.md``, ``summary.json`` (the returned numbers) and the PNG figures.

Inputs are ``num_inputs`` drawn at random (seeded) from ``split``, each with one target drawn by
the split (a random valid solution where there are several). All randomness comes from ``seed``;
the caller's random state is left as it was. Each part is timed and the timings reported.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from gram_pyro.config import UserError
from gram_pyro.diagnostics import arviz_adapter, figures
from gram_pyro.diagnostics.diversity import distinct_answers, prior_trajectories
from gram_pyro.diagnostics.elbo_curves import checkpoint_elbos
from gram_pyro.diagnostics.importance import (KHAT_LIMIT, PROJECTION_DIMS, guide_particles, importance_ess,
                                              importance_khat, random_directions)
from gram_pyro.diagnostics.mcmc import VARIABLE, mcmc_diagnostics
from gram_pyro.diagnostics.shortcut import kl_profile, shortcut_check, training_curves
from gram_pyro.evaluation import json_ready
from gram_pyro.nn import network_dtype, network_precision
from gram_pyro.objectives.particles import log_mean_exp
from gram_pyro.tasks.base import IGNORE, Batch, held_out_index


class Timer:
    """Wall seconds per named part, in the order the parts ran."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def part(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass
class Options:
    """What :func:`diagnose` computes beyond task, model, guide and output directory: the run directory
    (its ``metrics.csv`` gives the KL over training), the held-out split, the size of every part, the
    checkpoints of the ELBO curves, thresholds and the networks' ``precision``
    (:data:`gram_pyro.nn.PRECISIONS`). ``gram-pyro diagnose`` builds it from its config
    (:meth:`from_config`)."""

    run_dir: str | Path | None = None
    split: str = "test"
    num_inputs: int = 256
    num_particles: int = 64
    num_samples: int = 20
    seed: int = 0
    mcmc_chains: int = 0
    checkpoints: Sequence[str | Path] = ()
    shortcut_threshold: float = 0.2
    unit_threshold: float = 0.01
    num_projections: int = 4
    pca_inputs: int = 4
    mcmc_inputs: int = 2
    mcmc_samples: int = 100
    mcmc_warmup: int = 100
    elbo_particles: int = 8
    memory_budget_mb: float | None = None
    precision: str = "auto"

    CONFIG_NAMES = {"run": "run_dir", "inputs": "num_inputs", "particles": "num_particles", "samples": "num_samples"}
    """Keys of the diagnose config (``experiments/configs/diagnose.yaml``) whose option has another name;
    the config's other keys that are options keep theirs."""

    @classmethod
    def from_config(cls, cfg, checkpoints: Sequence[str | Path] = ()) -> "Options":
        """The options of a composed diagnose config, with the ELBO curves' ``checkpoints``."""
        fields = set(cls.__dataclass_fields__)
        chosen = {cls.CONFIG_NAMES.get(key, key): value for key, value in cfg.items()}
        return cls(**{name: value for name, value in chosen.items() if name in fields}, checkpoints=list(checkpoints))


def _check(task, options: Options) -> None:
    if options.split not in task.splits:
        raise UserError(f"task {task.name} has no split {options.split!r}; allowed: {', '.join(task.splits)}")
    sizes = {name: getattr(options, name) for name in ("num_inputs", "num_particles", "num_samples",
                                                         "num_projections", "mcmc_inputs", "mcmc_samples",
                                                         "elbo_particles")}
    too_small = [f"{name}={value}" for name, value in sizes.items() if value < (2 if name == "num_particles" else 1)]
    if too_small:
        raise UserError(f"diagnostics need num_particles >= 2 and the other counts >= 1, got {', '.join(too_small)}")
    if options.mcmc_warmup < 0:
        raise UserError(f"mcmc_warmup must be >= 0, got {options.mcmc_warmup}")
    if options.mcmc_chains == 1 or options.mcmc_chains < 0:
        raise UserError(f"mcmc_chains must be 0 (no MCMC) or at least 2 (R-hat compares chains), "
                        f"got {options.mcmc_chains}")


def _scores(task, split: str, index: torch.Tensor, step_answers: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """``task.per_input`` of the answers after every step; ``step_answers [N_sup, N, M, S]``."""
    return [task.per_input(split, index, answers.cpu()) for answers in step_answers]


@torch.no_grad()
def diagnose(task, model, guide, out_dir: str | Path, options: Options | None = None, **changes) -> dict:
    """Run every diagnostic (module docstring) per ``options`` (default :class:`Options`), with the
    fields named in ``changes`` replaced (``diagnose(..., num_inputs=64)``), and return the summary
    numbers (also in ``summary.json``). ``options.precision`` is that of the networks' matmuls
    (:func:`gram_pyro.nn.network_precision`) for the prior trajectories, guide particles and ELBO
    curves; MCMC always runs in the model's dtype (its gradients)."""
    options = replace(options or Options(), **changes)
    _check(task, options)
    device = model.h0.device
    dtype = network_dtype(options.precision, device)  # a bad name fails here, before any file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = held_out_index(len(task.splits[options.split]), options.num_inputs, options.seed)
    batch = task.splits[options.split].batch(index, torch.Generator().manual_seed(options.seed)).to(device)
    timer, notes = Timer(), []
    modes = model.training, guide.training
    model.eval(), guide.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(options.seed)
            results = _run(task, model, guide, options, index, batch, dtype, timer, notes)
    finally:
        model.train(modes[0]), guide.train(modes[1])
    with timer.part("figures and files"):
        summary = _write(out_dir, task, model, guide, options, index, batch, results, notes)
    summary["seconds"] = {name: round(value, 2) for name, value in timer.seconds.items()}
    _write_report(out_dir, summary)
    (out_dir / "summary.json").write_text(json.dumps(json_ready(summary), indent=2))
    return summary


def _run(task, model, guide, options: Options, index: torch.Tensor, batch: Batch, dtype: torch.dtype | None,
         timer: Timer, notes: list[str]) -> dict:
    """The computations of :func:`diagnose`, the networks' matmuls in ``dtype`` (``None``: the model's);
    results as a dict of tensors and dataclasses."""
    results: dict = {}
    directions = None
    if model.stochastic:
        directions = random_directions(options.num_projections, model.h0.numel(), options.seed).to(model.h0.device)
    results["precision"] = "fp32" if dtype is None else "bf16"
    with timer.part("prior trajectories"), network_precision([model, guide], dtype):
        results["prior"] = prior_trajectories(model, batch.x, options.num_samples, batch.puzzle,
                                              options.pca_inputs, options.memory_budget_mb)
    with timer.part("guide particles"), network_precision([model, guide], dtype):
        results["particles"] = particles = guide_particles(model, guide, batch, options.num_particles, directions,
                                                           True, options.memory_budget_mb)
    with timer.part("scores"):
        final = results["prior"].step_answers[-1]
        results["valid"] = task.judge(batch.x, final, batch.y).cpu()
        results["distinct"] = distinct_answers(final.cpu())
        results["distinct_valid"] = distinct_answers(final.cpu(), results["valid"])
        results["prior_scores"] = _scores(task, options.split, index, results["prior"].step_answers)
        results["posterior_scores"] = _scores(task, options.split, index, particles.step_answers.movedim(2, 0))
        metric = task.shortcut_metric
        prior_score, posterior_score = results["prior_scores"][-1][metric], results["posterior_scores"][-1][metric]
        results["shortcut"] = shortcut_check(prior_score, posterior_score, options.shortcut_threshold, metric)
        results["kl"] = kl_profile(particles.kl.cpu(), particles.kl_units.cpu(), options.unit_threshold)
        results["training"] = training_curves(options.run_dir)
    with timer.part("importance diagnostics"):
        results["khat"] = importance_khat(particles.log_weight)
        results["ess"] = importance_ess(particles.log_weight).cpu()
    if options.mcmc_chains and not model.stochastic:
        notes.append("MCMC skipped: a deterministic model has no eps sites")
    elif options.mcmc_chains:
        with timer.part("mcmc"), torch.enable_grad():
            rows = slice(0, options.mcmc_inputs)
            few = batch.rows(rows)
            results["mcmc"] = mcmc_diagnostics(model, guide, few, directions, options.mcmc_chains, options.mcmc_samples,
                                               options.mcmc_warmup, input_labels=index[rows].tolist())
    if len(options.checkpoints) >= 2:
        with timer.part("elbo curves"), network_precision([model, guide], dtype):
            results["elbo_curves"] = checkpoint_elbos(model, guide, batch, options.checkpoints,
                                                      options.elbo_particles, options.memory_budget_mb)
    else:
        notes.append(f"surrogate vs full ELBO skipped: {len(options.checkpoints)} checkpoint(s) given, 2 needed")
    return results


def _means(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    return {metric: values.float().mean().item() for metric, values in scores.items()}


def _inference_data(model, index: torch.Tensor, batch: Batch, results: dict):
    """The ``diagnostics.nc`` InferenceData (module docstring) as plain arrays for the adapter."""
    particles, prior = results["particles"], results["prior"]
    draws = ("chain", "draw", "input")
    groups = {
        "sample_stats": {"log_weight": (draws, particles.log_weight[None].cpu().numpy()),
                         "kl": ((*draws, "step", "transition"), particles.kl[None].cpu().numpy()),
                         "khat": (("input",), results["khat"].numpy()),
                         "ess": (("input",), results["ess"].numpy())},
        "posterior_predictive": {"answers": ((*draws, "position"),
                                             particles.step_answers[None, :, :, -1].to(torch.int16).cpu().numpy())},
        "prior_predictive": {"answers": ((*draws, "position"),
                                         prior.step_answers[-1][None].to(torch.int16).cpu().numpy())},
        "observed_data": {"inputs": (("input", "position"), batch.x.cpu().numpy()),
                          "targets": (("input", "position"), batch.y.cpu().numpy())},
    }
    if particles.projection is not None:
        projection = particles.projection[None].cpu().numpy()
        groups["posterior"] = {VARIABLE: (("chain", "draw", *PROJECTION_DIMS), projection)}
    coords = {"input": index.tolist(), "position": list(range(batch.x.shape[-1])), "step": list(range(model.n_sup)),
              "transition": list(range(model.transitions))}
    if particles.projection is not None:
        coords["projection"] = list(range(particles.projection.shape[-1]))
    return arviz_adapter.inference_data(groups, coords)


def _write(out_dir: Path, task, model, guide, options: Options, index: torch.Tensor, batch: Batch, results: dict,
           notes: list[str]) -> dict:
    """Figures, netCDF files and the summary numbers (without timings)."""
    particles, prior, check, kl = results["particles"], results["prior"], results["shortcut"], results["kl"]
    tokens = (batch.y != IGNORE).sum().clamp(min=1).item()
    khat, ess = results["khat"], results["ess"]
    files = {"diagnostics": "diagnostics.nc"}
    arviz_adapter.write_netcdf(_inference_data(model, index, batch, results), out_dir / files["diagnostics"])
    prior_by_step = [scores[check.metric].float().mean().item() for scores in results["prior_scores"]]
    posterior_by_step = [scores[check.metric].float().mean().item() for scores in results["posterior_scores"]]
    files["accuracy"] = "accuracy.png"
    figures.accuracy_by_step(prior_by_step, posterior_by_step, out_dir / files["accuracy"], check.metric)
    files["kl"] = "kl.png"
    figures.kl_profile(kl.per_transition, kl.active_units, kl.units_per_step, kl.unit_threshold, out_dir / files["kl"])
    if particles.kl_units.nan_to_num().gt(0).any():
        files["kl_units"] = "kl_units.png"
        figures.kl_units(particles.kl_units, out_dir / files["kl_units"])
    if results["training"] and len(results["training"]) > 1:
        files["training"] = "training.png"
        figures.training_curves(results["training"], out_dir / files["training"])
    elif options.run_dir:
        notes.append(f"KL over training skipped: no metrics.csv with KL/NLL columns in {options.run_dir}")
    files["importance"] = "importance.png"
    figures.importance(khat, ess, options.num_particles, out_dir / files["importance"])
    files["diversity"] = "diversity.png"
    figures.diversity(results["distinct"], results["distinct_valid"], prior.spread.cpu(), options.num_samples,
                      out_dir / files["diversity"])
    if prior.paths.shape[0]:
        files["trajectories"] = "trajectories.png"
        shown = prior.paths.shape[0]
        figures.trajectory_paths(prior.paths.cpu(), prior.step_answers[-1][:, :shown].cpu(),
                                 results["valid"][:, :shown], out_dir / files["trajectories"])
    mcmc = None
    if "mcmc" in results:
        diagnostics = results["mcmc"]
        files["mcmc"] = "mcmc.nc"
        arviz_adapter.write_netcdf(diagnostics.data, out_dir / files["mcmc"])
        coords = {"input": [index[0].item()], "step": [model.n_sup - 1], "transition": [model.transitions - 1],
                  "projection": list(range(min(2, options.num_projections)))}
        files["mcmc_trace"], files["mcmc_rank"] = "mcmc_trace.png", "mcmc_rank.png"
        figures.mcmc_chains(diagnostics.data, VARIABLE, coords, out_dir / files["mcmc_trace"],
                            out_dir / files["mcmc_rank"])
        mcmc = {"chains": options.mcmc_chains, "inputs": min(options.mcmc_inputs, len(index)),
                "samples": options.mcmc_samples, "warmup": options.mcmc_warmup, "projections": options.num_projections,
                "r_hat_max": diagnostics.r_hat_max, "ess_bulk_min": diagnostics.ess_bulk_min,
                "ess_tail_min": diagnostics.ess_tail_min, "mcse_mean_max": diagnostics.mcse_mean_max}
    if "elbo_curves" in results:
        files["elbo_curves"] = "elbo_curves.png"
        figures.elbo_curves(results["elbo_curves"], out_dir / files["elbo_curves"])
    return {
        "task": task.name, "split": options.split, "inputs": len(index), "num_particles": options.num_particles,
        "num_samples": options.num_samples, "seed": options.seed, "precision": results["precision"],
        "model": {"noise": getattr(model, "noise", "learned"), "n_sup": model.n_sup, "transitions": model.transitions},
        "guide": {"family": type(guide).__name__, "posterior_transitions": guide.posterior_transitions},
        "shortcut": {**asdict(check), "prior_accuracy_by_step": prior_by_step,
                     "posterior_accuracy_by_step": posterior_by_step,
                     "prior_scores": _means(results["prior_scores"][-1]),
                     "posterior_scores": _means(results["posterior_scores"][-1])},
        "kl": asdict(kl),
        "importance": {"khat_median": khat.median().item(), "khat_max": khat.max().item(),
                       "khat_share_above_limit": (khat > KHAT_LIMIT).double().mean().item(), "khat_limit": KHAT_LIMIT,
                       "ess_mean": ess.mean().item(), "ess_fraction_mean": ess.mean().item() / options.num_particles,
                       "log_evidence_per_token": log_mean_exp(particles.log_weight).sum().item() / tokens},
        "diversity": {"distinct_answers_mean": results["distinct"].double().mean().item(),
                      "distinct_valid_answers_mean": results["distinct_valid"].double().mean().item(),
                      "spread_by_step": prior.spread.double().mean(1).tolist()},
        "mcmc": mcmc,
        "elbo_curves": results.get("elbo_curves"),
        "training_columns": [name for name in results["training"] or {} if name != "batch"] or None,
        "notes": notes,
        "files": files,
    }


def _number(value, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits; ``n/a`` for unknown (None, NaN)."""
    return "n/a" if value is None or value != value else f"{value:.{digits}g}"


def _write_report(out_dir: Path, summary: dict) -> None:
    """``report.md``: the summary's numbers, the figures and the timings."""
    check, kl, imp, div, files = (summary[key] for key in ("shortcut", "kl", "importance", "diversity", "files"))
    lines = [
        "# Posterior diagnostics", "",
        f"Task `{summary['task']}`, split `{summary['split']}`: {summary['inputs']} held-out inputs, "
        f"K = {summary['num_particles']} guide particles, N = {summary['num_samples']} prior trajectories, "
        f"seed {summary['seed']}. Model noise `{summary['model']['noise']}`, N_sup = {summary['model']['n_sup']}, "
        f"T = {summary['model']['transitions']}; guide `{summary['guide']['family']}` "
        f"(posterior_transitions = `{summary['guide']['posterior_transitions']}`).", "",
        "## Posterior shortcut", "", f"**{check['verdict']}**", "",
        "| metric | prior trajectories | posterior trajectories |", "|---|---|---|",
        *(f"| {metric} | {_number(check['prior_scores'][metric])} | {_number(check['posterior_scores'].get(metric))} |"
          for metric in check["prior_scores"]),
        "", f"![accuracy by step]({files['accuracy']})", "",
        f"KL(q || p) summed over transitions: {_number(kl['total'])} nats per input. Active units (KL > "
        f"{kl['unit_threshold']:g} nats, of {kl['units_per_step']}) per supervision step: "
        f"{', '.join(_number(count) for count in kl['active_units'])}.", "",
        "| step | " + " | ".join(f"KL t={t}" for t in range(len(kl["per_transition"][0]))) + " |",
        "|---|" + "---|" * len(kl["per_transition"][0]),
        *(f"| {n + 1} | " + " | ".join(_number(value) for value in row) + " |"
          for n, row in enumerate(kl["per_transition"])),
        "", f"![KL]({files['kl']})", "",
        *([f"![KL per unit]({files['kl_units']})", ""] if "kl_units" in files else []),
        *([f"![training]({files['training']})", ""] if "training" in files else []),
        "## Posterior quality (importance weights)", "",
        f"PSIS k-hat: median {_number(imp['khat_median'])}, max {_number(imp['khat_max'])}, "
        f"{imp['khat_share_above_limit']:.1%} of inputs above {imp['khat_limit']}. "
        f"Importance ESS: {_number(imp['ess_mean'])} of K = {summary['num_particles']} on average "
        f"({imp['ess_fraction_mean']:.1%}). log p(y | x) (IWAE bound, K particles): "
        f"{_number(imp['log_evidence_per_token'])} nats per target token.", "",
        f"![importance]({files['importance']})", "",
    ]
    if summary["mcmc"]:
        mcmc = summary["mcmc"]
        lines += ["## MCMC (NUTS)", "",
                  f"{mcmc['chains']} chains x {mcmc['samples']} draws ({mcmc['warmup']} warm-up) over the eps sites of "
                  f"{mcmc['inputs']} input(s), projected on {mcmc['projections']} fixed random unit vectors: "
                  f"max R-hat {_number(mcmc['r_hat_max'])}, min bulk ESS {_number(mcmc['ess_bulk_min'])}, "
                  f"min tail ESS {_number(mcmc['ess_tail_min'])}, max MCSE of the mean "
                  f"{_number(mcmc['mcse_mean_max'])}. Draws in `{files['mcmc']}`.", "",
                  f"![trace]({files['mcmc_trace']})", "", f"![rank]({files['mcmc_rank']})", ""]
    lines += ["## Trajectory diversity (prior)", "",
              f"Distinct answers among N = {summary['num_samples']}: {_number(div['distinct_answers_mean'])} "
              f"on average, {_number(div['distinct_valid_answers_mean'])} of them valid. Pairwise RMS distance of h "
              f"per step: {', '.join(_number(value) for value in div['spread_by_step'])}.", "",
              f"![diversity]({files['diversity']})", "",
              *([f"![trajectories]({files['trajectories']})", ""] if "trajectories" in files else [])]
    if summary["elbo_curves"]:
        lines += ["## Surrogate vs full ELBO (validation, nats per target token)", "",
                  "| batches | surrogate | full |", "|---|---|---|",
                  *(f"| {row['batches']} | {_number(row['surrogate'], 4)} | {_number(row['full'], 4)} |"
                    for row in summary["elbo_curves"]),
                  "", f"![ELBO]({files['elbo_curves']})", ""]
    if summary["notes"]:
        lines += ["## Notes", "", *(f"- {note}" for note in summary["notes"]), ""]
    lines += ["## Timings", "", f"Network matmuls in {summary['precision']} (densities in the model's dtype, log "
              "weights in float64; `precision=fp32` for full precision).", "", "| part | seconds |", "|---|---|",
              *(f"| {name} | {seconds:.2f} |" for name, seconds in summary["seconds"].items()),
              f"| total | {sum(summary['seconds'].values()):.2f} |", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
