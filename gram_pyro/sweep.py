"""``gram-pyro train --multirun``: a hyperparameter sweep, one training run per job, launched by Hydra.

The overrides follow Hydra's multirun grammar: ``objective.beta=0.05,0.1,0.5`` (or ``choice(...)``,
``range(...)``, and ``model=glob(*)`` for the options of a config group) is swept, any other override
holds for every job, and the jobs are the cartesian product of the sweeps, the first one varying
slowest (:func:`sweep_jobs`, as Hydra's basic sweeper). Overrides of ``hydra.*`` and ``hydra/*`` set up
the sweep itself: ``hydra.sweep.dir`` (default ``runs/sweep-<date>-<time>``) and the launcher
(``hydra/launcher``, default ``basic``: the jobs one after the other in this process; another Hydra
launcher plugin, once installed, runs them its way, e.g. ``hydra/launcher=joblib``).

Every job's config is composed and built (:class:`gram_pyro.run.Run`) before the first job
starts, so a bad value in any job is the usual one-line error and nothing runs. Job ``i`` trains into
``<sweep dir>/<i>`` (a run directory like any other: ``resume=<sweep dir>/<i>`` continues it).
When the jobs have finished, ``<sweep dir>/summary.csv`` holds one row per job: its number, status
(``ok`` or the one-line error that stopped it), run directory, the value of each swept key, and the
last row of its ``metrics.csv`` (columns ``train_*``) and ``eval.csv`` (``eval_*``).
"""

from __future__ import annotations

import csv
import functools
import itertools
import time
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra._internal.callbacks import Callbacks
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, ValueType
from hydra.core.plugins import Plugins
from hydra.errors import HydraException
from hydra.types import HydraContext
from omegaconf import DictConfig

from gram_pyro.config import CONFIG_MODULE, UserError, compose_config, first_line, group_options

SWEEP_DEFAULTS = {"hydra/job_logging": "none", "hydra/hydra_logging": "none", "hydra.output_subdir": "null"}
"""Hydra settings of a sweep unless the command line gives them: no logging set up by Hydra (training
prints its own progress) and no ``.hydra`` folder in a run directory (its ``config.yaml`` says it all)."""
PER_JOB_KEYS = ("run_dir", "resume")
"""Train keys a sweep sets per job itself."""


def parse_overrides(overrides: list[str]) -> list[Override]:
    """Hydra's parse of command-line overrides; a malformed one is a one-line :class:`UserError`."""
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        raise UserError(f"bad override: {first_line(error)}") from None


def sweep_values(override: Override) -> list[str]:
    """The ``key=value`` strings of the jobs one override makes: one for a plain value, one per value
    of a sweep (a ``glob`` over the options of a config group)."""
    key = override.get_key_element()
    if not override.is_sweep_override():
        return [f"{key}={override.get_value_element_as_str()}"]
    if not override.is_discrete_sweep():
        raise UserError(f"{override.input_line}: an interval has no list of values to sweep; allowed: a,b,..., "
                        f"choice(...), range(...), glob(...)")
    if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
        values = override.value().filter(group_options(override.key_or_group))
    else:
        values = list(override.sweep_string_iterator())
    return [f"{key}={value}" for value in values]


def sweep_jobs(overrides: list[Override]) -> list[list[str]]:
    """The override list of every job: the cartesian product of :func:`sweep_values`, in order."""
    return [list(job) for job in itertools.product(*(sweep_values(o) for o in overrides))]


def sweep_settings(overrides: list[Override]) -> tuple[list[str], Path]:
    """The ``hydra`` overrides of the sweep (the command line's, then :data:`SWEEP_DEFAULTS` and the
    default directory for the keys it does not give) and the sweep directory."""
    for override in overrides:
        if override.is_sweep_override():
            raise UserError(f"{override.input_line}: the sweep's own settings take one value")
    given = {o.key_or_group: o.get_value_element_as_str() for o in overrides}
    defaults = {**SWEEP_DEFAULTS, "hydra.sweep.dir": f"runs/sweep-{time.strftime('%Y%m%d-%H%M%S')}"}
    settings = {**defaults, **given}
    return [f"{key}={value}" for key, value in settings.items()], Path(settings["hydra.sweep.dir"])


def check_job(job: list[str], run_dir: Path) -> None:
    """Compose and build the run of a job that trains into ``run_dir`` (every check a single run makes
    before training), so that a bad value stops the sweep before anything runs."""
    from gram_pyro.run import Run, check_run_dir

    cfg = compose_config("train", job)
    for key in PER_JOB_KEYS:
        if cfg[key] is not None:
            raise UserError(f"{key}={cfg[key]} in a sweep: each job trains into <hydra.sweep.dir>/<job number>; "
                            f"set hydra.sweep.dir=<dir> instead")
    if not isinstance(cfg.overwrite, bool):
        raise UserError(f"overwrite={cfg.overwrite!r}; allowed: true, false")
    check_run_dir(run_dir, cfg.overwrite)
    Run(cfg)


def last_row(path: Path, prefix: str) -> dict:
    """The last row of a CSV file as ``{prefix + column: value}`` (empty if it has none)."""
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {f"{prefix}{key}": value for key, value in rows[-1].items()} if rows else {}


def train_job(cfg: DictConfig, swept: tuple[str, ...] = ()) -> dict:
    """Hydra's task function of a sweep job: train ``cfg`` into its job directory; the job's summary row
    (with the values of the ``swept`` override keys). A :class:`UserError` ends the job, not the sweep:
    it becomes the row's status."""
    from gram_pyro.training import train

    hydra = HydraConfig.get()
    run_dir = Path(hydra.sweep.dir) / str(hydra.job.num)
    values = {key: value for key, value in (o.split("=", 1) for o in hydra.overrides.task) if key in swept}
    print(f"job {hydra.job.num}: {' '.join(f'{k}={v}' for k, v in values.items())} -> {run_dir}", flush=True)
    try:
        train(cfg, run_dir, overwrite=cfg.overwrite)
        status = "ok"
    except UserError as error:
        status = f"error: {error}"
    return {"job": hydra.job.num, "status": status, "run_dir": str(run_dir), **values,
            **last_row(run_dir / "metrics.csv", "train_"), **last_row(run_dir / "eval.csv", "eval_")}


def write_summary(rows: list[dict], path: Path) -> None:
    """``rows`` as a CSV file whose columns are every key of any row, in order of first appearance."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def launch(jobs: list[list[str]], settings: list[str], swept: tuple[str, ...]) -> list[dict]:
    """Run ``jobs`` through the Hydra launcher that ``settings`` select; their summary rows (naming the
    ``swept`` keys)."""
    GlobalHydra.instance().clear()
    with initialize_config_module(CONFIG_MODULE, version_base=None, job_name="train"):
        try:
            master = compose("train", settings + jobs[0], return_hydra_config=True)
        except HydraException as error:
            raise UserError(first_line(error)) from None
        context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=Callbacks(master))
        launcher = Plugins.instance().instantiate_launcher(hydra_context=context, config=master,
                                                           task_function=functools.partial(train_job, swept=swept))
        results = launcher.launch(jobs, initial_job_idx=0)
    return [result.return_value for result in results]  # a job that raised anything else re-raises it here


def multirun(overrides: list[str]) -> Path:
    """The sweep of the module docstring; returns ``<sweep dir>/summary.csv``. Every job is checked
    first (:func:`check_job`); a job that stops with a one-line error leaves its row in the summary
    and the sweep ends with that error once the other jobs have run."""
    parsed = parse_overrides(overrides)
    settings, sweep_dir = sweep_settings([o for o in parsed if o.is_hydra_override()])
    task = [o for o in parsed if not o.is_hydra_override()]
    jobs = sweep_jobs(task)
    swept = [index for index, override in enumerate(task) if override.is_sweep_override()]
    for number, job in enumerate(jobs):
        try:
            check_job(job, sweep_dir / str(number))
        except UserError as error:
            raise UserError(f"job {number} ({' '.join(job[i] for i in swept) or 'no sweep'}): {error}") from None
    rows = launch(jobs, settings, tuple(task[i].get_key_element() for i in swept))
    summary = sweep_dir / "summary.csv"
    write_summary(rows, summary)
    failed = [row for row in rows if row["status"] != "ok"]
    if failed:
        raise UserError(f"{len(failed)} of {len(rows)} jobs failed, job {failed[0]['job']}: "
                        f"{failed[0]['status'][len('error: '):]} (summary: {summary})")
    return summary
