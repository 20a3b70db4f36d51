"""The training loop: AdamW with warm-up, gradient clipping, EMA, metrics, checkpoints, resume.

``train(cfg)`` builds task, model, guide and objective from a composed config, checks that the objective
fits the model and guide (:class:`gram_pyro.objectives.Objective` ``check``), then for each batch calls
the objective ``updates_per_batch`` times with one optimizer step after each call (the truncated GRAM
surrogate: one step per supervision step, as TRM/GRAM train). Batch ``b`` of a run is a function of
``(trainer.seed, b)``, so a resumed run sees exactly the data an uninterrupted one would.

A run directory holds ``config.yaml`` (resolved), ``checkpoint.pt`` (the latest; with
``trainer.keep_checkpoints`` also a copy per checkpoint in ``checkpoints/batch_<n>.pt``), ``metrics.csv`` (one row per
logged batch; ``seconds``: training time since batch 0, summed over resumed invocations up to the
checkpoint each went on from, so work redone after a crash counts once), ``eval.csv`` (prior-sampled
accuracy/coverage on held-out inputs, EMA weights) and TensorBoard events under ``tb/``. A resumed run first drops the CSV rows logged after the checkpoint it
goes on from (it logs them again), so a run stopped anywhere ends as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import time
from pathlib import Path

import pyro
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from gram_pyro.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from gram_pyro.config import SEED_RANGE, UserError, build, check_targets, first_line, make_dir, save_config
from gram_pyro.distributed import (World, all_finite, average_gradients, barrier, join, launched, leave,
                                   mean_over_ranks, shard)
from gram_pyro.files import write_whole
from gram_pyro.tasks.base import IGNORE, Batch, held_out_index, is_int
from gram_pyro.inference import PRECISIONS, guided_trajectory, native_bf16, sample_trajectories
from gram_pyro.nn import COMPILE_MODES, autocast_to, compile_networks
from gram_pyro.objectives import Objective

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
    "warmup_steps": (0, None), "grad_clip": (0, None), "ema_decay": (0, 1), "log_every": (1, None),
    "eval_every": (0, None), "eval_inputs": (1, None), "eval_samples": (1, None),
    "checkpoint_every": (1, None), "max_bad_steps": (0, None), "threads": (1, None),
    "shortcut_gap": (0, 1), "shortcut_after": (0, None), "seed": SEED_RANGE,
}
"""Inclusive ``(lowest, highest)`` of the numeric trainer keys (``None``: unbounded; ``threads`` may be null).
A learning rate above 1 moves every weight by more than 1 per AdamW step: never a useful setting."""

TRAINER_INTEGERS = ("seed", "batch_size", "max_batches", "warmup_steps", "log_every", "eval_every", "eval_inputs",
                    "eval_samples", "checkpoint_every", "max_bad_steps", "threads", "shortcut_after")
"""The trainer keys that count or size something: ``batch_size=2.5`` is refused, not rounded."""
TRAINER_FLAGS = ("keep_checkpoints", "validate_pyro")
"""The trainer keys that are ``true`` or ``false``."""

SHORTCUT_ACTIONS = ("warn", "stop", "off")
"""Allowed ``trainer.shortcut_action`` values: what a detected posterior shortcut does to a run."""


def check_trainer(trainer: DictConfig) -> None:
    """One-line :class:`UserError` for a trainer value out of :data:`TRAINER_LIMITS`, not finite or not a
    number, a fraction where :data:`TRAINER_INTEGERS` want a whole number, or a flag that is not a bool."""
    for key, (low, high) in TRAINER_LIMITS.items():
        value = trainer[key]
        if key == "threads" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"trainer.{key}={value!r} is not a number")
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"trainer.{key}={value} is not a finite number; allowed: {allowed}")
        if value < low or (high is not None and value > high):
            raise UserError(f"trainer.{key}={value} is out of range; allowed: {allowed}")
    for key in TRAINER_INTEGERS:
        if not (is_int(trainer[key]) or (key == "threads" and trainer[key] is None)):
            raise UserError(f"trainer.{key}={trainer[key]!r} is not an integer")
    for key in TRAINER_FLAGS:
        if not isinstance(trainer[key], bool):
            raise UserError(f"trainer.{key}={trainer[key]!r}; allowed: true, false")
    if trainer.compile not in COMPILE_MODES:
        raise UserError(f"unknown trainer.compile {trainer.compile!r}; allowed: {', '.join(COMPILE_MODES)}")
    if trainer.precision not in PRECISIONS:
        raise UserError(f"unknown trainer.precision {trainer.precision!r}; allowed: {', '.join(PRECISIONS)}")
    if trainer.shortcut_action not in SHORTCUT_ACTIONS:
        raise UserError(f"unknown trainer.shortcut_action {trainer.shortcut_action!r}; "
                        f"allowed: {', '.join(SHORTCUT_ACTIONS)}")
    betas = list(trainer.betas) if OmegaConf.is_list(trainer.betas) else trainer.betas
    if not (isinstance(betas, list) and len(betas) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise UserError(f"trainer.betas={betas} must be two numbers in [0, 1)")


def training_dtype(trainer: DictConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a training step for ``trainer.precision`` (``None``: no autocast). ``fp32``
    none; ``bf16`` bf16 where the device runs bf16 matmuls natively
    (:func:`gram_pyro.inference.native_bf16`: a CUDA GPU, or a CPU with AVX512-BF16 or AMX; elsewhere
    bf16 would be slower than fp32, so none); ``auto`` that on CUDA and none on CPU (CPU runs stay fp32
    unless asked)."""
    wanted = trainer.precision == "bf16" or (trainer.precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if wanted and native_bf16(device) else None


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
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)
        try:
            yield
        finally:
            for p, s in zip(self.params, saved):
                p.copy_(s)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        for s, value in zip(self.shadow, state["shadow"]):
            s.copy_(value)
        self.updates = state["updates"]


def batch_at(split, index: int, batch_size: int, seed: int, device: torch.device) -> Batch:
    """Batch ``index`` of the run: epoch-wise permutations of the split, each seeded by (seed, epoch)."""
    per_epoch = max(len(split) // batch_size, 1)
    epoch, position = divmod(index, per_epoch)
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    rows = order[position * batch_size:(position + 1) * batch_size]
    return split.batch(rows, torch.Generator().manual_seed(seed * 1_000_003 + index)).to(device)


def evaluate(task, model, split: str, num_inputs: int, num_samples: int, device: torch.device,
             seed: int = 0) -> dict:
    """The task's scores (accuracy, coverage, ...) of answers decoded along ``num_samples`` **prior** trajectories for
    ``num_inputs`` inputs of ``split`` drawn at random (seeded; splits are stored sorted, so a prefix
    would be a biased sample). The only evidence that counts (docs/shortcut.md). Draws from its own keyed
    streams (:mod:`gram_pyro.inference`), so evaluating neither changes a training run's random stream
    nor varies by when it happens."""
    data = task.splits[split]
    index = held_out_index(len(data), num_inputs, seed)
    was_training = model.training
    model.eval()
    try:
        puzzle = None if data.puzzles is None else data.puzzles[index].to(device)
        answers = sample_trajectories(model, data.inputs[index].to(device), num_samples, puzzle=puzzle,
                                      seed=seed).answers.cpu()
    finally:
        model.train(was_training)
    return task.score(split, index, answers)


def solution_nats(task, split, index: torch.Tensor) -> float | None:
    """The information a choice among an input's valid answers needs, ``log(number of solutions)`` nats,
    averaged over the inputs ``index`` of ``split`` (``None`` where the task does not count them)."""
    if getattr(task, "num_all_grids", None):  # unconditional 4x4 Sudoku: every grid answers every input
        return math.log(task.num_all_grids)
    counts = None if task.unconditional else split.num_solutions
    return None if counts is None else counts[index].double().log().mean().item()


def shortcut_scores(task, model, guide, split: str, num_inputs: int, device: torch.device, seed: int = 0) -> dict:
    """The training-time shortcut check on the inputs :func:`evaluate` scores: accuracy of answers decoded
    along one **guide** trajectory per input (``posterior_accuracy``), the KL of the guide from the prior
    over the whole trajectory per target token (``kl_per_token``, nats) and, where the task counts its
    solutions, ``info_per_token``: what choosing a solution needs (log of the number of solutions per
    target token). A posterior far more accurate than the prior, or a KL far above the information, is
    the shortcut: the target reaches the answer through eps. Seeded by ``seed``; it leaves the global
    random streams as they were."""
    data = task.splits[split]
    index = held_out_index(len(data), num_inputs, seed)
    batch = data.batch(index, torch.Generator().manual_seed(seed)).to(device)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:  # the guide's draws come from a stream of their own: training's random stream is left as it was
        with torch.random.fork_rng(devices=devices, device_type=device.type):
            torch.manual_seed(seed)
            answers, kl = guided_trajectory(model, guide, batch.x, batch.y, batch.puzzle)
    finally:
        model.train(was_training)
    tokens = (batch.y != IGNORE).sum(-1).double().mean().item()
    scores = {"posterior_accuracy": task.judge(batch.x, answers, batch.y).float().mean().item(),
              "kl_per_token": kl.double().mean().item() / tokens}
    nats = solution_nats(task, data, index)
    if nats is not None:
        scores["info_per_token"] = nats / tokens
    return scores


def shortcut_verdict(scores: dict, trainer: DictConfig) -> str | None:
    """A one-line verdict when the posterior accuracy exceeds the prior's by more than
    ``trainer.shortcut_gap`` (``None`` otherwise)."""
    gap = scores["posterior_accuracy"] - scores["accuracy"]
    if gap <= trainer.shortcut_gap:
        return None
    return (f"posterior shortcut: posterior accuracy {scores['posterior_accuracy']:.1%}, prior accuracy "
            f"{scores['accuracy']:.1%} (gap {gap:.1%} > trainer.shortcut_gap={trainer.shortcut_gap}); KL "
            f"{scores['kl_per_token']:.3f} nats per target token; see docs/shortcut.md")


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
        compile_networks([self.model, self.guide], trainer.compile, self.device)
        self.params = [p for m in (self.model, self.guide) for p in m.parameters()]
        # fused (CPU and CUDA): it reads ``found_inf`` and skips a whole update on device (train_batch)
        self.optimizer = torch.optim.AdamW(self.params, lr=trainer.lr, weight_decay=trainer.weight_decay,
                                           betas=tuple(trainer.betas), fused=True)
        warmup = max(trainer.warmup_steps, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.ema = EMA([self.model, self.guide], trainer.ema_decay)
        self.batches_done = 0
        self.saved_at: int | None = None  # batches_done of the last checkpoint written or loaded
        self.seconds = 0.0  # training time up to batches_done (set from the clock by the loop)
        self.bad_steps = torch.zeros((), dtype=torch.long, device=self.device)
        if world.rank:  # identical initial weights on every rank, then a random stream of its own
            torch.manual_seed(trainer.seed + world.rank)

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "guide": self.guide.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict(), "rng": rng_state(), "objective": self.objective.state_dict(),
                "batches_done": self.batches_done, "bad_steps": int(self.bad_steps), "seconds": self.seconds}

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

    def train_batch(self, batch: Batch) -> dict:
        """All optimizer steps of one global batch (this rank's rows of it); returns each metric's mean
        over the batch's updates (tensors, this rank's)."""
        trainer = self.cfg.trainer
        batch, scale = shard(batch, self.world)
        state: dict = {}
        metrics: dict = {}
        updates = self.objective.updates_per_batch(self.model)
        for update in range(updates):
            with autocast_to(training_dtype(trainer, self.device), self.device):
                loss, step_metrics = self.objective.loss(self.model, self.guide, batch, state, update)
            self.optimizer.zero_grad(set_to_none=True)
            finite = all_finite(loss, self.world)
            (loss * scale).backward()
            average_gradients(self.params, self.world)
            torch.nn.utils.clip_grad_norm_(self.params, trainer.grad_clip)
            # a non-finite loss (on any rank) leaves parameters and optimizer state as they were, without a
            # host sync: the fused AdamW skips its update where ``found_inf`` is 1 (torch's GradScaler contract)
            self.optimizer.found_inf = (~finite).float()
            self.optimizer.step()
            self.scheduler.step()
            self.ema.update()
            self.bad_steps += ~finite
            for key, value in step_metrics.items():
                metrics[key] = metrics.get(key, 0) + value.detach() / updates
        return metrics


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


def drop_rows_after(path: Path, done: int) -> None:
    """Drop the rows of the run's CSV file ``path`` logged after batch ``done``, and a last line cut
    short: a run stopped between logging them and its next checkpoint logs them again when resumed
    from that checkpoint, so the file ends up as an uninterrupted run's."""
    if not path.is_file():
        return
    try:
        lines = path.read_text().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read it as text ({getattr(error, 'strerror', None) or first_line(error)})"
                        ) from None
    kept = [line for line in lines if line.endswith("\n") and not _batch_after(line, done)]
    if kept != lines:
        write_whole(path, lambda temporary: temporary.write_text("".join(kept)))


def _batch_after(line: str, done: int) -> bool:
    """Whether the CSV row ``line`` is a row of a batch after ``done`` (not the header)."""
    first = line.partition(",")[0]
    return first.isdigit() and int(first) > done


def _last_batch(path: Path) -> int | None:
    """The batch of the last row of the run's CSV file ``path`` (``None`` when it has only a header)."""
    first = path.read_text().rstrip("\n").rpartition("\n")[2].partition(",")[0]
    return int(first) if first.isdigit() else None


class RunLog:
    """The files of a run directory that training appends to (rank 0 only): ``metrics.csv``,
    ``eval.csv``, TensorBoard events and the progress bar. A CSV file gets its header when it is
    missing or empty, whether the run is new or resumed; rows after batch ``done`` (the checkpoint the
    run goes on from) are dropped first (:func:`drop_rows_after`). ``last[name]``: the batch of the
    file's last row (``None`` before the first), so that a resumed run does not log a row twice."""

    def __init__(self, run_dir: Path, total: int, done: int, quiet: bool):
        from torch.utils.tensorboard import SummaryWriter  # slow import; only for real runs

        paths = {name: run_dir / f"{name}.csv" for name in ("metrics", "eval")}
        for path in paths.values():
            drop_rows_after(path, done)
        self.headers = {name: path.is_file() and path.stat().st_size > 0 for name, path in paths.items()}
        self.last = {name: _last_batch(path) if self.headers[name] else None for name, path in paths.items()}
        self.files = {}
        for name, path in paths.items():
            try:
                self.files[name] = path.open("a", newline="")
            except OSError as error:
                for handle in self.files.values():
                    handle.close()
                raise UserError(f"{path}: cannot append to it ({error.strerror or first_line(error)})") from None
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=done)
        self.progress = tqdm(total=total, initial=done, desc=f"train {run_dir.name}", dynamic_ncols=True,
                             disable=quiet or os.environ.get("GRAM_PYRO_QUIET") == "1")

    def row(self, name: str, batch: int, values: dict) -> None:
        """Append ``values`` at ``batch`` to ``<name>.csv`` (header on first use) and to TensorBoard."""
        out = csv.writer(self.files[name])
        if not self.headers[name]:
            out.writerow(["batch", *values])
            self.headers[name] = True
        out.writerow([batch, *values.values()])
        self.files[name].flush()
        self.last[name] = batch
        for key, value in values.items():
            if key not in ("seconds", "lr"):
                self.writer.add_scalar(f"{'train' if name == 'metrics' else name}/{key}", value, batch)

    def close(self) -> None:
        self.progress.close()
        self.writer.close()
        for handle in self.files.values():
            handle.close()


def train(cfg: DictConfig, run_dir: Path | None = None, resume: bool = False, quiet: bool = False,
          overwrite: bool = False) -> Path:
    """Train per ``cfg`` into ``run_dir`` (continuing its checkpoint when ``resume``, or starting again from
    batch 0 where the run stopped before its first checkpoint); returns the dir.
    A ``run_dir`` that already holds a run is an error unless ``overwrite``, which moves that run aside
    (:func:`prepare_run_dir`). Under ``torchrun`` every rank calls this; see :mod:`gram_pyro.distributed`."""
    trainer = cfg.trainer
    check_trainer(trainer)  # before its values are used (threads, validate_pyro)
    world = launched()
    pyro.enable_validation(bool(trainer.validate_pyro))
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(trainer.threads or max((os.cpu_count() or 1) // local_ranks, 1))
    run_dir = Path(run_dir or default_run_dir(cfg))
    if not resume:
        check_run_dir(run_dir, overwrite)
    run = Run(cfg, world, run_dir)
    checkpoint = run_dir / "checkpoint.pt"
    if resume and checkpoint.exists():
        run.load(load_checkpoint(checkpoint), checkpoint)
    elif resume:
        if world.is_main:
            print(f"{run_dir} holds no checkpoint (the run stopped before its first): starting it from batch 0",
                  flush=True)
    elif world.is_main:
        prepare_run_dir(run_dir)
    log = None
    if world.is_main:
        save_config(cfg, run_dir / "config.yaml")
        log = RunLog(run_dir, trainer.max_batches, run.batches_done, quiet)
    split = run.task.splits["train"]
    start = time.time() - run.seconds

    def log_eval() -> None:
        # eager even where training compiles: evaluation's shapes are not training's, and compiling them
        # for one evaluation costs more than it saves
        with run.ema.applied(), torch.compiler.set_stance("force_eager"):
            scores = evaluate(run.task, run.model, "test", trainer.eval_inputs, trainer.eval_samples, run.device)
            if run.model.stochastic and trainer.shortcut_action != "off":
                scores |= shortcut_scores(run.task, run.model, run.guide, "test", trainer.eval_inputs, run.device)
        log.row("eval", run.batches_done, scores)
        log.progress.set_postfix({k: f"{v:.3f}" for k, v in scores.items()})
        verdict = ("posterior_accuracy" in scores and "accuracy" in scores
                   and run.batches_done >= trainer.shortcut_after and shortcut_verdict(scores, trainer))
        if verdict and trainer.shortcut_action == "stop":
            run.save(checkpoint)
            raise UserError(f"stopped at batch {run.batches_done} (trainer.shortcut_action=stop): {verdict}")
        if verdict:
            log.progress.write(f"warning at batch {run.batches_done}: {verdict}")

    try:
        while run.batches_done < trainer.max_batches:
            batch = batch_at(split, run.batches_done, trainer.batch_size, trainer.seed, run.device)
            metrics = run.train_batch(batch)
            run.batches_done += 1
            run.seconds = time.time() - start
            if run.batches_done % trainer.log_every == 0 or run.batches_done == trainer.max_batches:
                run.check_bad_steps()
                values = {k: v.item() for k, v in mean_over_ranks(metrics, world).items()}
                if log:
                    log.row("metrics", run.batches_done, {"seconds": round(run.seconds, 2),
                                                          "lr": run.scheduler.get_last_lr()[0], **values})
                    log.progress.set_postfix({k: f"{values[k]:.3f}" for k in ("loss", "kl", "acc") if k in values})
            if log:
                log.progress.update(1)
                if trainer.eval_every and run.batches_done % trainer.eval_every == 0:
                    log_eval()
                if run.batches_done % trainer.checkpoint_every == 0:
                    run.check_bad_steps()
                    kept = run_dir / "checkpoints" / f"batch_{run.batches_done:06d}.pt"
                    run.seconds = time.time() - start  # with the evaluation just logged
                    run.save(checkpoint, *([kept] if trainer.keep_checkpoints else []))
        if log:
            if log.last["eval"] != run.batches_done:  # not evaluated at the last batch yet (even if resumed)
                log_eval()
            run.seconds = time.time() - start
            run.save(checkpoint)
            log.close()
            log = None
        barrier(world)  # every rank leaves the process group together, after rank 0's files are closed
    finally:
        if log:
            log.close()
        leave(world)
    return run_dir
