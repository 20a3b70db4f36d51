"""``gram-pyro <command> [key=value ...]``: one console script, Hydra-composed subcommands.

Commands:
  train       train a model: ``gram-pyro train task=nqueens model=gram guide=gaussian objective=truncated``;
              continue a run with ``gram-pyro train resume=<run dir> [overrides]``.
  data stats  build a task's data (or read it from the cache) and print its counts as JSON:
              ``gram-pyro data stats task=coloring``.

User mistakes (unknown names or keys, CUDA asked for where there is none, a damaged checkpoint) print
one line ``gram-pyro: error: ...`` and exit with code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from gram_pyro.config import UserError, build, compose_config

USAGE = """usage: gram-pyro train [key=value ...]        e.g. gram-pyro train model=trm trainer.max_batches=100
       gram-pyro data stats [key=value ...]   e.g. gram-pyro data stats task=sudoku"""


def _train(overrides: list[str]) -> None:
    from gram_pyro.training import train

    cfg = compose_config("train", overrides)
    if cfg.resume:
        run_dir = Path(cfg.resume)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"resume={run_dir}: not a run directory (no config.yaml)")
        saved = OmegaConf.load(run_dir / "config.yaml")
        OmegaConf.set_struct(saved, True)  # an override may change a key, not add one
        changes = [o for o in overrides if not o.startswith("resume=")]
        try:
            cfg = OmegaConf.merge(saved, OmegaConf.from_dotlist(changes))
        except Exception as error:
            raise UserError(f"bad override for resume: {str(error).strip().splitlines()[0]}") from None
        out = train(cfg, run_dir, resume=True)
    else:
        out = train(cfg, Path(cfg.run_dir) if cfg.run_dir else None)
    print(f"run directory: {out}")


def _data(arguments: list[str]) -> None:
    if not arguments or arguments[0] != "stats":
        raise UserError("usage: gram-pyro data stats task=<name> [key=value ...]")
    cfg = compose_config("data", arguments[1:])
    print(json.dumps(build(cfg.task, "task").stats(), indent=2))


COMMANDS = {"train": _train, "data": _data}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
