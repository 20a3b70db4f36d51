"""Runs trained side by side on one machine, a finished run's cores handed to the others.

On a CPU with few cores, small runs each given their share of the cores finish sooner together than one
after the other (the demo's two runs: 305 s against 353 s on 2 cores, docs/performance.md). Each run
trains in a fresh (spawned) process; :func:`train_side_by_side` calls ``call(position=i,
threads=cores_for_me)`` there, where ``threads`` is what :func:`gram_pyro.training.train` asks before
every batch for the torch threads it runs with: the CPU's cores divided by the runs training now,
itself included, so that the last run takes every core once the others are done. ``jobs == 1`` calls
them one after the other in this process with ``threads=None`` (each run's ``trainer.threads``).

Workers come from :func:`worker_pool`, whose processes end as soon as the process that started them is
gone (killed, or stopped from the terminal), so that no orphaned run keeps training on the cores.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, TypeVar

Result = TypeVar("Result")

_training = None
"""In a worker of :func:`train_side_by_side`: the shared count of runs not finished (``None`` elsewhere)."""
_jobs = 1
"""In a worker of :func:`train_side_by_side`: how many runs train at once at most."""


def exit_with_parent(parent: int, initializer: Callable | None = None, initargs: tuple = ()) -> None:
    """Worker initializer: a daemon thread ends this process (exit status 1) within a second of its
    parent ``parent`` going away, then ``initializer(*initargs)`` where one is given."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def worker_pool(jobs: int, initializer: Callable | None = None, initargs: tuple = ()) -> ProcessPoolExecutor:
    """A pool of ``jobs`` fresh (spawned: CUDA cannot be used in a forked child) worker processes that
    end with this process (:func:`exit_with_parent`), each first running ``initializer(*initargs)``."""
    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=exit_with_parent, initargs=(os.getpid(), initializer, initargs))


def share_count(training, jobs: int) -> None:
    """Worker initializer: keep the shared count of runs not finished and the number of workers, and
    compile CPU kernels that take the thread count of the moment rather than the one they were compiled
    under (inductor's ``cpp.dynamic_threads``), so that a run goes on with the cores another one hands over."""
    import torch._inductor.config

    global _training, _jobs
    _training, _jobs = training, jobs
    torch._inductor.config.cpp.dynamic_threads = True


def cores_per_run(jobs: int) -> int:
    """Each of ``jobs`` runs' share of the CPU's cores at the start (at least one)."""
    return max((os.cpu_count() or 1) // max(jobs, 1), 1)


def cores_for_me() -> int:
    """This run's share of the CPU's cores among the runs training now (itself included): the runs not
    finished, at most one per worker."""
    return cores_per_run(min(_training.value, _jobs))


def run_and_hand_over(call: Callable[..., Result], position: int) -> Result:
    """``call(position=position, threads=...)`` in a worker; when it returns or fails, the run no longer
    counts among those training, so the others take its cores."""
    try:
        return call(position=position, threads=None if _training is None else cores_for_me)
    finally:
        if _training is not None:
            with _training.get_lock():
                _training.value -= 1


def train_side_by_side(calls: dict[str, Callable[..., Result]], jobs: int, hand_over: bool = True
                       ) -> dict[str, Result]:
    """``{name: call(position=i, threads=...)}``: ``jobs`` calls at a time in fresh (spawned) processes
    (each call and its result must pickle), a finished call's cores handed to the others where
    ``hand_over`` (else ``threads=None``); with ``jobs == 1`` one after the other in this process."""
    if jobs == 1:
        return {name: call(position=0, threads=None) for name, call in calls.items()}
    sharing = ({"initializer": share_count,
                "initargs": (multiprocessing.get_context("spawn").Value("i", len(calls)), jobs)} if hand_over
               else {})
    with worker_pool(jobs, **sharing) as pool:
        futures = {name: pool.submit(run_and_hand_over, call, i) for i, (name, call) in enumerate(calls.items())}
        return {name: future.result() for name, future in futures.items()}
