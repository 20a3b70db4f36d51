"""One command per result: GRAM against the same-size deterministic TRM and the test-time-noise TRM.

    python experiments/reproduce.py task=<name> budget=<cpu|gpu> [out=DIR] [publish=true] [jobs=1|2]
                                    [eval.inputs=64 ...] [key=value train overrides ...]

The recipe ``experiments/configs/reproduce/<task>-<budget>.yaml`` holds the train-config overrides of
both runs (``train``), those added for the GRAM run (``gram``) and for the TRM run (``trm``), and the
evaluation settings (``eval``); ``train.*``, ``gram``, ``trm`` and ``eval.*`` arguments override the
recipe, every other ``key=value`` is added to the train config of both runs.

The script trains GRAM and TRM into ``<out>/gram`` and ``<out>/trm`` (default ``out``:
``runs/reproduce/<task>-<budget>``): with ``jobs=2`` (the default where both runs train on a CPU of at
least two cores) side by side in two processes, each on half of the cores until the other finishes and
hands its cores over (:mod:`gram_pyro.side_by_side`; unless ``trainer.threads`` is given), with
``jobs=1`` one after the other. A run directory that holds a finished run of the same config is
kept as it is; one that stopped early, or whose config differs only in ``trainer.max_batches`` or
``trainer.threads``, is resumed from its checkpoint, so an interrupted reproduction continues where it
stopped; one of another config is a one-line error (nothing is replaced). Then it scores,
on every input of each ``eval.splits`` split (or ``eval.inputs`` of them), ``eval.samples`` answers
per input decoded along prior trajectories of ``eval.depth`` supervision steps (null: the trained
depth; :func:`gram_pyro.evaluation.evaluate_run`, EMA weights):

* ``GRAM`` and ``TRM`` (deterministic: its answers are one answer repeated);
* ``PTRM``: the TRM run with ``N(0, eval.ptrm_sigma^2)`` noise on ``h`` after each step (no training);
* ``GRAM T=<t>`` for each ``t`` of ``eval.prior_temperatures``: the GRAM run with its noise drawn at prior
  temperature ``t`` (:func:`gram_pyro.inference.sample_trajectories`: ``eps ~ N(mu, (t * sigma)^2)``);
* ``data`` (``eval.data``): the training targets themselves as answers, the ceiling of a generation score.

Metrics (mean and 95% interval over inputs; set-level scores have no interval):

* answers to inputs: ``accuracy`` (share of all answers that the task's judge accepts), the task's other
  per-answer metrics (``conflicts`` per answer, ``exact``), ``coverage@N`` where the task defines it,
  ``pass@N`` (some answer correct), ``<rule>@N`` for each ``eval.select`` rule (accuracy of the answer
  the rule picks) and the task's set-level scores (``conflicts_total``: the conflicts of all inputs
  summed, averaged over the N answers); per-input metrics again ``by_solutions`` (inputs grouped by
  their number of valid solutions);
* generation: ``validity`` (share of valid answers), ``uniqueness``, ``grids`` (4x4 Sudoku: distinct
  valid grids of the 288), ``inception_score``, ``fid`` and whatever else the task scores.

Writes ``<out>/results.json`` (``task``, ``budget``, ``device``, ``wall_seconds``, ``test_inputs``,
``samples``, ``depth``, ``trained_depth``, ``recipe`` (the recipe as run, with the command's recipe
arguments as ``recipe_overrides`` and its train arguments as ``overrides``), ``configs`` (each run's train
config as trained, by recipe key: its task, model, guide, objective and trainer sections, so that a later
change of the task's recipe in ``experiments/configs/recipe/`` is seen), ``seconds``, ``models``; other
splits under ``splits``), each evaluation's ``metrics.json`` and ``samples.npz`` under
``<out>/eval/<model>-<split>/`` (a rerun keeps an evaluation written there after its run's last
checkpoint with the same settings, so a reproduction stopped while scoring continues), and with
``publish=true`` a copy of the results as ``docs/results/<task>-<budget>.json``
(``experiments/results_table.py`` renders ``docs/results.md`` from those). ``wall_seconds`` is the
training time of both runs (each run's checkpoint keeps it across resumed invocations) plus the
evaluation: this invocation's, and the sampling time of evaluations it kept from an earlier one; the
training time is the two runs' summed with ``jobs=1`` and the longer of the two with ``jobs=2``
(``jobs`` is recorded).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from gram_pyro.experiments.results_table import markdown_table
from gram_pyro.config import UserError, command_line, compose_config, group_options
from gram_pyro.evaluation import breakdown, evaluate_run, interval, json_ready, write_evaluation
from gram_pyro.inference import is_positive_finite
from gram_pyro.nn import native_bf16
from gram_pyro.run import load_run, resolve_device
from gram_pyro.selection import SELECTORS, select
from gram_pyro.side_by_side import cores_per_run, train_side_by_side
from gram_pyro.training import RUN_KEYS, batches_done, train_or_keep

PUBLISHED = Path(__file__).resolve().parents[1] / "docs" / "results"
"""Where ``publish=true`` copies the results (what ``experiments/results_table.py`` renders)."""
RECIPE_KEYS = ("train", "gram", "trm", "eval")
"""Top-level keys of a recipe: arguments under them override the recipe, not the train config."""
MODELS = {"GRAM": "gram", "TRM": "trm"}
"""Trained models: results name -> recipe key and run directory name."""


def recipes() -> dict[str, list[str]]:
    """``{task: [budget, ...]}`` of the recipe files ``experiments/configs/reproduce/<task>-<budget>.yaml``."""
    found: dict[str, list[str]] = {}
    for name in group_options("reproduce"):
        task, _, budget = name.rpartition("-")
        found.setdefault(task, []).append(budget)
    return found


def parse_arguments(argv: list[str]) -> tuple[dict, list[str], list[str]]:
    """``(options, recipe overrides, train overrides)``: ``task``, ``budget``, ``out``, ``publish`` and
    ``jobs`` from ``argv``; the arguments under a recipe key; the rest."""
    options = {"task": None, "budget": None, "out": None, "publish": "false", "jobs": None}
    recipe, extra = [], []
    for argument in argv:
        key, equals, value = argument.partition("=")
        if not equals:
            raise UserError(f"expected key=value, got {argument!r}")
        if key in options:
            options[key] = value
        elif key.lstrip("+~").split(".")[0] in RECIPE_KEYS:
            recipe.append(argument)
        else:
            extra.append(argument)
    if options["publish"] not in ("true", "false"):
        raise UserError(f"publish={options['publish']!r}; allowed: true, false")
    if options["jobs"] not in (None, "1", "2"):
        raise UserError(f"jobs={options['jobs']!r}; allowed: 1 (one run after the other), 2 (both runs at once)")
    return options, recipe, extra


def recipe_name(task: str | None, budget: str | None) -> str:
    """``<task>-<budget>``, checked against the recipe files (one-line error for a bad name)."""
    available = recipes()
    if task not in available:
        raise UserError(f"{'unknown task ' + repr(task) if task else 'task=<name> is required'}; "
                        f"allowed: {', '.join(available)}")
    if budget not in available[task]:
        raise UserError(f"{'unknown budget ' + repr(budget) if budget else 'budget=<name> is required'}; "
                        f"allowed: {', '.join(available[task])}")
    return f"{task}-{budget}"


def check_eval(settings: DictConfig) -> None:
    """One-line :class:`UserError` for evaluation settings that cannot be run, before anything trains."""
    def positive_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    if not (OmegaConf.is_list(settings.splits) and len(settings.splits) >= 1):
        raise UserError(f"eval.splits={settings.splits} must list at least one split")
    if not (settings.inputs is None or positive_int(settings.inputs)):
        raise UserError(f"eval.inputs={settings.inputs!r}; allowed: null (every input) or an integer >= 1")
    if not positive_int(settings.samples):
        raise UserError(f"eval.samples={settings.samples!r}; allowed: an integer >= 1")
    if not (settings.depth is None or positive_int(settings.depth)):
        raise UserError(f"eval.depth={settings.depth!r}; allowed: null (the trained depth) or an integer >= 1")
    unknown = [rule for rule in settings.select if rule not in SELECTORS]
    if unknown:
        raise UserError(f"unknown selector {unknown[0]!r} in eval.select; allowed: {', '.join(SELECTORS)}")
    if not is_positive_finite(settings.ptrm_sigma):
        raise UserError(f"eval.ptrm_sigma={settings.ptrm_sigma!r} must be a positive number")
    temperatures = settings.prior_temperatures
    if not (OmegaConf.is_list(temperatures) and all(is_positive_finite(t) and t != 1 for t in temperatures)):
        raise UserError(f"eval.prior_temperatures={temperatures} must list positive numbers other than 1 "
                        f"(1 is the GRAM row itself)")


def run_config(recipe: DictConfig, model: str, run_dir: Path, extra: list[str]) -> DictConfig:
    """The train config of ``model`` (``gram`` or ``trm``): the recipe's overrides, then ``extra``."""
    return compose_config("train", [*recipe.train, *recipe[model], *extra, f"run_dir={run_dir}"])


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU's model name as Linux reports it in ``cpuinfo`` (``None`` where it cannot be read)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return None
    names = [value.strip() for key, _, value in (line.partition(":") for line in lines) if key.strip() == "model name"]
    return names[0] if names else None


def device_name(device: torch.device) -> str:
    """The hardware a result was measured on: the CUDA device's name, or the CPU's core count and model,
    and "no native bf16" where a recipe's bf16 falls back to fp32 (:func:`gram_pyro.nn.native_bf16`:
    the same recipe then takes several times as long)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    details = [f"{os.cpu_count()} cores", cpu_model(), None if native_bf16(device) else "no native bf16"]
    return f"cpu ({', '.join(item for item in details if item)})"


def mean_and_interval(values: torch.Tensor) -> dict:
    """``{"mean", "ci95": [low, high]}`` of per-input values (:func:`gram_pyro.evaluation.interval`)."""
    return {key: item for key, item in interval(values).items() if key != "n"}


def scalar(value: float) -> dict:
    """A set-level score in the shape of an interval, without one."""
    return {"mean": value, "ci95": None}


def answer_metrics(task, split: str, index: torch.Tensor, answers: torch.Tensor, value: torch.Tensor,
                   halt_logit: torch.Tensor, rules: list[str]) -> dict:
    """The metrics (module docstring) of ``answers [N, M, S]`` to the inputs ``index`` of ``split``, with
    the LPRM ``value`` and ``halt_logit`` ``[N, M]`` of each for the selection rules."""
    samples = answers.shape[0]
    per_input = task.per_input(split, index, answers)
    scores = task.score(split, index, answers)
    if task.unconditional:
        by_input = {"validity": per_input["accuracy"]}
        # accuracy, validity and the digits' well_formed are the per-input validity; coverage becomes grids
        set_level = {k: v for k, v in scores.items() if k not in ("accuracy", "validity", "well_formed", "coverage")}
        if getattr(task, "num_all_grids", None):
            set_level["grids"] = round(scores["coverage"] * task.num_all_grids)
    else:
        by_input = {(f"coverage@{samples}" if k == "coverage" else k): v for k, v in per_input.items()}
        by_input[f"pass@{samples}"] = (per_input["accuracy"] > 0).double()
        for rule in rules:
            chosen, _ = select(rule, answers, value, halt_logit)
            by_input[f"{rule}@{samples}"] = task.per_input(split, index, chosen[None])["accuracy"]
        set_level = {k: v for k, v in scores.items() if k not in per_input}
    metrics = {**{k: mean_and_interval(v) for k, v in by_input.items()},
               **{k: scalar(v) for k, v in set_level.items()}}
    num_solutions = getattr(task.splits[split], "num_solutions", None)
    grouped = num_solutions is not None and len(torch.unique(num_solutions[index])) > 1
    metrics["by_solutions"] = breakdown(by_input, num_solutions[index]) if grouped else {}
    return metrics


def num_inputs(task, split: str, settings: DictConfig) -> int:
    """How many inputs of ``split`` are scored: all of them, or ``settings.inputs`` where that is fewer."""
    size = len(task.splits[split])
    return size if settings.inputs is None else min(settings.inputs, size)


def kept_evaluation(out_dir: Path, run_dir: Path, request: dict) -> tuple[dict, dict] | None:
    """``(report, arrays)`` of the evaluation in ``out_dir`` where it was written after the run's last
    checkpoint with the settings of ``request`` (the keys of a report it must match), else ``None``."""
    report_file, arrays_file, checkpoint = out_dir / "metrics.json", out_dir / "samples.npz", run_dir / "checkpoint.pt"
    if not (report_file.is_file() and arrays_file.is_file() and checkpoint.is_file()):
        return None
    if min(report_file.stat().st_mtime, arrays_file.stat().st_mtime) < checkpoint.stat().st_mtime:
        return None
    try:
        report = json.loads(report_file.read_text())
        with np.load(arrays_file) as stored:
            arrays = {key: stored[key] for key in stored.files}
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    if any(report.get(key) != value for key, value in request.items()):
        return None
    return report, arrays


def evaluate_model(loaded, split: str, settings: DictConfig, out_dir: Path, perturbation=None,
                   prior_temperature: float = 1.0) -> tuple[dict, float]:
    """Sample ``settings.samples`` prior trajectories of ``settings.depth`` supervision steps (at
    ``prior_temperature``) for the scored inputs of ``split`` and write the evaluation's files to
    ``out_dir``, or keep the files there if they were written after the run's last checkpoint with these
    settings (a reproduction stopped while scoring continues where it stopped). Returns the metrics and
    the sampling seconds of a kept evaluation (0 for one made now)."""
    inputs = num_inputs(loaded.task, split, settings)
    request = {"run": str(loaded.run_dir), "split": split, "inputs": inputs, "samples": settings.samples,
               "depth": settings.depth or loaded.model.n_sup, "select": "vote", "halting": False, "seed": 0,
               "prior_temperature": prior_temperature, "perturbation": perturbation}
    kept = kept_evaluation(out_dir, loaded.run_dir, request)
    if kept is None:
        report, arrays = evaluate_run(loaded, split, inputs, settings.samples, depth=settings.depth,
                                      perturbation=perturbation, prior_temperature=prior_temperature)
        write_evaluation(report, arrays, out_dir)
        kept_seconds = 0.0
    else:
        print(f"  kept the evaluation in {out_dir} (written after the run's last checkpoint, same settings)",
              flush=True)
        report, arrays = kept
        kept_seconds = report["sampling_seconds"]
    tensors = {k: torch.from_numpy(arrays[k]) for k in ("index", "answers", "value", "halt_logit")}
    metrics = answer_metrics(loaded.task, split, tensors["index"], tensors["answers"], tensors["value"],
                             tensors["halt_logit"], list(settings.select))
    return metrics, kept_seconds


def data_metrics(task, split: str) -> dict:
    """The metrics of the training targets as answers to the first input of ``split`` (generation tasks:
    what real data scores)."""
    train_split = task.splits["train"]
    targets = train_split.batch(torch.arange(len(train_split)), torch.Generator().manual_seed(0)).y
    return answer_metrics(task, split, torch.zeros(1, dtype=torch.long), targets[:, None], None, None, [])


def evaluate_split(runs: dict, split: str, settings: DictConfig, out: Path) -> dict:
    """``{"inputs": scored inputs, "models": {model: metrics}, "kept_seconds": sampling seconds of the
    evaluations kept from an earlier invocation}`` on ``split`` for GRAM, TRM, PTRM, GRAM at each of
    ``settings.prior_temperatures`` and (``settings.data``) the data."""
    trm = runs["TRM"]
    evaluations = {**{name: (loaded, None, 1.0) for name, loaded in runs.items()},
                   "PTRM": (trm, {"kind": "ptrm", "sigma": settings.ptrm_sigma, "which": "h"}, 1.0),
                   **{f"GRAM T={t:g}": (runs["GRAM"], None, t) for t in settings.prior_temperatures}}
    inputs = num_inputs(trm.task, split, settings)
    models, kept_seconds = {}, 0.0
    for name, (loaded, perturbation, temperature) in evaluations.items():
        started = time.time()
        print(f"evaluating {name} on {split}: {inputs} inputs x {settings.samples} prior trajectories"
              + (f" of depth {settings.depth}" if settings.depth else ""), flush=True)
        models[name], kept = evaluate_model(loaded, split, settings,
                                            out / "eval" / f"{name.replace(' ', '-')}-{split}", perturbation,
                                            temperature)
        kept_seconds += kept
        print(f"  {time.time() - started:.0f} s", flush=True)
    if settings.data:
        models["data"] = data_metrics(trm.task, split)
    return {"inputs": inputs, "models": models, "kept_seconds": kept_seconds}


def default_jobs(configs: dict[str, DictConfig]) -> int:
    """2 where every run trains on a CPU (``trainer.device`` resolved) of at least two cores, else 1."""
    on_cpu = all(resolve_device(cfg.trainer.device).type == "cpu" for cfg in configs.values())
    return 2 if on_cpu and (os.cpu_count() or 1) >= 2 else 1


def train_models(configs: dict[str, DictConfig], out: Path, jobs: int) -> dict[str, float]:
    """Train or keep each model's run (:func:`gram_pyro.training.train_or_keep`), ``jobs`` at a time,
    each on ``cores // jobs`` threads and then the cores of a finished run unless the config names its
    ``trainer.threads``; each run's training seconds by model name."""
    for model, cfg in configs.items():  # before any training: a directory of another run is an error now
        batches_done(out / MODELS[model], cfg)
    own_threads = any(cfg.trainer.threads is not None for cfg in configs.values())
    if jobs > 1 and not own_threads:
        for cfg in configs.values():
            cfg.trainer.threads = cores_per_run(jobs)
    calls = {model: functools.partial(train_or_keep, model, cfg, out / MODELS[model]) for model, cfg in configs.items()}
    return train_side_by_side(calls, jobs, hand_over=not own_threads)


def reproduce(task: str | None, budget: str | None, out: Path | None, recipe_overrides: list[str],
              extra: list[str], jobs: int | None = None) -> Path:
    """Train, evaluate and write ``<out>/results.json``; returns that file. ``jobs``: runs trained at
    once (``None``: :func:`default_jobs`)."""
    name = recipe_name(task, budget)
    recipe = compose_config(f"reproduce/{name}", recipe_overrides)
    check_eval(recipe.eval)
    out = out or Path("runs") / "reproduce" / name
    configs = {model: run_config(recipe, key, out / key, extra) for model, key in MODELS.items()}
    jobs = jobs or default_jobs(configs)
    out.mkdir(parents=True, exist_ok=True)
    train_seconds = train_models(configs, out, jobs)
    started = time.time()
    runs = {model: load_run(out / key) for model, key in MODELS.items()}
    first, *others = recipe.eval.splits
    scored = {split: evaluate_split(runs, split, recipe.eval, out) for split in recipe.eval.splits}
    eval_seconds = time.time() - started + sum(scored[split].pop("kept_seconds") for split in scored)
    trained_depth = runs["GRAM"].model.n_sup
    results = {"task": task, "budget": budget, "device": device_name(runs["GRAM"].device),
               "wall_seconds": round((sum if jobs == 1 else max)(train_seconds.values()) + eval_seconds, 1),
               "jobs": jobs,
               "test_inputs": scored[first]["inputs"], "samples": recipe.eval.samples,
               "depth": recipe.eval.depth or trained_depth, "trained_depth": trained_depth,
               "recipe": {**OmegaConf.to_container(recipe, resolve=True), "overrides": extra,
                          "recipe_overrides": recipe_overrides},
               "configs": {key: {section: OmegaConf.to_container(configs[model][section], resolve=True)
                                 for section in RUN_KEYS} for model, key in MODELS.items()},
               "seconds": {"train": {k: round(v, 1) for k, v in train_seconds.items()},
                           "eval": round(eval_seconds, 1)},
               "models": scored[first]["models"]}
    if others:
        results["splits"] = {split: scored[split] for split in others}
    path = out / "results.json"
    path.write_text(json.dumps(json_ready(results), indent=1) + "\n")
    return path


def publish(results_file: Path, task: str, budget: str) -> Path:
    """Copy ``results_file`` to ``<PUBLISHED>/<task>-<budget>.json``; returns the copy."""
    target = PUBLISHED / f"{task}-{budget}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(results_file, target)
    return target


@command_line("reproduce")
def main(argv: list[str]) -> int:
    options, recipe_overrides, extra = parse_arguments(argv)
    out = Path(options["out"]) if options["out"] else None
    jobs = int(options["jobs"]) if options["jobs"] else None
    path = reproduce(options["task"], options["budget"], out, recipe_overrides, extra, jobs)
    print(f"\n{markdown_table([json.loads(path.read_text())])}\nwrote {path}")
    if options["publish"] == "true":
        print(f"published {publish(path, options['task'], options['budget'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
