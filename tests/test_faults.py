"""The fault suite: bad config values, data files, checkpoints, run directories and numerical faults,
each through the command line (in process), each ending with exit code 2, exactly one line on stderr
and no file changed outside the run's own directory; then training interrupted at random points and
resumed, which must end exactly where an uninterrupted run ends."""

from __future__ import annotations

import csv
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gram_pyro import checkpoint, files, training
from gram_pyro.checkpoint import FORMAT, load_checkpoint
from gram_pyro.cli import main
from gram_pyro.config import SEED_RANGE
from gram_pyro.tasks.base import data_lines
from gram_pyro.tasks.sudoku import read_puzzles
from gram_pyro.run import Run
from gram_pyro.training import RunLog, train
from tests.helpers import TINY, tiny_config

TRAIN = [*TINY, "trainer.threads=1", "trainer.max_batches=2"]
BOARD = '{"n": 6, "queens": [[0, 1]]}\n'


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run, copied into each test's place."""
    return train(tiny_config("trainer.max_batches=1", "trainer.threads=1"), tmp_path_factory.mktemp("trained") / "run",
                 quiet=True)


class Place:
    """A test's folder: ``run`` (a copy of the trained run), ``new`` (where a train command would put a
    new run), ``cwd`` (the working directory) and the data files the cases write."""

    def __init__(self, root: Path, trained: Path):
        self.root, self.run, self.new, self.cwd = root, root / "run", root / "new", root / "cwd"
        shutil.copytree(trained, self.run)
        self.cwd.mkdir()
        self.write("good.jsonl", BOARD)
        self.write("victim.txt", "precious\n")

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return path

    def solve(self, name: str, content: str | bytes, *more: str) -> list[str]:
        """``gram-pyro solve`` of a data file ``name`` holding ``content``."""
        return ["solve", f"run={self.run}", f"input={self.write(name, content)}", "samples=2", *more]

    def eval(self, *more: str) -> list[str]:
        return ["eval", f"run={self.run}", "samples=2", "inputs=2", *more]

    def train(self, *more: str) -> list[str]:
        return ["train", *TRAIN, f"run_dir={self.new}", *more]

    def checkpoint(self, payload=None, raw: bytes | None = None) -> Path:
        """Replace the run's checkpoint by ``raw`` bytes or by ``payload`` saved with torch."""
        path = self.run / "checkpoint.pt"
        if raw is not None:
            path.write_bytes(raw)
        else:
            torch.save(payload, path)
        return path

    def checkpoint_bytes(self) -> bytes:
        return (self.run / "checkpoint.pt").read_bytes()

    def payload(self) -> dict:
        return torch.load(self.run / "checkpoint.pt", weights_only=True)

    def config(self, change) -> None:
        """Rewrite the run's config.yaml through ``change(cfg dict)``."""
        cfg = yaml.safe_load((self.run / "config.yaml").read_text())
        change(cfg)
        (self.run / "config.yaml").write_text(yaml.safe_dump(cfg))


class Pickled:
    """An object a checkpoint must not unpickle."""


def last(*values):
    """The last of ``values``: a case's setup steps, then its command line."""
    return values[-1]


def nan_weights(p: Place) -> dict:
    payload = p.payload()
    next(iter(payload["model"].values())).view(-1)[0] = float("nan")
    return payload


def lacking(p: Place, key: str) -> dict:
    payload = p.payload()
    del payload[key]
    return payload


def short_ema(p: Place) -> dict:
    payload = p.payload()
    payload["ema"]["shadow"] = payload["ema"]["shadow"][:1]
    return payload


def inf_learning_rate(p: Place, monkeypatch) -> list[str]:
    for where in ("gram_pyro.training", "gram_pyro.run"):  # past the up-front checks
        monkeypatch.setattr(f"{where}.check_trainer", lambda trainer: None)
    return p.train("trainer.lr=inf")


def nan_after_first_checkpoint(p: Place, monkeypatch) -> list[str]:
    real = training.train_batch

    def poisoned(run, batch):
        metrics = real(run, batch)
        if run.batches_done == 1:
            with torch.no_grad():
                run.params[0].view(-1)[0] = float("nan")
        return metrics

    monkeypatch.setattr(training, "train_batch", poisoned)
    return p.train("trainer.checkpoint_every=1", "trainer.max_batches=3")


def nan_losses(p: Place, monkeypatch) -> list[str]:
    from gram_pyro.objectives import TruncatedSurrogate

    real = TruncatedSurrogate.loss

    def poisoned(self, *args):
        loss, metrics = real(self, *args)
        return loss * float("nan"), metrics

    monkeypatch.setattr(TruncatedSurrogate, "loss", poisoned)
    return p.train("trainer.max_bad_steps=0")


CASES = {
    # config values
    "batch_size_fraction": (lambda p, m: p.train("trainer.batch_size=2.5"), "trainer.batch_size=2.5 is not an integer"),
    "seed_text": (lambda p, m: p.train("trainer.seed=abc"), "trainer.seed='abc' is not a number"),
    "seed_negative": (lambda p, m: p.train("trainer.seed=-1"), f"allowed: in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]"),
    "lr_nan": (lambda p, m: p.train("trainer.lr=nan"), "trainer.lr=nan is not a finite number"),
    "lr_inf": (lambda p, m: p.train("trainer.lr=inf"), "trainer.lr=inf is not a finite number"),
    "lr_huge": (lambda p, m: p.train("trainer.lr=1e6"), "trainer.lr=1000000.0 is out of range"),
    "weight_decay_nan": (lambda p, m: p.train("trainer.weight_decay=nan"), "trainer.weight_decay=nan"),
    "grad_clip_minus_inf": (lambda p, m: p.train("trainer.grad_clip=-inf"), "trainer.grad_clip=-inf"),
    "ema_decay_above_one": (lambda p, m: p.train("trainer.ema_decay=2"), "trainer.ema_decay=2 is out of range"),
    "checkpoint_every_fraction": (lambda p, m: p.train("trainer.checkpoint_every=1.5"), "is not an integer"),
    "threads_text": (lambda p, m: p.train("trainer.threads=abc"), "trainer.threads='abc' is not a number"),
    "flag_maybe": (lambda p, m: p.train("trainer.keep_checkpoints=maybe"),
                   "trainer.keep_checkpoints='maybe'; allowed: true, false"),
    "validate_maybe": (lambda p, m: p.train("trainer.validate_pyro=maybe"), "allowed: true, false"),
    "betas_one": (lambda p, m: p.train("trainer.betas=[0.9]"), "trainer.betas=[0.9] must be two numbers"),
    "device_tpu": (lambda p, m: p.train("trainer.device=tpu"), "unknown trainer.device 'tpu'"),
    "shortcut_action": (lambda p, m: p.train("trainer.shortcut_action=foo"), "unknown trainer.shortcut_action"),
    "compile_true": (lambda p, m: p.train("trainer.compile=true"),
                     "unknown trainer.compile True; allowed: none, default, max"),
    "precision_fp16": (lambda p, m: p.train("trainer.precision=fp16"),
                       "unknown trainer.precision 'fp16'; allowed: auto, fp32, bf16"),
    "dim_zero": (lambda p, m: p.train("model.dim=0"), "bad model config: dim must be an integer >= 1, got 0"),
    "dim_fraction": (lambda p, m: p.train("model.dim=16.5"), "dim must be an integer >= 1, got 16.5"),
    "odd_head_dim": (lambda p, m: p.train("model.mixer=attention", "model.dim=20", "model.num_heads=4"),
                     "attention needs dim / num_heads to be an even integer"),
    "no_heads": (lambda p, m: p.train("model.mixer=attention", "model.num_heads=0"), "num_heads must be an integer"),
    "no_layers": (lambda p, m: p.train("model.num_layers=0"), "num_layers must be an integer >= 1"),
    "negative_prefix": (lambda p, m: p.train("model.num_prefix=-1"), "num_prefix must be an integer >= 0"),
    "init_scale_nan": (lambda p, m: p.train("model.init_scale=nan"), "init_scale must be a positive finite number"),
    "noise_loud": (lambda p, m: p.train("model.noise=loud"), "bad model config: unknown noise 'loud'"),
    "guide_hidden_zero": (lambda p, m: p.train("guide.hidden=0"),
                          "bad guide config: hidden must be a whole number >= 1 or null (2 * model.dim), got 0"),
    "flow_hidden_half": (lambda p, m: p.train("guide=flow", "guide.hidden=2.5"), "hidden must be a whole number"),
    "board_size_text": (lambda p, m: p.train("task.n=abc"), "n must be an integer in 4..12, got 'abc'"),
    "board_size_fraction": (lambda p, m: p.train("task.n=6.0"), "n must be an integer in 4..12, got 6.0"),
    "removal_fraction": (lambda p, m: p.train("task.removals=[0.5]"), "removals must be a non-empty set of integers"),
    "unknown_task": (lambda p, m: p.train("task=chess"), "unknown task 'chess'"),
    "unknown_key": (lambda p, m: p.train("trainer.learning_rate=1"), "unknown config key 'trainer.learning_rate'"),
    "overwrite_maybe": (lambda p, m: p.train("overwrite=maybe"), "overwrite='maybe'; allowed: true, false"),
    "resume_unknown_key": (lambda p, m: ["train", f"resume={p.run}", "trainer.foo=1"], "unknown config key"),
    "resume_other_size": (lambda p, m: ["train", f"resume={p.run}", "model.dim=32"],
                          "does not match the configured model/guide"),
    "inputs_zero": (lambda p, m: p.eval("inputs=0"), "inputs=0; allowed: an integer >= 1"),
    "inputs_text": (lambda p, m: p.eval("inputs=abc"), "inputs='abc'; allowed: an integer >= 1"),
    "samples_text": (lambda p, m: p.eval("samples=abc"), "samples='abc'; allowed: an integer >= 1"),
    "samples_fraction": (lambda p, m: p.eval("samples=2.5"), "samples=2.5; allowed: an integer >= 1"),
    "samples_beyond_memory": (lambda p, m: p.eval("samples=100000000000"), "GiB for their answers alone"),
    "depth_zero": (lambda p, m: p.eval("depth=0"), "depth=0; allowed: an integer >= 1 or null"),
    "sampling_seed_overflow": (lambda p, m: p.eval("seed=1e400"), "seed=inf; allowed: an integer"),
    "budget_negative": (lambda p, m: p.eval("memory_budget_mb=-1"), "memory_budget_mb=-1; allowed: a finite number"),
    "sampling_precision": (lambda p, m: p.eval("precision=fp16"), "unknown precision='fp16'; allowed: auto, fp32, bf16"),
    "sampling_compile": (lambda p, m: p.eval("compile=fast"), "unknown compile='fast'; allowed: none, default, max"),
    "halting_maybe": (lambda p, m: p.eval("halting=maybe"), "halting='maybe'; allowed: true, false"),
    "select_unknown": (lambda p, m: p.eval("select=best"), "unknown selector select='best'"),
    "split_unknown": (lambda p, m: p.eval("split=dev"), "unknown split 'dev'"),
    "sigma_text": (lambda p, m: p.eval("perturbation.kind=ptrm", "perturbation.sigma=abc"),
                   "perturbation sigma must be a positive finite number, got 'abc'"),
    "temperature_inf": (lambda p, m: p.eval("perturbation.kind=decoder", "perturbation.temperature=inf"),
                        "perturbation temperature must be a positive finite number"),
    "sample_count_text": (lambda p, m: ["sample", f"run={p.run}", "samples=abc"], "samples='abc'; allowed: an integer >= 1"),
    "diagnose_samples": (lambda p, m: ["diagnose", f"run={p.run}", "samples=abc"], "samples='abc'"),
    "diagnose_old_key": (lambda p, m: ["diagnose", f"run={p.run}", "trajectories=8"],
                         "trajectories= is now called samples=: use samples=8"),
    "diagnose_threshold": (lambda p, m: ["diagnose", f"run={p.run}", "shortcut_threshold=2"],
                           "shortcut_threshold=2; allowed: a finite number in [0, 1]"),
    # data files
    "queen_fraction": (lambda p, m: p.solve("a.jsonl", '{"n": 6, "queens": [[0.7, 0]]}\n'),
                       "a.jsonl:1: queen [0.7, 0]: row and column must be integers in 0..5"),
    "queen_overflow": (lambda p, m: p.solve("a.jsonl", '{"n": 6, "queens": [[1e400, 0]]}\n'),
                       "a.jsonl:1: queen [Infinity, 0]: row and column must be integers"),
    "queen_bool": (lambda p, m: p.solve("a.jsonl", '{"n": 6, "queens": [[true, 0]]}\n'), "must be integers"),
    "size_fraction": (lambda p, m: p.solve("a.jsonl", '{"n": 6.0, "queens": []}\n'),
                      "a.jsonl:1: n=6.0 is not an integer"),
    "queen_off_board": (lambda p, m: p.solve("a.jsonl", BOARD + '{"n": 6, "queens": [[6, 0]]}\n'),
                        "a.jsonl:2: queen (6, 0) is off the 6x6 board"),
    "queens_attack": (lambda p, m: p.solve("a.jsonl", '{"n": 6, "queens": [[0, 0], [1, 1]]}\n'),
                      "two queens attack each other"),
    "wrong_board_size": (lambda p, m: p.solve("a.jsonl", '{"n": 8, "queens": []}\n'), "board size n=8, but the task"),
    "not_json": (lambda p, m: p.solve("a.jsonl", "queens everywhere\n"), "a.jsonl:1: invalid JSON"),
    "empty_file": (lambda p, m: p.solve("a.jsonl", ""), "holds no puzzles"),
    "only_comments": (lambda p, m: p.solve("a.jsonl", "# nothing\n\n"), "holds no puzzles"),
    "not_utf8": (lambda p, m: p.solve("a.jsonl", b"\xff\xfe\x00{}\n"), "cannot read data file"),
    "input_is_a_folder": (lambda p, m: ["solve", f"run={p.run}", f"input={p.cwd}"], "cannot read data file"),
    "input_missing": (lambda p, m: ["solve", f"run={p.run}", f"input={p.root / 'nothing.jsonl'}"],
                      "No such file or directory"),
    "output_is_the_input": (lambda p, m: ["solve", f"run={p.run}", f"input={p.root / 'good.jsonl'}",
                                          f"output={p.root / 'good.jsonl'}"], "would overwrite the input file"),
    "output_is_a_folder": (lambda p, m: ["solve", f"run={p.run}", f"input={p.root / 'good.jsonl'}",
                                         f"output={p.cwd}"], "is a directory"),
    "output_under_a_file": (lambda p, m: ["solve", f"run={p.run}", f"input={p.root / 'good.jsonl'}",
                                          f"output={p.root / 'victim.txt' / 'a.jsonl'}"],
                            "cannot create the directory"),
    "training_source_fraction": (lambda p, m: p.train(f"task.source={p.write('t.jsonl', BOARD * 3 + '[[0.5]]')}"),
                                 "t.jsonl:4: expected"),
    # checkpoints
    "checkpoint_empty": (lambda p, m: last(p.checkpoint(raw=b""), p.eval()), "is unreadable"),
    "checkpoint_truncated": (lambda p, m: last(p.checkpoint(raw=p.checkpoint_bytes()[:5000]), p.eval()),
                             "is unreadable"),
    "checkpoint_noise": (lambda p, m: last(p.checkpoint(raw=os.urandom(4096)), p.eval()), "is unreadable"),
    "checkpoint_foreign": (lambda p, m: last(p.checkpoint({"weights": torch.zeros(3)}), p.eval()),
                           "is not a gram-pyro checkpoint"),
    "checkpoint_pickle": (lambda p, m: last(p.checkpoint({"format": FORMAT, "model": Pickled()}), p.eval()),
                          "is unreadable"),
    "checkpoint_lacks_ema": (lambda p, m: last(p.checkpoint(lacking(p, "ema")), p.eval()), "lacks ema"),
    "checkpoint_short_ema": (lambda p, m: last(p.checkpoint(short_ema(p)), p.eval()), "is damaged inside"),
    "checkpoint_nan_eval": (lambda p, m: last(p.checkpoint(nan_weights(p)), p.eval()),
                            "holds NaN or infinite weights"),
    "checkpoint_nan_resume": (lambda p, m: last(p.checkpoint(nan_weights(p)),
                                            ["train", f"resume={p.run}", "trainer.max_batches=2"]),
                              "holds NaN or infinite weights"),
    "checkpoint_is_a_folder": (lambda p, m: last(p.run.joinpath("checkpoint.pt").unlink(),
                                             p.run.joinpath("checkpoint.pt").mkdir(), p.eval()),
                               "is not a checkpoint file"),
    "checkpoint_missing": (lambda p, m: last(p.run.joinpath("checkpoint.pt").unlink(), p.eval()), "no checkpoint at"),
    # run directories
    "run_missing": (lambda p, m: ["eval", f"run={p.root / 'nothing'}"], "not a run directory (no config.yaml)"),
    "run_is_a_file": (lambda p, m: ["eval", f"run={p.root / 'victim.txt'}"], "not a run directory"),
    "config_empty": (lambda p, m: last(p.write("run/config.yaml", ""), p.eval()), "is not a run's config"),
    "config_unparsable": (lambda p, m: last(p.write("run/config.yaml", "task: [1\n"), p.eval()),
                          "is not a readable yaml mapping"),
    "config_foreign_target": (lambda p, m: last(p.config(lambda c: c.update(task={"_target_": "os.remove",
                                                                              "path": str(p.root / "victim.txt")})),
                                            p.eval()), "is not one of the project's classes"),
    "config_other_board": (lambda p, m: last(p.config(lambda c: c["task"].update(n=5)),
                                         ["train", f"resume={p.run}", "trainer.max_batches=2"]),
                           "does not match the configured model/guide"),
    "train_into_a_run": (lambda p, m: ["train", *TRAIN, f"run_dir={p.run}"], "holds a run"),
    "run_dir_is_a_file": (lambda p, m: ["train", *TRAIN, f"run_dir={p.root / 'victim.txt'}"], "is a file"),
    "run_dir_under_a_file": (lambda p, m: ["train", *TRAIN, f"run_dir={p.root / 'victim.txt' / 'run'}"],
                             "run_dir: cannot create the directory"),
    "resume_without_config": (lambda p, m: ["train", f"resume={p.cwd}"], "not a run directory (no config.yaml)"),
    "metrics_is_a_folder": (lambda p, m: last(p.run.joinpath("metrics.csv").unlink(),
                                              p.run.joinpath("metrics.csv").mkdir(),
                                              ["train", f"resume={p.run}", "trainer.max_batches=2"]),
                            "metrics.csv: cannot append to it"),
    "eval_out_under_a_file": (lambda p, m: p.eval(f"out={p.root / 'victim.txt' / 'eval'}"),
                              "out: cannot create the directory"),
    # numerical
    "lr_inf_past_the_check": (inf_learning_rate, "the weights are no longer finite"),
    "nan_weight_mid_run": (nan_after_first_checkpoint, "the last good checkpoint is"),
    "nan_losses": (nan_losses, "non-finite losses"),
}


def snapshot(root: Path, skip: tuple[Path, ...]) -> dict:
    """Every path under ``root`` outside ``skip`` with its mode and contents: what a fault must not change."""
    return {str(path): (path.stat().st_mode, path.read_bytes() if path.is_file() else None)
            for path in sorted(root.rglob("*")) if not any(s in (path, *path.parents) for s in skip)}


def test_the_suite_is_large():
    assert len(CASES) >= 50


@pytest.mark.parametrize("case", CASES)
def test_a_fault_is_one_line_and_changes_nothing_outside_the_run(trained, tmp_path, monkeypatch, capsys, case):
    place = Place(tmp_path, trained)
    monkeypatch.chdir(place.cwd)
    make, message = CASES[case]
    argv = make(place, monkeypatch)
    before = snapshot(tmp_path, (place.run, place.new))
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gram-pyro: error: "), lines
    assert message in lines[0]
    assert snapshot(tmp_path, (place.run, place.new)) == before
    assert (place.root / "victim.txt").read_text() == "precious\n"


def test_data_files_may_start_with_a_byte_order_mark(trained, tmp_path, capsys):
    place = Place(tmp_path, trained)
    source = place.write("bom.jsonl", b"\xef\xbb\xbf" + BOARD.encode())
    assert main(["solve", f"run={place.run}", f"input={source}", "samples=2"]) == 0
    assert '"queens": [[0, 1]]' in (tmp_path / "bom.answers.jsonl").read_text()
    sudoku = place.write("grid.txt", "\ufeff1234341221434321\n".encode())
    assert [text for _, text in data_lines(sudoku)] == ["1234341221434321"]
    assert read_puzzles(sudoku, 4).shape == (1, 16)


def test_checkpoints_and_caches_are_readable_by_all_who_may_read_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAM_PYRO_CACHE", str(tmp_path / "cache"))
    files.umask.cache_clear()
    previous = os.umask(0o022)
    try:
        run = train(tiny_config("trainer.max_batches=1", "trainer.threads=1"), tmp_path / "run", quiet=True)
        assert (run / "checkpoint.pt").stat().st_mode & 0o777 == 0o644
        assert {path.stat().st_mode & 0o777 for path in (tmp_path / "cache").iterdir()} == {0o644}
        os.umask(0o077)
        files.umask.cache_clear()
        train(tiny_config("trainer.max_batches=2", "trainer.threads=1"), run, resume=True, quiet=True)
        assert (run / "checkpoint.pt").stat().st_mode & 0o777 == 0o600  # the umask still rules
    finally:
        os.umask(previous)
        files.umask.cache_clear()


# ------------------------------------------------------------------------------ interrupted training
KILL_CONFIG = ["trainer.max_batches=6", "trainer.checkpoint_every=2", "trainer.threads=1"]


class Killed(BaseException):
    """Stands for SIGKILL in process: nothing in the trainer catches it."""


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run the interrupted ones must end as."""
    return train(tiny_config(*KILL_CONFIG), tmp_path_factory.mktemp("straight") / "run", quiet=True)


def final_state(run: Path) -> dict:
    payload = load_checkpoint(run / "checkpoint.pt")
    return {"model": payload["model"], "guide": payload["guide"], "ema": payload["ema"]["shadow"],
            "optimizer": payload["optimizer"]["state"], "batches": payload["batches_done"]}


def rows(run: Path, name: str) -> list[dict]:
    """The rows of a run's CSV file without their wall-clock column."""
    with (run / f"{name}.csv").open() as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def assert_same_run(run: Path, straight: Path) -> None:
    mine, theirs = final_state(run), final_state(straight)
    assert mine["batches"] == theirs["batches"]
    for key in ("model", "guide"):
        assert mine[key].keys() == theirs[key].keys()
        assert all(torch.equal(mine[key][name], theirs[key][name]) for name in mine[key])
    assert all(torch.equal(a, b) for a, b in zip(mine["ema"], theirs["ema"]))
    assert all(torch.equal(mine["optimizer"][i][k], theirs["optimizer"][i][k])
               for i in theirs["optimizer"] for k in theirs["optimizer"][i])
    assert rows(run, "metrics") == rows(straight, "metrics") and rows(run, "eval") == rows(straight, "eval")


def kill_after_metrics_row(monkeypatch, batch: int) -> None:
    """Die right after the metrics row of ``batch`` is written (before its checkpoint, if one is due)."""
    real = RunLog.row

    def row(self, name, at, values):
        real(self, name, at, values)
        if name == "metrics" and at == batch:
            raise Killed

    monkeypatch.setattr(RunLog, "row", row)


def kill_inside_checkpoint_write(monkeypatch, batch: int) -> None:
    """Die while the checkpoint of ``batch`` is being written: its temporary file is whole, not yet renamed."""
    real = checkpoint.save_checkpoint

    def save_checkpoint(path, payload):
        if payload["batches_done"] == batch:
            torch.save(payload, files.temporary_beside(path))
            raise Killed
        real(path, payload)

    monkeypatch.setattr("gram_pyro.run.save_checkpoint", save_checkpoint)


def kill_after_checkpoint(monkeypatch, batch: int) -> None:
    """Die right after the checkpoint of ``batch`` is on disk."""
    real = Run.save

    def save(self, *paths):
        real(self, *paths)
        if self.batches_done == batch:
            raise Killed

    monkeypatch.setattr(Run, "save", save)


KILLS = {"after_metrics_row": (kill_after_metrics_row, range(1, 6)),
         "inside_checkpoint_write": (kill_inside_checkpoint_write, (2, 4, 6)),
         "after_checkpoint": (kill_after_checkpoint, (2, 4))}
"""How to interrupt, and at which batches that can happen before the run is done (checkpoints every 2)."""
POINTS = [(kind, batch) for kind, (_, batches) in KILLS.items() for batch in random.Random(16).sample(batches, 2)]
"""Two random batches per kind of interruption (seeded, so that a failure can be rerun)."""


@pytest.mark.parametrize("kind, batch", POINTS)
def test_a_run_interrupted_anywhere_resumes_exactly(straight, tmp_path, monkeypatch, capsys, kind, batch):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        KILLS[kind][0](patch, batch)
        with pytest.raises(Killed):
            train(tiny_config(*KILL_CONFIG), run, quiet=True)
    afresh = not (run / "checkpoint.pt").exists()  # stopped before its first checkpoint
    capsys.readouterr()
    assert main(["train", f"resume={run}"]) == 0
    assert ("holds no checkpoint" in capsys.readouterr().out) == afresh
    assert_same_run(run, straight)


def test_resume_writes_the_headers_of_missing_or_empty_csv_files(straight, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(*KILL_CONFIG[1:], "trainer.max_batches=4"), run, quiet=True)
    (run / "eval.csv").unlink()
    (run / "metrics.csv").write_text("")
    train(tiny_config(*KILL_CONFIG), run, resume=True, quiet=True)
    assert rows(run, "metrics") == rows(straight, "metrics")[4:]
    assert rows(run, "eval") == rows(straight, "eval")


def test_a_resumed_run_keeps_the_columns_of_its_csv_header(tmp_path):
    """A run logged by a version with other columns: new ones are not written, missing ones are left empty."""
    (tmp_path / "eval.csv").write_text("batch,accuracy,retired\n1,0.5,3\n")
    log = RunLog(tmp_path, total=2, done=1, quiet=True)
    log.row("eval", 2, {"accuracy": 0.75, "kl_per_token/0/1": 1.5})
    log.close()
    assert (tmp_path / "eval.csv").read_text().splitlines() == ["batch,accuracy,retired", "1,0.5,3", "2,0.75,"]
    assert (tmp_path / "metrics.csv").read_text() == ""  # a file is created with its first row


KILL_SCRIPT = """
import os, signal, sys
from gram_pyro.cli import main
from gram_pyro.training import RunLog
batch = int(sys.argv[1])
real = RunLog.row
def row(self, name, at, values):
    real(self, name, at, values)
    if name == "metrics" and at == batch:
        os.kill(os.getpid(), signal.SIGKILL)
RunLog.row = row
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_sigkill_between_a_metrics_row_and_its_checkpoint_resumes_exactly(straight, tmp_path):
    """Real SIGKILLs in child processes, three times in one run, each right after a metrics row."""
    run = tmp_path / "run"
    command = ["train", *TINY, *KILL_CONFIG, f"run_dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for batch in (1, 2, 5):
        result = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(batch), *command], env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
        command = ["train", f"resume={run}"]
    assert main(command) == 0
    assert_same_run(run, straight)
