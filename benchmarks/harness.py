"""What the timing scripts share: their common options, the process setup, wall-clock timing that
waits for queued CUDA work, and the one-line exit on a user error. Scripts import it as ``harness``
(``python benchmarks/<script>.py`` puts this folder on the path)."""

from __future__ import annotations

import argparse
import time
from typing import Callable

import pyro
import torch

from gram_pyro.config import UserError


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and the positional Hydra overrides of the train config."""
    parser.add_argument("--device", default="auto")
    parser.add_argument("overrides", nargs="*")


def model_width(dim: int, ffn_ratio: float) -> list[str]:
    """Overrides for a model of width ``dim`` with ``ffn_hidden = ffn_ratio x dim``."""
    return [f"model.dim={dim}", f"model.ffn_hidden={round(ffn_ratio * dim)}"]


def setup(args: argparse.Namespace) -> None:
    """Pyro validation off (as in training) and ``--threads`` torch threads where given."""
    pyro.enable_validation(False)
    if args.threads:
        torch.set_num_threads(args.threads)


def seconds(fn: Callable[[], object], device: torch.device | None = None) -> float:
    """Wall seconds of ``fn()``; on CUDA, from an idle device to the end of the work it queued."""
    wait = device is not None and device.type == "cuda"
    if wait:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if wait:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run(main: Callable[[], None]) -> None:
    """Call ``main``; a :class:`UserError` (bad override, unknown device) exits with its one line."""
    try:
        main()
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
