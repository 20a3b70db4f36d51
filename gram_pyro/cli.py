"""``gram-pyro <command> [--help] [--cfg job] [--multirun] [key=value ...]``: one console script,
Hydra-composed subcommands (:data:`COMMANDS`: train, eval, solve, sample, diagnose, data stats).

As a Hydra application: ``gram-pyro <command> --help`` prints the command's purpose, its config
groups with their choices and every key with its default and comment (after the overrides given, so
``gram-pyro train task=sudoku --help`` lists Sudoku's keys); ``--cfg job`` prints the composed config
and runs nothing; ``gram-pyro train --multirun a=1,2 b=x,y`` runs a sweep (:mod:`gram_pyro.sweep`).

User mistakes (unknown names or keys, CUDA asked for where there is none, a damaged checkpoint, a run's
config.yaml that names anything but the project's own classes) print one line ``gram-pyro: error: ...``
and exit with code 2.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from gram_pyro.config import (CONFIG_MODULE, SEED_RANGE, Flag, Number, UserError, Whole, build, check_values,
                              compose_choices, compose_config, first_line, group_options, load_run_config,
                              make_dir)

USAGE = """usage: gram-pyro <command> [--help] [--cfg job] [key=value ...]
       gram-pyro train [--multirun] [key=value ...]  e.g. gram-pyro train model=trm trainer.max_batches=100"""


def _train_setup(overrides: list[str]) -> tuple[DictConfig, Path | None]:
    """The config a train command runs and the run directory it resumes (``None``: a fresh run). With
    ``resume=<dir>`` the config is the run's saved one with the other overrides applied (an override
    may change a key, not add one)."""
    cfg = compose_config("train", overrides)
    if not cfg.resume:
        return cfg, None
    run_dir = Path(cfg.resume)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"resume={run_dir}: not a run directory (no config.yaml)")
    saved = load_run_config(run_dir / "config.yaml")
    OmegaConf.set_struct(saved, True)
    changes = [o for o in overrides if not o.startswith("resume=")]
    try:
        return OmegaConf.merge(saved, OmegaConf.from_dotlist(changes)), run_dir
    except Exception as error:
        raise UserError(f"bad override for resume: {first_line(error)}") from None


def _train(overrides: list[str]) -> None:
    from gram_pyro.training import train

    cfg, resume = _train_setup(overrides)
    if resume is not None:
        out = train(cfg, resume, resume=True)
    else:
        if not isinstance(cfg.overwrite, bool):
            raise UserError(f"overwrite={cfg.overwrite!r}; allowed: true, false")
        out = train(cfg, Path(cfg.run_dir) if cfg.run_dir else None, overwrite=cfg.overwrite)
    print(f"run directory: {out}")


def _train_multirun(overrides: list[str]) -> None:
    from gram_pyro.sweep import multirun

    print(f"wrote {multirun(overrides)}")


SAMPLING_RULES = {"samples": Whole(1), "depth": Whole(1, null=True), "halting": Flag(), "seed": Whole(*SEED_RANGE),
                  "memory_budget_mb": Number(null=True), "prior_temperature": Number()}
"""What the keys of ``sampling.yaml`` (eval, solve, sample) may be."""
DIAGNOSE_RULES = {"inputs": Whole(1), "particles": Whole(2), "samples": Whole(1), "mcmc_chains": Whole(0),
                  "mcmc_inputs": Whole(1), "mcmc_samples": Whole(1), "mcmc_warmup": Whole(0),
                  "shortcut_threshold": Number(0, 1, closed=True), "seed": Whole(*SEED_RANGE)}
"""What the numeric keys of ``diagnose.yaml`` may be."""


def _sampling(cfg: DictConfig) -> dict:
    """The keyword arguments of ``sample_trajectories`` that a sampling config sets (checked first:
    :data:`SAMPLING_RULES`)."""
    from gram_pyro.nn import PRECISIONS
    from gram_pyro.nn import COMPILE_MODES
    from gram_pyro.selection import SELECTORS
    from gram_pyro.test_time_smc import SMCOptions, as_smc_options

    check_values(cfg, SAMPLING_RULES)
    if cfg.select not in SELECTORS:
        raise UserError(f"unknown selector select={cfg.select!r}; allowed: {', '.join(SELECTORS)}")
    for key, allowed in (("precision", PRECISIONS), ("compile", COMPILE_MODES)):
        if cfg[key] not in allowed:
            raise UserError(f"unknown {key}={cfg[key]!r}; allowed: {', '.join(allowed)}")
    smc = as_smc_options(OmegaConf.to_container(cfg.smc))
    if cfg.select != "smc" and smc != SMCOptions():
        raise UserError(f"the smc.* options apply to select=smc, not select={cfg.select}")
    perturbation = OmegaConf.to_container(cfg.perturbation) if cfg.perturbation.kind else None
    return {"depth": cfg.depth, "halting": cfg.halting, "seed": cfg.seed, "memory_budget_mb": cfg.memory_budget_mb,
            "prior_temperature": cfg.prior_temperature, "perturbation": perturbation,
            **({"smc": smc} if cfg.select == "smc" else {})}


def _run_source(cfg) -> tuple[Path, Path]:
    """``(directory to load, directory under which default outputs go)`` from ``run=<dir>`` or
    ``pretrained=<name>`` (exactly one of them; shipped weights write their outputs under
    ``runs/pretrained/<name>``, never into the package)."""
    from gram_pyro.run import pretrained_dir

    if (cfg.run is None) == (cfg.pretrained is None):
        raise UserError("give either run=<run directory> or pretrained=<name>")
    if cfg.pretrained is not None:
        return pretrained_dir(str(cfg.pretrained)), Path("runs") / "pretrained" / str(cfg.pretrained)
    return Path(cfg.run), Path(cfg.run)


def _eval(overrides: list[str]) -> None:
    from gram_pyro.evaluation import evaluate_run, format_table, inference_speed, write_evaluation
    from gram_pyro.run import load_run

    cfg = compose_config("eval", overrides)
    sampling = _sampling(cfg)
    check_values(cfg, {"inputs": Whole(1)})
    source, home = _run_source(cfg)
    loaded = load_run(source, cfg.device)
    tag = f"{cfg.split}-N{cfg.samples}-d{cfg.depth or loaded.model.n_sup}-{cfg.select}" + \
        ("-halt" if cfg.halting else "") + (f"-{cfg.perturbation.kind}" if cfg.perturbation.kind else "") + \
        (f"-T{cfg.prior_temperature:g}" if cfg.prior_temperature != 1 else "")
    out = make_dir(Path(cfg.out or home / "eval" / tag), "out")  # before the work: a bad out fails fast
    with inference_speed(loaded, cfg.precision, cfg.compile):
        report, arrays = evaluate_run(loaded, cfg.split, cfg.inputs, cfg.samples, rule=cfg.select, **sampling)
    write_evaluation(report, arrays, out)
    print(format_table(report))
    print(f"wrote {out / 'metrics.json'} and {out / 'samples.npz'}")


def _solve(overrides: list[str]) -> None:
    from gram_pyro.evaluation import inference_speed, solve_file, verdicts_path
    from gram_pyro.run import load_run

    cfg = compose_config("solve", overrides)
    sampling = _sampling(cfg)
    source = Path(cfg.input)
    output = Path(cfg.output or source.with_name(f"{source.stem}.answers{source.suffix}"))
    if output.is_dir():
        raise UserError(f"output={output} is a directory; allowed: a file to write the answers to")
    loaded = load_run(_run_source(cfg)[0], cfg.device)
    make_dir(output.parent, "output")
    with inference_speed(loaded, cfg.precision, cfg.compile):
        solved, valid = solve_file(loaded, source, output, cfg.samples, cfg.select, **sampling)
    verdicts = "" if loaded.task.verdict_in_answer else f", their verdicts to {verdicts_path(output)}"
    print(f"wrote {solved} answers ({valid} valid) to {output}{verdicts}")


def _sample(overrides: list[str]) -> None:
    from gram_pyro.evaluation import inference_speed, sample_unconditional
    from gram_pyro.run import load_run

    cfg = compose_config("sample", overrides)
    sampling = _sampling(cfg)
    source, home = _run_source(cfg)
    loaded = load_run(source, cfg.device)
    out = make_dir(Path(cfg.out or home / "samples"), "out")
    with inference_speed(loaded, cfg.precision, cfg.compile):
        written = sample_unconditional(loaded, cfg.samples, out, **sampling)
    for path in written:
        print(f"wrote {path}")


def _diagnose(overrides: list[str]) -> None:
    cfg = compose_config("diagnose", overrides)
    check_values(cfg, DIAGNOSE_RULES)
    from gram_pyro.diagnostics import Options, diagnose  # imports ArviZ: slow, so only once the values are checked
    from gram_pyro.run import load_run

    loaded = load_run(cfg.run, cfg.device)
    out = make_dir(Path(cfg.out or Path(cfg.run) / "diagnostics"), "out")
    checkpoints = sorted((Path(cfg.run) / "checkpoints").glob("batch_*.pt"))
    summary = diagnose(loaded.task, loaded.model, loaded.guide, out, Options.from_config(cfg, checkpoints))
    print(f"{summary['shortcut']['verdict']}\nwrote {out / 'report.md'}, {out / 'diagnostics.nc'} and figures")


def _data_config(arguments: list[str]) -> DictConfig:
    if not arguments or arguments[0] != "stats":
        raise UserError("usage: gram-pyro data stats task=<name> [key=value ...]")
    return compose_config("data", arguments[1:])


def _data(arguments: list[str]) -> None:
    cfg = _data_config(arguments)
    print(json.dumps(build(cfg.task, "task").stats(), indent=2))


@dataclass(frozen=True)
class Command:
    """A subcommand: what it is for, how it is called, the config it composes (``compose(overrides)``,
    what ``--cfg job`` prints and ``--help`` lists) and what runs it (``run(overrides)``; with
    ``--multirun``: ``sweep(overrides)``, where the command sweeps)."""

    purpose: str
    usage: str
    config: str
    run: Callable[[list[str]], None]
    compose: Callable[[list[str]], DictConfig]
    sweep: Callable[[list[str]], None] | None = None


def _composer(config: str) -> Callable[[list[str]], DictConfig]:
    return lambda overrides: compose_config(config, overrides)


COMMANDS = {
    "train": Command("train a model: a task, a model program, a guide (posterior family), an objective (posterior "
                     "scheme) and a trainer; continue a run with resume=<run dir>; a run_dir that holds a run is "
                     "refused unless overwrite=true (the old run is moved aside); --multirun sweeps, one run per job",
                     "gram-pyro train [--multirun] [key=value ...]", "train", _train,
                     lambda overrides: _train_setup(overrides)[0], _train_multirun),
    "eval": Command("metrics of a trained run with 95% intervals, from N prior trajectories per held-out input",
                    "gram-pyro eval run=<dir> | pretrained=<name> [key=value ...]", "eval", _eval, _composer("eval")),
    "solve": Command("answer every puzzle of a file, in the task's format, with a validity flag per line",
                     "gram-pyro solve run=<dir> | pretrained=<name> input=<file> [key=value ...]", "solve", _solve,
                     _composer("solve")),
    "sample": Command("unconditional samples of a generative task, as text grids (and a PNG sheet for images)",
                      "gram-pyro sample run=<dir> | pretrained=<name> samples=<N> [key=value ...]", "sample", _sample,
                      _composer("sample")),
    "diagnose": Command("posterior diagnostics of a run: the shortcut check, PSIS k-hat and ESS, diversity, ELBO "
                        "curves (ArviZ InferenceData, report.md, figures)",
                        "gram-pyro diagnose run=<dir> [key=value ...]", "diagnose", _diagnose, _composer("diagnose")),
    "data": Command("build a task's data (or read it from the cache) and print its counts as JSON",
                    "gram-pyro data stats [key=value ...]", "data", _data, _data_config),
}
OPTIONS = {"--help": "print the command's purpose, config groups and keys with their defaults",
           "--cfg job": "print the composed config and run nothing (Hydra's --cfg job; also -c job)",
           "--multirun": "train only: sweep comma-separated values, one run per job (also -m)"}


@dataclass
class Request:
    """A parsed command line: the command, its overrides and the options among them."""

    command: str
    overrides: list[str]
    help: bool = False
    show_config: bool = False
    multirun: bool = False


def parse(argv: list[str]) -> Request:
    """Split ``argv`` (command first) into a :class:`Request`; options may stand anywhere after the
    command. An unknown option or a ``--cfg`` other than ``job`` is a one-line :class:`UserError`."""
    request = Request(argv[0], [])
    rest = iter(argv[1:])
    for argument in rest:
        if argument in ("-h", "--help"):
            request.help = True
        elif argument in ("-m", "--multirun"):
            request.multirun = True
        elif argument in ("-c", "--cfg") or argument.startswith("--cfg="):
            kind = argument.partition("=")[2] or next(rest, "")
            if kind != "job":
                raise UserError(f"--cfg {kind}; allowed: --cfg job" if kind else f"{argument} needs a value; "
                                "allowed: --cfg job")
            request.show_config = True
        elif argument.startswith("-"):
            raise UserError(f"unknown option {argument}; allowed: {', '.join(OPTIONS)}")
        else:
            request.overrides.append(argument)
    return request


def key_comments(text: str, package: str = "") -> dict[str, str]:
    """``{dotted key: its end-of-line comment}`` for the mapping keys of a yaml config file whose
    content sits at ``package`` (nesting read from the two-space indentation)."""
    comments, path = {}, []
    for line in text.splitlines():
        match = re.match(r"^( *)([A-Za-z_]\w*)\s*:(.*)$", line)
        if not match:
            continue
        path = path[:len(match[1]) // 2] + [match[2]]
        comment = re.search(r"\s#\s*(.*)$", match[3])
        if comment:
            comments[".".join([package, *path] if package else path)] = comment[1]
    return comments


def config_comments(config: str, choices: dict[str, str]) -> dict[str, str]:
    """The comments of the keys of a composed config: those of the chosen file of each group, of the
    files its defaults list includes by name (``sampling``, ``train``) and of its primary file, each
    winning over the ones before (as their values do)."""
    root = resources.files(CONFIG_MODULE)
    files = [(root / group / f"{choice}.yaml", group) for group, choice in choices.items()
             if (root / group / f"{choice}.yaml").is_file()]  # an optional group's choice may name no file
    names = [config]
    while names:  # included configs before the configs that include them
        path = root / f"{names.pop()}.yaml"
        files.insert(len(choices), (path, ""))
        defaults = yaml.safe_load(path.read_text()).get("defaults", [])
        names += [entry for entry in defaults if isinstance(entry, str) and entry != "_self_"]
    return {key: comment for path, package in files for key, comment in key_comments(path.read_text(), package).items()}


def _value(value) -> str:
    """A config value as an override would write it."""
    if value is None or isinstance(value, (bool, list, dict)):
        return json.dumps(value).replace(" ", "")
    return str(value)


def command_help(name: str, overrides: list[str]) -> str:
    """What ``gram-pyro <name> [overrides] --help`` prints (see the module docstring)."""
    command = COMMANDS[name]
    if name == "data" and overrides[:1] == ["stats"]:
        overrides = overrides[1:]
    cfg, choices = compose_choices(command.config, overrides)
    lines = [f"usage: {command.usage}", "", command.purpose[0].upper() + command.purpose[1:] + ".", ""]
    if choices:
        lines.append("config groups (group=choice; * the one in use):")
        width = max(map(len, choices))
        for group in sorted(choices, key=lambda group: list(cfg).index(group) if group in cfg else len(cfg)):
            options = [f"{option}*" if option == choices[group] else option for option in group_options(group)]
            lines.append(f"  {group:<{width}}  {', '.join(options)}")
        lines.append("")
    comments = config_comments(command.config, choices)
    entries = [(key, value) for key, value in _leaves(OmegaConf.to_container(cfg, resolve=False))
               if not key.endswith("._target_")]  # what a group's choice builds, not a value to set
    width = min(40, max(len(f"{key}={_value(value)}") for key, value in entries))
    lines.append("keys (key=default):")
    for key, value in entries:
        setting = f"{key}={_value(value)}"
        lines.append(f"  {setting:<{width}}  # {comments[key]}" if key in comments else f"  {setting}")
    lines += ["", "options:"] + [f"  {option:<11}  {what}" for option, what in OPTIONS.items()]
    return "\n".join(lines)


def _leaves(node, prefix: str = "") -> list[tuple[str, object]]:
    """``(dotted key, value)`` of every leaf of a plain config tree (lists are leaves)."""
    if not isinstance(node, dict) or not node:
        return [(prefix, node)]
    return [leaf for key, value in node.items() for leaf in _leaves(value, f"{prefix}.{key}" if prefix else key)]


def main_help() -> str:
    """What ``gram-pyro --help`` prints: usage, the commands and the options."""
    width = max(map(len, COMMANDS))
    lines = [USAGE, "", "commands:"]
    lines += [f"  {name:<{width}}  {command.purpose}" for name, command in COMMANDS.items()]
    lines += ["", "options:"] + [f"  {option:<11}  {what}" for option, what in OPTIONS.items()]
    lines += ["", "gram-pyro <command> --help lists the command's config groups and keys."]
    return "\n".join(lines)


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


def _dispatch(request: Request) -> None:
    """Carry out a parsed command line (help, the composed config, a sweep or the command)."""
    command = COMMANDS[request.command]
    if request.help:
        print(command_help(request.command, request.overrides))
    elif request.multirun and command.sweep is None:
        raise UserError(f"--multirun: only {', '.join(n for n, c in COMMANDS.items() if c.sweep)} sweeps")
    elif request.show_config and request.multirun:
        from gram_pyro.sweep import parse_overrides, sweep_jobs

        jobs = sweep_jobs([o for o in parse_overrides(request.overrides) if not o.is_hydra_override()])
        for number, job in enumerate(jobs):
            print(f"# job {number}: {' '.join(job)}\n{OmegaConf.to_yaml(command.compose(job))}")
    elif request.show_config:
        print(OmegaConf.to_yaml(command.compose(request.overrides)), end="")
    elif request.multirun:
        command.sweep(request.overrides)
    else:
        command.run(request.overrides)


def run_command(argv: list[str]) -> int:
    """Run ``argv`` (command, overrides and options); the exit status (2 for a bad command or input)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(main_help() if argv else USAGE)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"gram-pyro: error: unknown command {argv[0]!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        _dispatch(parse(argv))
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
