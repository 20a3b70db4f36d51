"""Checkpoints: written atomically (temporary file + rename), read with one-line errors.

A checkpoint holds everything needed to continue a run exactly: model and guide weights (z0 is a
model buffer), optimizer and scheduler state, EMA weights, torch RNG states and the number of
batches done. The data order is a function of (seed, batch index), so it needs no state.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gram_pyro.config import UserError, first_line
from gram_pyro.files import write_whole

FORMAT = "gram-pyro-checkpoint-1"
REQUIRED = ("model", "guide", "optimizer", "scheduler", "ema", "rng", "batches_done", "bad_steps")
WEIGHTS = ("model", "guide")
"""What shipped weights (``pretrained/<name>/weights.pt``) hold: the EMA weights, nothing to train on."""


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (:func:`gram_pyro.files.write_whole`): a crash leaves
    the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, lambda temporary: torch.save({"format": FORMAT, **payload}, temporary))


def load_checkpoint(path: Path, required: tuple[str, ...] = REQUIRED) -> dict:
    """Read a checkpoint holding the ``required`` entries; a missing, truncated or foreign file is a
    :class:`UserError`."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise UserError(f"{path} is not a checkpoint file")
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for damaged files
        raise UserError(f"checkpoint {path} is unreadable (truncated or not a checkpoint: {first_line(error)})") \
            from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a gram-pyro checkpoint")
    missing = [key for key in required if key not in payload]
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}")
    return payload


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
