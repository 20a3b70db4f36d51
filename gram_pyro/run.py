"""Building and loading runs: everything a run holds, built from its config, and its directory.

:class:`Run` builds task, model, guide, objective, optimizer, scheduler and EMA from a composed config
(checked first: only the project's classes, sane trainer values) and saves, checks and restores their
state (checkpoints); the training loop (:mod:`gram_pyro.training`) drives it. :func:`load_run` rebuilds
a trained run with the same builder and its EMA weights for inference (:mod:`gram_pyro.evaluation`,
the CLI, diagnostics). The run directory helpers say what a directory holds and move an old run aside
rather than replace it.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from gram_pyro.checkpoint import WEIGHTS, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from gram_pyro.config import SEED_RANGE, UserError, build, check_targets, first_line, load_run_config, make_dir
from gram_pyro.distributed import World, join
from gram_pyro.nn import COMPILE_MODES, PRECISIONS, compile_networks, tf32_beside_bf16, training_dtype
from gram_pyro.objectives import Objective
from gram_pyro.tasks.base import is_int

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    if name not in DEVICES:
        raise UserError(f"unknown trainer.device {name!r}; allowed: {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but CUDA is not available here; use trainer.device=cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


TRAINER_LIMITS = {
    "batch_size": (1, None), "max_batches": (0, None), "lr": (0, 1), "weight_decay": (0, None),
    "warmup_steps": (0, None), "lr_final": (0, 1), "grad_clip": (0, None), "ema_decay": (0, 1), "log_every": (1, None),
    "eval_every": (0, None), "eval_inputs": (1, None), "eval_samples": (1, None),
    "checkpoint_every": (1, None), "max_bad_steps": (0, None), "threads": (1, None), "spike_factor": (1, None),
    "shortcut_gap": (0, 1), "shortcut_after": (0, None), "seed": SEED_RANGE,
}
"""Inclusive ``(lowest, highest)`` of the numeric trainer keys (``None``: unbounded; the keys of
:data:`TRAINER_NULLABLE` may also be null). A learning rate above 1 moves every weight by more than 1 per
AdamW step: never a useful setting."""

TRAINER_NULLABLE = ("threads", "spike_factor")
"""The numeric trainer keys whose null means "not set": the cores, no spike guard."""

TRAINER_INTEGERS = ("seed", "batch_size", "max_batches", "warmup_steps", "log_every", "eval_every", "eval_inputs",
                    "eval_samples", "checkpoint_every", "max_bad_steps", "threads", "shortcut_after")
"""The trainer keys that count or size something: ``batch_size=2.5`` is refused, not rounded."""
TRAINER_FLAGS = ("keep_checkpoints", "validate_pyro")
"""The trainer keys that are ``true`` or ``false``."""

LR_SCHEDULES = ("constant", "cosine")
"""Allowed ``trainer.lr_schedule`` values: the learning rate after warm-up (:func:`lr_factor`)."""

SHORTCUT_ACTIONS = ("warn", "stop", "off")
"""Allowed ``trainer.shortcut_action`` values: what a detected posterior shortcut does to a run."""


def check_trainer(trainer: DictConfig) -> None:
    """One-line :class:`UserError` for a trainer value out of :data:`TRAINER_LIMITS`, not finite or not a
    number, a fraction where :data:`TRAINER_INTEGERS` want a whole number, or a flag that is not a bool."""
    for key, (low, high) in TRAINER_LIMITS.items():
        value = trainer[key]
        if key in TRAINER_NULLABLE and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"trainer.{key}={value!r} is not a number")
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"trainer.{key}={value} is not a finite number; allowed: {allowed}")
        if value < low or (high is not None and value > high):
            raise UserError(f"trainer.{key}={value} is out of range; allowed: {allowed}")
    for key in TRAINER_INTEGERS:
        if not (is_int(trainer[key]) or (key in TRAINER_NULLABLE and trainer[key] is None)):
            raise UserError(f"trainer.{key}={trainer[key]!r} is not an integer")
    for key in TRAINER_FLAGS:
        if not isinstance(trainer[key], bool):
            raise UserError(f"trainer.{key}={trainer[key]!r}; allowed: true, false")
    if trainer.compile not in COMPILE_MODES:
        raise UserError(f"unknown trainer.compile {trainer.compile!r}; allowed: {', '.join(COMPILE_MODES)}")
    if trainer.precision not in PRECISIONS:
        raise UserError(f"unknown trainer.precision {trainer.precision!r}; allowed: {', '.join(PRECISIONS)}")
    if trainer.lr_schedule not in LR_SCHEDULES:
        raise UserError(f"unknown trainer.lr_schedule {trainer.lr_schedule!r}; allowed: {', '.join(LR_SCHEDULES)}")
    if trainer.shortcut_action not in SHORTCUT_ACTIONS:
        raise UserError(f"unknown trainer.shortcut_action {trainer.shortcut_action!r}; "
                        f"allowed: {', '.join(SHORTCUT_ACTIONS)}")
    betas = list(trainer.betas) if OmegaConf.is_list(trainer.betas) else trainer.betas
    if not (isinstance(betas, list) and len(betas) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise UserError(f"trainer.betas={betas} must be two numbers in [0, 1)")


def lr_factor(step: int, warmup: int, total: int, schedule: str, final: float) -> float:
    """The learning rate of optimizer step ``step`` (from 0) as a share of ``trainer.lr``: a linear
    warm-up ``min(1, (step + 1) / warmup)``, times 1 (``constant``) or, for ``cosine``, the half cosine
    ``final + (1 - final) (1 + cos(pi p)) / 2`` over the progress ``p = (step - warmup) / (total - warmup)``
    (clipped to [0, 1]) of the ``total`` steps after warm-up, so the last step runs at ``final``."""
    factor = min(1.0, (step + 1) / max(warmup, 1))
    if schedule == "cosine":
        progress = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
        factor *= final + (1 - final) * (1 + math.cos(math.pi * progress)) / 2
    return factor


class EMA:
    """Exponential moving average of parameters: ``shadow <- d_t * shadow + (1 - d_t) * param`` with the
    warm-up ``d_t = min(decay, (1 + t) / (10 + t))`` at update ``t``, so that a short run's average is
    not dominated by the initial weights."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - self.current_decay())
        self.updates += 1

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self):
        """Swap the EMA weights in for the duration of the block."""
        saved = [p.detach().clone() for p in self.params]
        self.copy_to()
        try:
            yield
        finally:
            for p, s in zip(self.params, saved):
                p.copy_(s)

    @torch.no_grad()
    def copy_to(self) -> None:
        """Write the EMA weights into the parameters for good (a run loaded for inference)."""
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        for s, value in zip(self.shadow, state["shadow"]):
            s.copy_(value)
        self.updates = state["updates"]


class Run:
    """Everything a training run holds; built from a composed config (checked first: only the project's
    classes, sane trainer values). ``run_dir``: where its checkpoints go, named in error messages."""

    def __init__(self, cfg: DictConfig, world: World = World(), run_dir: Path | None = None):
        trainer = cfg.trainer
        check_targets(cfg, "config")
        check_trainer(trainer)
        self.cfg, self.world, self.run_dir = cfg, world, run_dir
        self.device = join(world, resolve_device(trainer.device))
        torch.manual_seed(trainer.seed)
        self.task = build(cfg.task, "task")
        self.model = build(cfg.model, "model", vocab_size=self.task.vocab_size, seq_len=self.task.seq_len,
                           num_puzzles=self.task.num_puzzles)
        self.guide = build(cfg.guide, "guide", model=self.model)
        solutions = {"nearest": self.task.nearest_solution} if "prior_target" in cfg.objective else {}
        self.objective: Objective = build(cfg.objective, "objective", judge=self.task.judge, **solutions)
        try:
            self.objective.check(self.model, self.guide)
        except ValueError as error:
            raise UserError(f"objective does not fit the model/guide: {error}") from None
        self.model.to(self.device)
        self.guide.to(self.device)
        compile_networks([self.model, self.guide], trainer.compile)
        tf32_beside_bf16(training_dtype(trainer.precision, self.device), self.device)
        self.params = [p for m in (self.model, self.guide) for p in m.parameters()]
        # fused (CPU and CUDA): it reads ``found_inf`` and skips a whole update on device
        # (:func:`gram_pyro.training.train_batch`)
        self.optimizer = torch.optim.AdamW(self.params, lr=trainer.lr, weight_decay=trainer.weight_decay,
                                           betas=tuple(trainer.betas), fused=True)
        warmup, schedule, final = trainer.warmup_steps, trainer.lr_schedule, trainer.lr_final
        updates = self.objective.updates_per_batch(self.model)
        total = trainer.max_batches * updates
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, warmup, total, schedule, final))
        self.ema = EMA([self.model, self.guide], trainer.ema_decay)
        self.batches_done = 0
        self.saved_at: int | None = None  # batches_done of the last checkpoint written or loaded
        self.seconds = 0.0  # training time up to batches_done (set from the clock by the loop)
        self.bad_steps = torch.zeros((), dtype=torch.long, device=self.device)
        # the spike guard (trainer.spike_factor): per update of a batch, the running mean of its gradient
        # norms (NaN before the first) and whether the last batch's was skipped
        self.grad_norm_mean = torch.full((updates,), math.nan, device=self.device)
        self.spiked = torch.zeros(updates, dtype=torch.bool, device=self.device)
        if world.rank:  # identical initial weights on every rank, then a random stream of its own
            torch.manual_seed(trainer.seed + world.rank)

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "guide": self.guide.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict(), "rng": rng_state(), "objective": self.objective.state_dict(),
                "batches_done": self.batches_done, "bad_steps": int(self.bad_steps), "seconds": self.seconds,
                "grad_norm_mean": self.grad_norm_mean.tolist(), "spiked": self.spiked.tolist()}

    def load(self, payload: dict, source: Path | str = "the checkpoint") -> None:
        """Continue from a checkpoint's ``payload`` (read from ``source``, named in errors). One that does
        not fit the configured model and guide, is damaged inside or holds a NaN or infinite tensor is a
        one-line :class:`UserError`."""
        try:
            self._load(payload)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
            raise UserError(f"{source} does not match the configured model/guide or is damaged inside: "
                            f"{first_line(error)}") from None
        if not self.finite():
            raise UserError(f"{source} holds NaN or infinite weights, which training never saves; use an "
                            f"earlier checkpoint or train afresh")

    def _load(self, payload: dict) -> None:
        self.model.load_state_dict(payload["model"])
        self.guide.load_state_dict(payload["guide"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.apply_hyperparameters()
        if len(payload["ema"]["shadow"]) != len(self.ema.shadow):
            raise ValueError(f"{len(payload['ema']['shadow'])} EMA tensors for {len(self.ema.shadow)} parameters")
        self.ema.load_state_dict(payload["ema"])
        self.objective.load_state_dict(payload.get("objective", {}))  # checkpoints before objectives had state
        set_rng_state(payload["rng"])  # rank 0's stream; the others continue from their own seed
        if self.world.rank:
            torch.manual_seed(self.cfg.trainer.seed + self.world.rank * 1_000_003 + payload["batches_done"])
        self.batches_done = self.saved_at = payload["batches_done"]
        self.bad_steps.fill_(payload["bad_steps"])
        self.seconds = float(payload.get("seconds", 0.0))  # checkpoints before it was kept: 0
        if "grad_norm_mean" in payload:  # checkpoints before the spike guard start it afresh
            self.grad_norm_mean.copy_(torch.tensor(payload["grad_norm_mean"]))
            self.spiked.copy_(torch.tensor(payload["spiked"]))

    def apply_hyperparameters(self) -> None:
        """Give a loaded optimizer and scheduler the configured learning rate, weight decay and betas
        (their state holds the ones they were saved with), so that ``resume=<dir> trainer.lr=<lower>``
        takes effect; with the saved values it changes nothing."""
        trainer = self.cfg.trainer
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group.update(lr=trainer.lr * factor, initial_lr=trainer.lr, weight_decay=trainer.weight_decay,
                         betas=tuple(trainer.betas))
        self.scheduler.base_lrs = [trainer.lr] * len(self.optimizer.param_groups)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def recovery(self) -> str:
        """Where the last good checkpoint is and how to go on from it with a lower learning rate."""
        lower = f"trainer.lr={self.cfg.trainer.lr / 10:g}"
        if self.run_dir is None:
            return f"lower the learning rate, e.g. {lower}"
        if self.saved_at is None:
            return (f"no checkpoint was written; train afresh with a lower learning rate: "
                    f"gram-pyro train run_dir={self.run_dir} overwrite=true {lower}")
        return (f"the last good checkpoint is {self.run_dir / 'checkpoint.pt'} (batch {self.saved_at}); resume "
                f"from it with a lower learning rate: gram-pyro train resume={self.run_dir} {lower}")

    def check_bad_steps(self) -> None:
        """Stop the run once more than ``trainer.max_bad_steps`` updates had a non-finite loss. It reads
        the device counter (a host sync), so training calls it at logging and checkpoint intervals only."""
        if int(self.bad_steps) > self.cfg.trainer.max_bad_steps:
            raise UserError(f"stopped at batch {self.batches_done}: {int(self.bad_steps)} non-finite losses "
                            f"(trainer.max_bad_steps={self.cfg.trainer.max_bad_steps}); {self.recovery()}")

    @torch.no_grad()
    def finite(self) -> bool:
        """Whether every weight, buffer (z0), EMA weight and optimizer moment is finite: one fused
        reduction (the max-abs norm of every tensor), one host sync."""
        moments = [value for state in self.optimizer.state.values() for value in state.values()
                   if torch.is_tensor(value) and value.is_floating_point()]
        buffers = [b for m in (self.model, self.guide) for b in m.buffers() if b.is_floating_point()]
        tensors = [t for t in (*self.params, *buffers, *self.ema.shadow, *moments) if t.numel()]
        return bool(torch.stack(torch._foreach_norm(tensors, float("inf"))).isfinite().all())

    def check_finite(self) -> None:
        """Stop the run if a weight, EMA weight or optimizer moment is NaN or infinite (:meth:`finite`);
        called before every checkpoint."""
        if not self.finite():
            raise UserError(f"stopped at batch {self.batches_done}: the weights are no longer finite (NaN or "
                            f"inf) and were not saved; {self.recovery()}")

    def save(self, *paths: Path) -> None:
        """Write the run's state to each of ``paths`` (atomically) once :meth:`check_finite` passes: no
        checkpoint ever holds a non-finite tensor, and a failed check keeps the previous one."""
        self.check_finite()
        state = self.state()
        for path in paths:
            save_checkpoint(path, state)
        self.saved_at = self.batches_done


def default_run_dir(cfg: DictConfig) -> Path:
    task = cfg.task._target_.rsplit(".", 1)[-1].removesuffix("Task").lower()
    return Path("runs") / f"{task}-{cfg.model.noise}-{time.strftime('%Y%m%d-%H%M%S')}"


RUN_FILES = ("checkpoint.pt", "config.yaml", "metrics.csv", "eval.csv")
"""The files that make a directory hold a training run."""


def run_files(run_dir: Path) -> list[str]:
    """The names among :data:`RUN_FILES` that ``run_dir`` holds (none: a new or unrelated directory)."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """A one-line :class:`UserError` where training afresh into ``run_dir`` cannot go on: a file is in
    the way, or it holds a run and ``overwrite`` is off (nothing is replaced silently)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run_dir={run_dir} is a file; allowed: a new directory or one that holds no run")
    found = run_files(run_dir)
    if found and not overwrite:
        raise UserError(f"run_dir={run_dir} holds a run ({', '.join(found)}); continue it with "
                        f"resume={run_dir}, or start afresh with overwrite=true (the old run is moved aside)")


def prepare_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` for a fresh run; a run it holds is first moved aside, never deleted, to
    ``<run_dir>.old-<date>-<time>`` (printed)."""
    if run_files(run_dir):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
        copy = 1
        while aside.exists():
            copy += 1
            aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{copy}")
        try:
            run_dir.rename(aside)
        except OSError as error:
            raise UserError(f"run_dir={run_dir}: cannot move the old run aside to {aside} "
                            f"({error.strerror or first_line(error)})") from None
        print(f"moved the previous run in {run_dir} to {aside}", flush=True)
    make_dir(run_dir, "run_dir")


@dataclass
class LoadedRun:
    """A trained run ready for inference: its config, task, model and guide (EMA weights, eval mode)."""

    run_dir: Path
    cfg: DictConfig
    task: object
    model: torch.nn.Module
    guide: torch.nn.Module
    device: torch.device


PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained"
"""Shipped weights: ``pretrained/<name>/`` holds ``config.yaml`` and ``weights.pt`` (EMA weights only)."""


def pretrained_dir(name: str) -> Path:
    """The directory of the shipped weights ``name``; an unknown name is a one-line :class:`UserError`."""
    available = sorted(p.name for p in PRETRAINED.iterdir() if (p / "weights.pt").is_file()) \
        if PRETRAINED.is_dir() else []
    if name not in available:
        raise UserError(f"unknown pretrained={name!r}; allowed: {', '.join(available) or 'none shipped'}")
    return PRETRAINED / name


def load_run(run_dir: str | Path, device: str | None = None) -> LoadedRun:
    """Rebuild the run in ``run_dir`` from its ``config.yaml`` and load its EMA weights: from a training
    checkpoint (``checkpoint.pt``) or from shipped weights (``weights.pt``: model and guide state dicts
    that already are the EMA weights)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"run={run_dir}: not a run directory (no config.yaml)")
    cfg = load_run_config(run_dir / "config.yaml")
    if device is not None:
        cfg.trainer.device = device
    run = Run(cfg)
    if (run_dir / "weights.pt").is_file() and not (run_dir / "checkpoint.pt").is_file():
        weights = load_checkpoint(run_dir / "weights.pt", WEIGHTS)
        try:
            run.model.load_state_dict(weights["model"])
            run.guide.load_state_dict(weights["guide"])
        except (RuntimeError, KeyError, TypeError) as error:
            raise UserError(f"{run_dir / 'weights.pt'} does not match its config.yaml: {first_line(error)}") from None
    else:
        run.load(load_checkpoint(run_dir / "checkpoint.pt"), run_dir / "checkpoint.pt")
        run.ema.copy_to()
    run.model.eval()
    run.guide.eval()
    return LoadedRun(run_dir, cfg, run.task, run.model, run.guide, run.device)
