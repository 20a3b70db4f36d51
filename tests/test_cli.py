"""The command line as a Hydra application: ``--help`` of every command (purpose, config groups, keys
with defaults), ``--cfg job`` (the composed config, nothing run), ``--multirun`` sweeps (one run
directory per job, a summary CSV) and one-line errors for bad options and bad sweep values."""

import csv

import pytest
import yaml

from gram_pyro.cli import COMMANDS, main
from tests.helpers import TINY

SWEEP = ["--multirun", *TINY, "trainer.max_batches=1", "trainer.threads=1", "objective.beta=0.05,0.5",
         "trainer.seed=0,1"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A 2 x 2 sweep of tiny runs (objective.beta x trainer.seed): its directory."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "betas"
    assert main(["train", *SWEEP, f"hydra.sweep.dir={sweep_dir}"]) == 0
    return sweep_dir


def test_main_help_lists_every_command_and_option(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for name, command in COMMANDS.items():
        assert f"  {name} " in out and command.purpose in out
    assert "--cfg job" in out and "--multirun" in out


@pytest.mark.parametrize("argv, keys", [
    (["train"], ["trainer.seed=0", "model.dim=64", "objective.beta=1.0", "run_dir=null"]),
    (["eval"], ["samples=20", "inputs=256", "perturbation.sigma=0.1"]),
    (["solve"], ["input=???", "samples=20"]),
    (["sample"], ["samples=64", "select=vote"]),
    (["diagnose"], ["run=???", "particles=64"]),
    (["data", "stats"], ["task.n=8"]),
])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_help_prints_its_purpose_and_keys_with_defaults(capsys, argv, keys, flag):
    code, out, err = run(capsys, *argv, flag)
    assert code == 0 and not err
    assert out.startswith(f"usage: {COMMANDS[argv[0]].usage}")
    assert COMMANDS[argv[0]].purpose[1:] in out and "keys (key=default):" in out
    for key in keys:
        assert f"\n  {key} " in out or f"\n  {key}\n" in out


def test_help_shows_the_groups_and_follows_the_overrides(capsys):
    _, out, _ = run(capsys, "train", "--help")
    assert "  task       " in out and "nqueens*" in out and "  guide      " in out and "gaussian*" in out
    assert "model.transitions=2" in out and "# T" in out  # the config file's comment beside the key
    _, out, _ = run(capsys, "train", "task=sudoku", "model=trm", "--help")
    assert "sudoku*" in out and "trm*" in out and "task.size=9" in out and "task.n=" not in out


def test_cfg_job_prints_the_composed_config_and_runs_nothing(capsys, tmp_path):
    code, out, _ = run(capsys, "train", "--cfg", "job", "model=trm", f"run_dir={tmp_path / 'new'}")
    cfg = yaml.safe_load(out)
    assert code == 0 and cfg["model"]["noise"] == "none" and cfg["run_dir"] == str(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    code, out, _ = run(capsys, "eval", "-c", "job", "samples=3")
    assert code == 0 and yaml.safe_load(out)["samples"] == 3


def test_cfg_job_of_a_resumed_run_is_its_saved_config_with_the_changes(capsys, sweep):
    code, out, _ = run(capsys, "train", "--cfg=job", f"resume={sweep / '3'}", "trainer.max_batches=9")
    cfg = yaml.safe_load(out)
    assert code == 0 and cfg["trainer"]["max_batches"] == 9 and cfg["objective"]["beta"] == 0.5
    assert cfg["trainer"]["seed"] == 1 and cfg["model"]["dim"] == 16


def test_multirun_trains_one_run_per_job_and_writes_a_summary(sweep):
    with (sweep / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["job"], row["objective.beta"], row["trainer.seed"]) for row in rows] == [
        ("0", "0.05", "0"), ("1", "0.05", "1"), ("2", "0.5", "0"), ("3", "0.5", "1")]
    for row in rows:
        saved = yaml.safe_load((sweep / row["job"] / "config.yaml").read_text())
        assert row["status"] == "ok" and row["run_dir"] == str(sweep / row["job"])
        assert (saved["objective"]["beta"], saved["trainer"]["seed"]) == (float(row["objective.beta"]),
                                                                          int(row["trainer.seed"]))
        assert row["train_batch"] == "1" and float(row["train_loss"]) > 0 and row["eval_accuracy"] != ""
    assert rows[0]["train_loss"] != rows[1]["train_loss"]  # another seed, another run


def test_cfg_job_of_a_sweep_prints_every_job(capsys):
    code, out, _ = run(capsys, "train", "-m", "-c", "job", "model.dim=8,16")
    jobs = out.split("# job ")[1:]
    assert code == 0 and [job.splitlines()[0] for job in jobs] == ["0: model.dim=8", "1: model.dim=16"]
    assert yaml.safe_load(jobs[1].split("\n", 1)[1])["model"]["dim"] == 16


@pytest.mark.parametrize("argv, message", [
    (["train", "--bogus"], "unknown option --bogus; allowed: --help, --cfg job, --multirun"),
    (["train", "--cfg", "hydra"], "--cfg hydra; allowed: --cfg job"),
    (["train", "--cfg"], "--cfg needs a value; allowed: --cfg job"),
    (["eval", "--multirun", "samples=1,2"], "--multirun: only train sweeps"),
    (["train", "objective.beta=0.1,0.2"], "to sweep over it add --multirun"),
    (["train", "-m", "objective.beta=interval(0,1)"], "an interval has no list of values to sweep"),
    (["train", "-m", "objective.beta=0.1,0.2", "run_dir=x"], "job 0 (objective.beta=0.1): run_dir=x in a sweep"),
    (["train", "-m", "objective.beta=0.1,0.2", "hydra.sweep.dir=a,b"], "the sweep's own settings take one value"),
    (["train", "-m", "objective.beta=0.1,0.2", "model.dim=16,zero"],
     "job 1 (objective.beta=0.1 model.dim=zero): bad model config"),
    (["train", "-m", "trainer.lr=0.1,5"], "job 1 (trainer.lr=5): trainer.lr=5 is out of range"),
])
def test_bad_options_and_sweep_values_are_one_line_and_run_nothing(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, argv[0], *TINY, *argv[1:])
    assert code == 2 and err.count("\n") == 1 and err.startswith("gram-pyro: error: ") and message in err
    assert list(tmp_path.iterdir()) == []
