"""The training loop: AdamW with warm-up, gradient clipping, EMA, metrics, checkpoints, resume.

``train(cfg)`` builds the run (:class:`gram_pyro.run.Run`: task, model, guide, objective, optimizer;
the objective checked against the model and guide), then for each batch (:func:`train_batch`) calls
the objective ``updates_per_batch`` times with one optimizer step after each call (the truncated GRAM
surrogate: one step per supervision step, as TRM/GRAM train). Batch ``b`` of a run is a function of
``(trainer.seed, b)``, so a resumed run sees exactly the data an uninterrupted one would.

A run directory holds ``config.yaml`` (resolved), ``checkpoint.pt`` (the latest; with
``trainer.keep_checkpoints`` also a copy per checkpoint in ``checkpoints/batch_<n>.pt``), ``metrics.csv``
(one row per logged batch; ``seconds``: training time since batch 0, summed over resumed invocations up to the
checkpoint each went on from, so work redone after a crash counts once), ``eval.csv`` (prior-sampled
accuracy/coverage on held-out inputs, EMA weights, the networks' matmuls in the training step's dtype)
and TensorBoard events under ``tb/``. A resumed run
first drops the CSV rows logged after the checkpoint it goes on from (it logs them again), so a run
stopped anywhere ends as an uninterrupted one.

Scripts that train runs into directories of their own (the reproductions, the posterior comparison)
call :func:`train_or_keep`: a directory that holds the finished run of the same config is kept as it
is, one that stopped early (or whose config differs only in :data:`CONTINUABLE_KEYS`) is resumed from
its checkpoint, one without a checkpoint starts afresh, and one of another config is a one-line error.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from gram_pyro.checkpoint import load_checkpoint
from gram_pyro.config import UserError, first_line, load_run_config, save_config
from gram_pyro.distributed import (all_finite, average_gradients, barrier, launched, leave, mean_over_ranks,
                                   shard)
from gram_pyro.files import write_whole
from gram_pyro.inference import guided_trajectory, sample_trajectories
from gram_pyro.nn import autocast_to, network_precision, training_dtype
from gram_pyro.run import Run, check_run_dir, check_trainer, default_run_dir, prepare_run_dir
from gram_pyro.tasks.base import IGNORE, Batch, held_out_index


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
    """The training-time shortcut check on the inputs :func:`evaluate` scores: the task's
    ``shortcut_metric`` (accuracy but for digits) of answers decoded along one **guide** trajectory per
    input (``posterior_<metric>``, by ``task.score`` as the prior's answers are; ``split`` is a held-out
    split, which no task augments, so the answers are to its stored inputs), the KL of the guide from the
    prior over the whole trajectory per target token (``kl_per_token``, nats), the same per transition
    (``kl_per_token/{n}/{t}``: supervision step ``n``, transition ``t``) and, where the task counts its
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
    metric = task.shortcut_metric
    per_transition = (kl.double().mean(0) / tokens).tolist()  # [N_sup][T]
    scores = {f"posterior_{metric}": task.score(split, index, answers.cpu().unsqueeze(0))[metric],
              "kl_per_token": sum(map(sum, per_transition))}
    scores |= {f"kl_per_token/{n}/{t}": value
               for n, step in enumerate(per_transition) for t, value in enumerate(step)}
    nats = solution_nats(task, data, index)
    if nats is not None:
        scores["info_per_token"] = nats / tokens
    return scores


def shortcut_verdict(scores: dict, trainer: DictConfig, metric: str = "accuracy") -> str | None:
    """A one-line verdict when the posterior's ``metric`` (the task's ``shortcut_metric``) exceeds the
    prior's by more than ``trainer.shortcut_gap`` (``None`` otherwise)."""
    gap = scores[f"posterior_{metric}"] - scores[metric]
    if gap <= trainer.shortcut_gap:
        return None
    return (f"posterior shortcut: posterior {metric} {scores[f'posterior_{metric}']:.1%}, prior {metric} "
            f"{scores[metric]:.1%} (gap {gap:.1%} > trainer.shortcut_gap={trainer.shortcut_gap}); KL "
            f"{scores['kl_per_token']:.3f} nats per target token; see docs/shortcut.md")


def train_batch(run: Run, batch: Batch) -> dict:
    """All optimizer steps of ``run`` on one global batch (this rank's rows of it); returns each metric's
    mean over the batch's updates (tensors, this rank's)."""
    trainer = run.cfg.trainer
    batch, scale = shard(batch, run.world)
    state: dict = {}
    metrics: dict = {}
    updates = run.objective.updates_per_batch(run.model)
    for update in range(updates):
        with autocast_to(training_dtype(trainer.precision, run.device), run.device):
            loss, step_metrics = run.objective.loss(run.model, run.guide, batch, state, update)
        run.optimizer.zero_grad(set_to_none=True)
        finite = all_finite(loss, run.world)
        (loss * scale).backward()
        average_gradients(run.params, run.world)
        norm = torch.nn.utils.clip_grad_norm_(run.params, trainer.grad_clip)
        skip = ~finite
        if trainer.spike_factor is not None:
            spike = gradient_spike(run, update, norm, finite, trainer.spike_factor)
            skip = skip | spike
            step_metrics = {**step_metrics, "spikes": spike.float()}
        # a non-finite loss (on any rank) or a spike leaves parameters and optimizer state as they were,
        # without a host sync: the fused AdamW skips its update where ``found_inf`` is 1 (torch's
        # GradScaler contract)
        run.optimizer.found_inf = skip.float()
        run.optimizer.step()
        run.scheduler.step()
        run.ema.update()
        run.bad_steps += ~finite
        for key, value in step_metrics.items():
            metrics[key] = metrics.get(key, 0) + value.detach() / updates
    return metrics


SPIKE_MEAN_DECAY = 0.99
"""Decay of the running means of gradient norms that :func:`gradient_spike` compares against."""


def gradient_spike(run: Run, update: int, norm: torch.Tensor, finite: torch.Tensor, factor: float) -> torch.Tensor:
    """Whether a finite update is a spike: its gradient norm (before clipping, a 0-d device tensor) is above
    ``factor`` times ``m = run.grad_norm_mean[update]``, the running mean of the norms of this update of
    earlier batches (each update of a batch has its own: the truncated surrogate's steps differ in size),
    and the same update of the batch before was not a spike. A spike is a lone batch: of two in a row the
    second is taken, so a lasting rise is followed, never locked out. Every update taken moves the mean,
    ``m <- 0.99 m + 0.01 |g|`` (started at the first norm). Updates the mean and ``run.spiked`` in place on
    the device: no host sync."""
    mean = run.grad_norm_mean[update]
    known = mean.isfinite()
    # a non-finite loss is a bad step, not a spike
    spike = finite & known & (norm > factor * mean) & ~run.spiked[update]
    followed = torch.where(known, SPIKE_MEAN_DECAY * mean + (1 - SPIKE_MEAN_DECAY) * norm, norm)
    run.grad_norm_mean[update] = torch.where(finite & ~spike, followed, mean)
    run.spiked[update] = spike
    return spike


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


def _header(path: Path) -> list[str] | None:
    """The columns after ``batch`` of the header of the run's CSV file ``path`` (``None`` when it is
    missing or empty)."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with path.open(newline="") as handle:
        return next(csv.reader(handle))[1:]


def _last_batch(path: Path) -> int | None:
    """The batch of the last row of the run's CSV file ``path`` (``None`` when it has only a header)."""
    first = path.read_text().rstrip("\n").rpartition("\n")[2].partition(",")[0]
    return int(first) if first.isdigit() else None


class RunLog:
    """The files of a run directory that training appends to (rank 0 only): ``metrics.csv``,
    ``eval.csv``, TensorBoard events and the progress bar. A CSV file gets its header when it is
    missing or empty, whether the run is new or resumed; rows after batch ``done`` (the checkpoint the
    run goes on from) are dropped first (:func:`drop_rows_after`). A file keeps the columns of its header
    (a run resumed by a version that logs more writes those only, and leaves a column it no longer logs
    empty). ``last[name]``: the batch of the file's last row (``None`` before the first), so that a resumed
    run does not log a row twice."""

    def __init__(self, run_dir: Path, total: int, done: int, quiet: bool, position: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # slow import; only for real runs

        paths = {name: run_dir / f"{name}.csv" for name in ("metrics", "eval")}
        for path in paths.values():
            drop_rows_after(path, done)
        self.columns = {name: _header(path) for name, path in paths.items()}
        self.last = {name: None if self.columns[name] is None else _last_batch(path) for name, path in paths.items()}
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
                             position=position, disable=quiet or os.environ.get("GRAM_PYRO_QUIET") == "1")

    def row(self, name: str, batch: int, values: dict) -> None:
        """Append ``values`` at ``batch`` to ``<name>.csv`` (header on first use) and to TensorBoard."""
        out = csv.writer(self.files[name])
        if self.columns[name] is None:
            out.writerow(["batch", *values])
            self.columns[name] = list(values)
        out.writerow([batch, *(values.get(column, "") for column in self.columns[name])])
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
          overwrite: bool = False, position: int = 0, threads: Callable[[], int] | None = None) -> Path:
    """Train per ``cfg`` into ``run_dir`` (continuing its checkpoint when ``resume``, or starting again from
    batch 0 where the run stopped before its first checkpoint); returns the dir.
    A ``run_dir`` that already holds a run is an error unless ``overwrite``, which moves that run aside
    (:func:`prepare_run_dir`). ``position`` is the line of the progress bar (runs trained side by side
    each take their own); ``threads``, asked before every batch and every held-out evaluation, gives the
    torch threads it runs with (runs side by side hand a finished run's cores to the others; ``None``:
    ``trainer.threads`` throughout). Under ``torchrun`` every rank calls this; see :mod:`gram_pyro.distributed`."""
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
        log = RunLog(run_dir, trainer.max_batches, run.batches_done, quiet, position)
    split = run.task.splits["train"]
    start = time.time() - run.seconds

    def take_threads() -> None:
        if threads is None:
            return
        wanted = max(threads(), 1)
        if wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)

    def log_eval() -> None:
        # eager even where training compiles: evaluation's shapes are not training's, and compiling them
        # for one evaluation costs more than it saves; the networks' matmuls in the training step's dtype
        # (bf16 runs evaluate in bf16: 0.7 times the fp32 time of the demo's evaluation)
        take_threads()
        with run.ema.applied(), torch.compiler.set_stance("force_eager"), \
                network_precision([run.model, run.guide], training_dtype(trainer.precision, run.device)):
            scores = evaluate(run.task, run.model, "test", trainer.eval_inputs, trainer.eval_samples, run.device)
            if run.model.stochastic and trainer.shortcut_action != "off":
                scores |= shortcut_scores(run.task, run.model, run.guide, "test", trainer.eval_inputs, run.device)
        log.row("eval", run.batches_done, scores)
        log.progress.set_postfix({k: f"{v:.3f}" for k, v in scores.items() if "/" not in k})
        metric = run.task.shortcut_metric
        verdict = (f"posterior_{metric}" in scores and metric in scores
                   and run.batches_done >= trainer.shortcut_after and shortcut_verdict(scores, trainer, metric))
        if verdict and trainer.shortcut_action == "stop":
            run.save(checkpoint)
            raise UserError(f"stopped at batch {run.batches_done} (trainer.shortcut_action=stop): {verdict}")
        if verdict:
            log.progress.write(f"warning at batch {run.batches_done}: {verdict}")

    try:
        while run.batches_done < trainer.max_batches:
            take_threads()
            batch = batch_at(split, run.batches_done, trainer.batch_size, trainer.seed, run.device)
            metrics = train_batch(run, batch)
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


RUN_KEYS = ("task", "model", "guide", "objective", "trainer")
"""The sections of a train config that make the run (not where it is written or how it is started)."""
CONTINUABLE_KEYS = ("trainer.max_batches", "trainer.threads")
"""Keys in which a run directory may differ from the wanted config and still be continued (how long it
trains and how many CPU threads it is given). ``trainer.max_batches`` only under a constant learning rate:
a cosine schedule ends at ``max_batches``, so a run of another length follows another schedule."""


def _leaves(node, prefix: str = "") -> dict:
    """``{dotted key: value}`` of the leaves of a nested dict (an empty dict is a leaf)."""
    if not (isinstance(node, dict) and node):
        return {prefix: node}
    return {k: v for key, item in node.items() for k, v in _leaves(item, f"{prefix}.{key}" if prefix else key).items()}


def config_differences(saved: DictConfig, wanted: DictConfig, continuable: tuple[str, ...] = CONTINUABLE_KEYS
                       ) -> list[str]:
    """The dotted keys of the :data:`RUN_KEYS` sections (other than ``continuable``, by default
    :data:`CONTINUABLE_KEYS`; ``()``: every key) where two train configs differ."""
    a = _leaves({key: OmegaConf.to_container(saved[key], resolve=True) for key in RUN_KEYS})
    b = _leaves({key: OmegaConf.to_container(wanted[key], resolve=True) for key in RUN_KEYS})
    continuable = set(continuable)
    if "cosine" in (a.get("trainer.lr_schedule"), b.get("trainer.lr_schedule")):
        continuable.discard("trainer.max_batches")
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in continuable)


def batches_done(run_dir: Path, cfg: DictConfig) -> int | None:
    """Batches the run in ``run_dir`` has done, or ``None`` where it holds no checkpoint (nothing to keep).
    A run of another config, or of more batches than ``cfg`` asks for, is a one-line error."""
    if not (run_dir / "checkpoint.pt").is_file():
        return None
    changed = config_differences(load_run_config(run_dir / "config.yaml"), cfg)
    if changed:
        raise UserError(f"{run_dir} holds a run of another config (it differs in {', '.join(changed[:4])}); "
                        f"remove it or give another out=")
    done = load_checkpoint(run_dir / "checkpoint.pt")["batches_done"]
    if done > cfg.trainer.max_batches:
        raise UserError(f"{run_dir} holds a run of {done} batches, more than trainer.max_batches="
                        f"{cfg.trainer.max_batches}; remove it or give another out=")
    return done


def train_or_keep(name: str, cfg: DictConfig, run_dir: Path, quiet: bool = False, position: int = 0,
                  threads: Callable[[], int] | None = None) -> float:
    """Train ``cfg`` into ``run_dir``: keep a finished run, resume a stopped one, start afresh where the
    directory holds no checkpoint (the trainer moves what an earlier start left aside); ``position`` and
    ``threads`` as :func:`train`. Returns the run's training seconds since its batch 0
    (:func:`training_seconds`)."""
    done = batches_done(run_dir, cfg)
    if done == cfg.trainer.max_batches:
        if not quiet:
            print(f"{name}: {run_dir} holds the finished run ({done} batches); kept", flush=True)
    else:
        if not quiet:
            print(f"{name}: {'training' if done is None else f'resuming at batch {done}'} into {run_dir}",
                  flush=True)
        train(cfg, run_dir, resume=done is not None, overwrite=done is None, quiet=quiet, position=position,
              threads=threads)
    return training_seconds(run_dir)


def training_seconds(run_dir: Path) -> float:
    """A run's training seconds since batch 0, as its checkpoint keeps them; for a checkpoint older than
    that record, the ``seconds`` column of ``metrics.csv``'s last row (0 when there is none)."""
    seconds = load_checkpoint(run_dir / "checkpoint.pt").get("seconds")
    if seconds is None and (run_dir / "metrics.csv").is_file():
        with (run_dir / "metrics.csv").open() as f:
            rows = list(csv.DictReader(f))
        seconds = rows[-1].get("seconds") if rows else None
    return float(seconds or 0.0)
