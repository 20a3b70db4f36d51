"""``gram-pyro <command> [key=value ...]``: one console script, Hydra-composed subcommands.

Commands:
  train       train a model: ``gram-pyro train task=nqueens model=gram guide=gaussian objective=truncated``;
              continue a run with ``gram-pyro train resume=<run dir> [overrides]``; a run_dir that holds
              a run is refused unless ``overwrite=true`` (which moves the old run aside).
  eval        metrics of a trained run with 95% intervals, from N prior trajectories per input:
              ``gram-pyro eval run=<dir> samples=20 depth=16 select=vote``.
  solve       answer every puzzle of a user file: ``gram-pyro solve run=<dir> input=<file>``.
  sample      unconditional samples of a generative task: ``gram-pyro sample run=<dir> n=64``.
  diagnose    posterior diagnostics (shortcut check, PSIS k-hat, diversity, ELBO curves) of a run:
              ``gram-pyro diagnose run=<dir>``.
  data stats  build a task's data (or read it from the cache) and print its counts as JSON:
              ``gram-pyro data stats task=coloring``.

User mistakes (unknown names or keys, CUDA asked for where there is none, a damaged checkpoint, a run's
config.yaml that names anything but the project's own classes) print one line ``gram-pyro: error: ...``
and exit with code 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from gram_pyro.config import (SEED_RANGE, Flag, Number, UserError, Whole, build, check_values, compose_config,
                              first_line, load_run_config, make_dir)

USAGE = """usage: gram-pyro train [key=value ...]        e.g. gram-pyro train model=trm trainer.max_batches=100
       gram-pyro eval run=<dir> [key=value ...]  e.g. gram-pyro eval run=runs/demo/learned samples=50
       gram-pyro solve run=<dir> input=<file>
       gram-pyro sample run=<dir> n=<N>
       gram-pyro diagnose run=<dir> [inputs=256 particles=64 ...]
       gram-pyro data stats [key=value ...]   e.g. gram-pyro data stats task=sudoku"""


def _train(overrides: list[str]) -> None:
    from gram_pyro.training import train

    cfg = compose_config("train", overrides)
    if cfg.resume:
        run_dir = Path(cfg.resume)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"resume={run_dir}: not a run directory (no config.yaml)")
        saved = load_run_config(run_dir / "config.yaml")
        OmegaConf.set_struct(saved, True)  # an override may change a key, not add one
        changes = [o for o in overrides if not o.startswith("resume=")]
        try:
            cfg = OmegaConf.merge(saved, OmegaConf.from_dotlist(changes))
        except Exception as error:
            raise UserError(f"bad override for resume: {first_line(error)}") from None
        out = train(cfg, run_dir, resume=True)
    else:
        if not isinstance(cfg.overwrite, bool):
            raise UserError(f"overwrite={cfg.overwrite!r}; allowed: true, false")
        out = train(cfg, Path(cfg.run_dir) if cfg.run_dir else None, overwrite=cfg.overwrite)
    print(f"run directory: {out}")


SAMPLING_RULES = {"samples": Whole(1), "depth": Whole(1, null=True), "halting": Flag(), "seed": Whole(*SEED_RANGE),
                  "memory_budget_mb": Number(null=True)}
"""What the keys of ``sampling.yaml`` (eval, solve, sample) may be."""
DIAGNOSE_RULES = {"inputs": Whole(1), "particles": Whole(2), "trajectories": Whole(1), "mcmc_chains": Whole(0),
                  "mcmc_inputs": Whole(1), "mcmc_samples": Whole(1), "mcmc_warmup": Whole(0),
                  "shortcut_threshold": Number(0, 1, closed=True), "seed": Whole(*SEED_RANGE)}
"""What the numeric keys of ``diagnose.yaml`` may be."""


def _sampling(cfg: DictConfig) -> dict:
    """The keyword arguments of ``sample_trajectories`` that a sampling config sets (checked first:
    :data:`SAMPLING_RULES`)."""
    from gram_pyro.selection import SELECTORS

    check_values(cfg, SAMPLING_RULES)
    if cfg.select not in SELECTORS:
        raise UserError(f"unknown selector select={cfg.select!r}; allowed: {', '.join(SELECTORS)}")
    perturbation = OmegaConf.to_container(cfg.perturbation) if cfg.perturbation.kind else None
    return {"depth": cfg.depth, "halting": cfg.halting, "seed": cfg.seed,
            "memory_budget_mb": cfg.memory_budget_mb, "perturbation": perturbation}


def _run_source(cfg) -> tuple[Path, Path]:
    """``(directory to load, directory under which default outputs go)`` from ``run=<dir>`` or
    ``pretrained=<name>`` (exactly one of them; shipped weights write their outputs under
    ``runs/pretrained/<name>``, never into the package)."""
    from gram_pyro.evaluation import pretrained_dir

    if (cfg.run is None) == (cfg.pretrained is None):
        raise UserError("give either run=<run directory> or pretrained=<name>")
    if cfg.pretrained is not None:
        return pretrained_dir(str(cfg.pretrained)), Path("runs") / "pretrained" / str(cfg.pretrained)
    return Path(cfg.run), Path(cfg.run)


def _eval(overrides: list[str]) -> None:
    from gram_pyro.evaluation import evaluate_run, format_table, load_run, write_evaluation

    cfg = compose_config("eval", overrides)
    sampling = _sampling(cfg)
    check_values(cfg, {"inputs": Whole(1)})
    source, home = _run_source(cfg)
    loaded = load_run(source, cfg.device)
    tag = f"{cfg.split}-N{cfg.samples}-d{cfg.depth or loaded.model.n_sup}-{cfg.select}" + \
        ("-halt" if cfg.halting else "") + (f"-{cfg.perturbation.kind}" if cfg.perturbation.kind else "")
    out = make_dir(Path(cfg.out or home / "eval" / tag), "out")  # before the work: a bad out fails fast
    report, arrays = evaluate_run(loaded, cfg.split, cfg.inputs, cfg.samples, rule=cfg.select, **sampling)
    write_evaluation(report, arrays, out)
    print(format_table(report))
    print(f"wrote {out / 'metrics.json'} and {out / 'samples.npz'}")


def _solve(overrides: list[str]) -> None:
    from gram_pyro.evaluation import load_run, solve_file

    cfg = compose_config("solve", overrides)
    sampling = _sampling(cfg)
    source = Path(cfg.input)
    output = Path(cfg.output or source.with_name(f"{source.stem}.answers{source.suffix}"))
    if output.is_dir():
        raise UserError(f"output={output} is a directory; allowed: a file to write the answers to")
    loaded = load_run(_run_source(cfg)[0], cfg.device)
    make_dir(output.parent, "output")
    solved, valid = solve_file(loaded, source, output, cfg.samples, cfg.select, **sampling)
    print(f"wrote {solved} answers ({valid} valid) to {output}")


def _sample(overrides: list[str]) -> None:
    from gram_pyro.evaluation import load_run, sample_unconditional

    cfg = compose_config("sample", overrides)
    sampling = _sampling(cfg)
    check_values(cfg, {"n": Whole(1)})
    source, home = _run_source(cfg)
    loaded = load_run(source, cfg.device)
    out = make_dir(Path(cfg.out or home / "samples"), "out")
    for path in sample_unconditional(loaded, cfg.n, out, **sampling):
        print(f"wrote {path}")


def _diagnose(overrides: list[str]) -> None:
    cfg = compose_config("diagnose", overrides)
    check_values(cfg, DIAGNOSE_RULES)
    from gram_pyro.diagnostics import diagnose  # imports ArviZ: slow, so only here, once the values are checked
    from gram_pyro.evaluation import load_run

    loaded = load_run(cfg.run, cfg.device)
    out = make_dir(Path(cfg.out or Path(cfg.run) / "diagnostics"), "out")
    checkpoints = sorted((Path(cfg.run) / "checkpoints").glob("batch_*.pt"))
    summary = diagnose(loaded.task, loaded.model, loaded.guide, out, run_dir=cfg.run, split=cfg.split,
                       num_inputs=cfg.inputs, num_particles=cfg.particles, num_trajectories=cfg.trajectories,
                       seed=cfg.seed, mcmc_chains=cfg.mcmc_chains, checkpoints=checkpoints,
                       shortcut_threshold=cfg.shortcut_threshold, mcmc_inputs=cfg.mcmc_inputs,
                       mcmc_samples=cfg.mcmc_samples, mcmc_warmup=cfg.mcmc_warmup, precision=cfg.precision)
    print(f"{summary['shortcut']['verdict']}\nwrote {out / 'report.md'}, {out / 'diagnostics.nc'} and figures")


def _data(arguments: list[str]) -> None:
    if not arguments or arguments[0] != "stats":
        raise UserError("usage: gram-pyro data stats task=<name> [key=value ...]")
    cfg = compose_config("data", arguments[1:])
    print(json.dumps(build(cfg.task, "task").stats(), indent=2))


COMMANDS = {"train": _train, "eval": _eval, "solve": _solve, "sample": _sample, "diagnose": _diagnose,
            "data": _data}


def main(argv: list[str] | None = None) -> int:
    code = run_command(sys.argv[1:] if argv is None else argv)
    if "WORLD_SIZE" in os.environ:  # a launcher's worker; torch is imported only then
        from gram_pyro.distributed import launched

        if launched().distributed:
            leave_worker(code)
    return code


def leave_worker(code: int) -> None:
    """End a ``torchrun`` worker once its command has returned (files closed, process group destroyed):
    flush and ``os._exit``, skipping the interpreter's teardown, where gloo's threads are sometimes
    destroyed while still joinable (``terminate called without an active exception``, SIGABRT), which
    would fail a run that completed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_command(argv: list[str]) -> int:
    """Run ``argv`` (command and overrides); the exit status (2 for a bad command or input)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, overrides = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"gram-pyro: error: unknown command {command!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        COMMANDS[command](overrides)
    except UserError as error:
        print(f"gram-pyro: error: {error}", file=sys.stderr)
        return 2
    except MissingMandatoryValue as error:
        print(f"gram-pyro: error: missing required value {error.full_key}: add {error.full_key}=<value>",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
