"""Run directories are input like any other: loading one builds only the project's own classes and
touches nothing outside it; training never silently replaces a run; no checkpoint holds a non-finite
tensor; bad run files and paths are one-line errors."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gram_pyro import training
from gram_pyro.checkpoint import load_checkpoint
from gram_pyro.cli import main
from gram_pyro.config import UserError, allowed_targets
from gram_pyro.training import train
from tests.helpers import TINY, tiny_config

VICTIM_TEXT = "precious data\n"
PAYLOAD_MODULE = "gram_pyro_safety_payload"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run (config.yaml and checkpoint.pt), copied by the tests that alter it."""
    return train(tiny_config("trainer.max_batches=1"), tmp_path_factory.mktemp("trained") / "run", quiet=True)


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A working directory, a victim file and folder, and an importable module whose import would leave
    a marker file: all outside the run directory, in ``tmp_path``."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    victim = tmp_path / "victim.txt"
    victim.write_text(VICTIM_TEXT)
    (tmp_path / "victim_dir").mkdir()
    (tmp_path / "victim_dir" / "keep.txt").write_text(VICTIM_TEXT)
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / f"{PAYLOAD_MODULE}.py").write_text(
        f"open({str(tmp_path / 'imported.txt')!r}, 'w').write('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    (tmp_path / "boards.txt").write_text("")
    return tmp_path


def attacks(place: Path, cfg: dict) -> dict[str, tuple[str, object]]:
    """Config nodes that would run code or touch files if they were built: ``name -> (key, node)``."""
    victim, folder = str(place / "victim.txt"), str(place / "victim_dir")
    return {
        "open": ("task", {"_target_": "builtins.open", "_args_": [victim, "w"]}),
        "rmtree": ("model", {"_target_": "shutil.rmtree", "path": folder}),
        "write_text": ("guide", {"_target_": "pathlib.Path.write_text",
                                 "self": {"_target_": "pathlib.Path", "_args_": [victim]}, "data": "pwned"}),
        "import_module": ("objective", {"_target_": "importlib.import_module", "name": PAYLOAD_MODULE}),
        "remove": ("task", {"_target_": "os.remove", "_args_": [victim]}),
        "nested": ("task", {**cfg["task"], "source": {"_target_": "builtins.open", "_args_": [victim, "w"]}}),
        "args_of_allowed": ("model", {**cfg["model"], "_args_": [{"_target_": "os.remove", "_args_": [victim]}]}),
        "partial": ("task", {**cfg["task"], "_partial_": True}),
        "recursive_off": ("model", {**cfg["model"], "_recursive_": False}),
        "wrong_key": ("task", {**cfg["model"]}),
        "trainer_target": ("trainer", {**cfg["trainer"], "_target_": "os.remove", "path": victim}),
        "interpolation": ("task", "${oc.decode:'{_target_: os.remove, _args_: [" + victim + "]}'}"),
    }


COMMANDS = {
    "eval": lambda run, place: ["eval", f"run={run}", "samples=2", "inputs=2"],
    "resume": lambda run, place: ["train", f"resume={run}", "trainer.max_batches=2"],
    "solve": lambda run, place: ["solve", f"run={run}", f"input={place / 'boards.txt'}"],
    "sample": lambda run, place: ["sample", f"run={run}", "samples=2"],
    "diagnose": lambda run, place: ["diagnose", f"run={run}", "inputs=2", "particles=2", "samples=2"],
}


def malicious_run(trained: Path, place: Path, attack: str) -> Path:
    """A copy of the trained run whose config.yaml carries ``attack``."""
    run = place / "shared_run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes((trained / "checkpoint.pt").read_bytes())
    cfg = yaml.safe_load((trained / "config.yaml").read_text())
    key, node = attacks(place, cfg)[attack]
    cfg[key] = node
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def snapshot(root: Path, skip: Path) -> dict:
    """Every path under ``root`` but ``skip``, with file contents: what must not change."""
    return {str(path): path.read_bytes() if path.is_file() else None
            for path in sorted(root.rglob("*")) if skip not in (path, *path.parents)}


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gram-pyro: error: "), err
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("attack", ["open", "rmtree", "write_text", "import_module", "remove", "nested",
                                    "args_of_allowed", "partial", "recursive_off", "wrong_key", "trainer_target",
                                    "interpolation"])
def test_a_malicious_run_config_builds_nothing_and_touches_nothing(trained, place, capsys, attack, command):
    run = malicious_run(trained, place, attack)
    before = snapshot(place, run)
    assert main(COMMANDS[command](run, place)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(run / "config.yaml") in line
    assert snapshot(place, run) == before
    assert (place / "victim.txt").read_text() == VICTIM_TEXT and not (place / "imported.txt").exists()


def test_a_malicious_run_config_is_one_line_from_the_console(trained, place):
    run = malicious_run(trained, place, "open")
    result = subprocess.run([sys.executable, "-m", "gram_pyro.cli", "eval", f"run={run}"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"gram-pyro: error: {run / 'config.yaml'}: task._target_='builtins.open' is not one of the project's "
        f"classes; allowed: {', '.join(sorted(allowed_targets()['task']))}"]
    assert (place / "victim.txt").read_text() == VICTIM_TEXT


def test_the_allow_list_is_what_the_configs_name():
    allowed = allowed_targets()
    assert set(allowed) == {"task", "model", "guide", "objective"}
    assert "gram_pyro.tasks.nqueens.NQueensTask" in allowed["task"]
    assert allowed["model"] == {"gram_pyro.models.RecursiveReasoningModel"}
    assert "gram_pyro.guides.PriorGuide" in allowed["guide"] and "gram_pyro.objectives.PyroELBO" in allowed["objective"]


def test_a_command_line_target_is_refused_before_anything_is_built(place, capsys):
    assert main(["train", *TINY, "task._target_=builtins.open", f"run_dir={place / 'new'}"]) == 2
    assert "task._target_='builtins.open' is not one of the project's classes" in one_error_line(
        capsys.readouterr().err)
    assert not (place / "new").exists()


@pytest.mark.parametrize("text, message", [
    ("", "is not a run's config: it lacks the mappings task, model, guide, objective, trainer"),
    ("5\n", "is not a readable yaml mapping"),
    ("- 1\n- 2\n", "is not a readable yaml mapping (it holds a list)"),
    ("task: [1\n", "is not a readable yaml mapping"),
    ("task: nqueens\n", "it lacks the mappings task, model, guide, objective, trainer"),
])
def test_a_damaged_config_yaml_is_one_line(trained, tmp_path, capsys, text, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes((trained / "checkpoint.pt").read_bytes())
    (run / "config.yaml").write_text(text)
    for command in (["eval", f"run={run}"], ["train", f"resume={run}"]):
        assert main(command) == 2
        assert message in one_error_line(capsys.readouterr().err)


def test_a_zero_byte_checkpoint_is_one_line(trained, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text((trained / "config.yaml").read_text())
    (run / "checkpoint.pt").write_bytes(b"")
    for command in (["eval", f"run={run}"], ["train", f"resume={run}", "trainer.max_batches=2"]):
        assert main(command) == 2
        assert "is unreadable (truncated or not a checkpoint: EOFError)" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", [
    lambda run, blocked: ["eval", f"run={run}", "samples=2", "inputs=2", f"out={blocked}"],
    lambda run, blocked: ["sample", f"run={run}", "samples=2", f"out={blocked}"],
    lambda run, blocked: ["solve", f"run={run}", f"input={run / 'config.yaml'}", f"output={blocked / 'a.txt'}"],
    lambda run, blocked: ["diagnose", f"run={run}", f"out={blocked}"],
])
def test_an_output_folder_that_cannot_be_created_is_one_line(trained, tmp_path, capsys, command):
    (tmp_path / "file").write_text("")
    assert main(command(trained, tmp_path / "file" / "sub")) == 2
    assert "cannot create the directory" in one_error_line(capsys.readouterr().err)


def run_tree(run: Path) -> dict:
    return {str(path.relative_to(run)): path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()}


def test_training_into_a_run_is_refused_and_overwrite_moves_it_aside(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "trainer.max_batches=1", f"run_dir={run}"]) == 0
    kept = run_tree(run)
    capsys.readouterr()
    assert main(["train", *TINY, "trainer.max_batches=1", f"run_dir={run}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"resume={run}" in line and "overwrite=true" in line
    assert run_tree(run) == kept
    assert main(["train", *TINY, "trainer.max_batches=1", f"run_dir={run}", "overwrite=true"]) == 0
    aside = [path for path in tmp_path.iterdir() if path.name.startswith("run.old-")]
    assert len(aside) == 1 and run_tree(aside[0]) == kept
    assert f"moved the previous run in {run} to {aside[0]}" in capsys.readouterr().out
    with (run / "metrics.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 1  # a fresh run's file, one header


def test_a_run_dir_that_cannot_be_created_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["train", *TINY, "trainer.max_batches=1", f"run_dir={tmp_path / 'file'}"]) == 2
    assert "is a file" in one_error_line(capsys.readouterr().err)
    assert main(["train", *TINY, "trainer.max_batches=1", f"run_dir={tmp_path / 'file' / 'run'}"]) == 2
    assert "run_dir: cannot create the directory" in one_error_line(capsys.readouterr().err)


def test_the_demo_reruns_into_its_directory(tmp_path):
    from gram_pyro.experiments.demo import main as demo

    tiny = [*TINY, "trainer.max_batches=1", "trainer.checkpoint_every=1", "trainer.threads=1"]
    assert demo([f"out={tmp_path}", *tiny]) == 0  # both runs at once, in two processes
    assert json.loads((tmp_path / "results.json").read_text())["jobs"] == 2
    assert demo([f"out={tmp_path}", "jobs=1", *tiny]) == 0  # one after the other, in this process
    assert json.loads((tmp_path / "results.json").read_text())["jobs"] == 1
    assert sorted(path.name.partition(".old-")[0] for path in tmp_path.glob("*.old-*")) == ["learned", "none"]



def test_a_run_that_finishes_hands_its_cores_to_the_runs_still_training(monkeypatch):
    import multiprocessing

    import torch._inductor.config

    from gram_pyro import side_by_side

    offered = []

    def run(position, threads):  # records the threads it would get
        offered.append((position, threads()))
        return position

    monkeypatch.setattr(side_by_side.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(side_by_side, "_training", None)
    monkeypatch.setattr(side_by_side, "_jobs", 1)
    monkeypatch.setattr(torch._inductor.config.cpp, "dynamic_threads", False)  # restored for later tests
    side_by_side.share_count(multiprocessing.Value("i", 3), 2)  # as in a worker: 3 runs, 2 at a time
    assert torch._inductor.config.cpp.dynamic_threads
    assert [side_by_side.run_and_hand_over(run, i) for i in range(3)] == [0, 1, 2]
    assert offered == [(0, 2), (1, 2), (2, 4)] and side_by_side._training.value == 0
    side_by_side._training.value = 1
    with pytest.raises(ZeroDivisionError):  # a run that fails hands its cores over too
        side_by_side.run_and_hand_over(lambda position, threads: threads() / 0, 0)
    assert side_by_side._training.value == 0


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_side_by_side_workers_stop_when_the_process_that_started_them_is_killed():
    import signal
    import time

    starter = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time\n"
         "from gram_pyro.side_by_side import worker_pool\n"
         "with worker_pool(1) as pool:\n"
         "    print(pool.submit(os.getpid).result(), flush=True)\n"
         "    pool.submit(time.sleep, 120)\n"
         "    time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True)
    worker = int(starter.stdout.readline())
    assert alive(worker)
    starter.send_signal(signal.SIGKILL)  # no clean-up of its own: the workers must notice
    starter.wait()
    deadline = time.monotonic() + 20
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    starter.stdout.close()
    assert not alive(worker)


def test_the_demo_refuses_a_bad_jobs_value(tmp_path, capsys):
    from gram_pyro.experiments.demo import main as demo

    assert demo([f"out={tmp_path}", "jobs=3"]) == 2
    assert capsys.readouterr().err == ("demo: error: jobs='3'; allowed: 1 (one run after the other), "
                                       "2 (both runs at once)\n")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("override, message", [
    ("overwrite=maybe", "overwrite='maybe'; allowed: true, false"),
    ("trainer.lr=inf", "trainer.lr=inf is not a finite number; allowed: in [0, 1]"),
    ("trainer.lr=nan", "trainer.lr=nan is not a finite number"),
    ("trainer.lr=5", "trainer.lr=5 is out of range; allowed: in [0, 1]"),
    ("trainer.weight_decay=nan", "trainer.weight_decay=nan is not a finite number; allowed: >= 0"),
    ("trainer.grad_clip=-inf", "trainer.grad_clip=-inf is not a finite number"),
])
def test_bad_training_values_are_one_line_and_create_nothing(tmp_path, capsys, override, message):
    assert main(["train", *TINY, override, f"run_dir={tmp_path / 'run'}"]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def tensors(value):
    """Every tensor in a (nested) checkpoint payload."""
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors(item)


def assert_finite_checkpoint(path: Path) -> dict:
    payload = load_checkpoint(path)
    assert all(torch.isfinite(t).all() for t in tensors(payload) if t.is_floating_point())
    return payload


def test_an_infinite_learning_rate_never_reaches_a_checkpoint(tmp_path, monkeypatch):
    for where in ("gram_pyro.training", "gram_pyro.run"):  # past the up-front checks
        monkeypatch.setattr(f"{where}.check_trainer", lambda trainer: None)
    run = tmp_path / "run"
    with pytest.raises(UserError) as error:
        train(tiny_config("trainer.lr=inf", "trainer.max_batches=3", "trainer.checkpoint_every=1"), run, quiet=True)
    assert "no longer finite" in str(error.value) and "no checkpoint was written" in str(error.value)
    assert f"gram-pyro train run_dir={run} overwrite=true" in str(error.value)
    assert not (run / "checkpoint.pt").exists()


@pytest.mark.parametrize("where", ["parameter", "ema"])
def test_a_nan_mid_run_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, where):
    real = training.train_batch

    def poisoned(run, batch):
        metrics = real(run, batch)
        if run.batches_done == 1:  # the second batch: after the first checkpoint
            with torch.no_grad():
                (run.params[0] if where == "parameter" else run.ema.shadow[0]).view(-1)[0] = float("nan")
        return metrics

    monkeypatch.setattr(training, "train_batch", poisoned)
    run = tmp_path / "run"
    cfg = tiny_config("trainer.max_batches=3", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=true")
    with pytest.raises(UserError) as error:
        train(cfg, run, quiet=True)
    message = str(error.value)
    assert message.startswith("stopped at batch 2: the weights are no longer finite")
    assert f"the last good checkpoint is {run / 'checkpoint.pt'} (batch 1)" in message
    assert f"gram-pyro train resume={run} trainer.lr=0.0001" in message
    assert assert_finite_checkpoint(run / "checkpoint.pt")["batches_done"] == 1
    assert [path.name for path in (run / "checkpoints").iterdir()] == ["batch_000001.pt"]


def test_too_many_bad_steps_before_any_checkpoint_says_there_is_none(tmp_path, monkeypatch):
    from gram_pyro.objectives import TruncatedSurrogate

    real = TruncatedSurrogate.loss

    def poisoned(self, *args):
        loss, metrics = real(self, *args)
        return loss * float("nan"), metrics

    monkeypatch.setattr(TruncatedSurrogate, "loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(UserError) as error:
        train(tiny_config("trainer.max_batches=2", "trainer.max_bad_steps=0"), run, quiet=True)
    assert "non-finite losses" in str(error.value) and "no checkpoint was written" in str(error.value)
    assert "last good checkpoint" not in str(error.value) and not (run / "checkpoint.pt").exists()


def test_resume_with_a_lower_learning_rate_uses_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "trainer.max_batches=2", f"run_dir={run}"]) == 0
    assert main(["train", f"resume={run}", "trainer.max_batches=3", "trainer.lr=1e-4"]) == 0
    with (run / "metrics.csv").open() as f:
        rates = [float(row["lr"]) for row in csv.DictReader(f)]
    assert rates == [1e-3, 1e-3, 1e-4]  # the warm-up (2 steps) ends within the first batch (2 steps)
    assert [g["lr"] for g in assert_finite_checkpoint(run / "checkpoint.pt")["optimizer"]["param_groups"]] == [1e-4]
