"""Shipped weights (``pretrained/<name>``): each loads on the CPU and reproduces the accuracy recorded
when it was exported; the CLI takes ``pretrained=<name>`` in place of ``run=<dir>``."""

import json

import pytest

from gram_pyro.cli import main
from gram_pyro.evaluation import evaluate_run
from gram_pyro.run import PRETRAINED, load_run, pretrained_dir

SHIPPED = sorted(p.name for p in PRETRAINED.iterdir() if (p / "weights.pt").is_file())


def test_weights_are_shipped_for_the_reproduced_results():
    assert {"coloring", "coloring10", "digits", "nqueens", "nqueens10", "sudoku", "uncond_sudoku",
            "uncond_sudoku4"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_reproduce_their_recorded_accuracy(name):
    record = json.loads((PRETRAINED / name / "check.json").read_text())
    check = record["check"]
    loaded = load_run(pretrained_dir(name), "cpu")
    report, _ = evaluate_run(loaded, "test", check["inputs"], check["samples"], depth=check.get("depth"))
    low, high = check["ci95"]
    slack = 1 / check["inputs"]  # every input right gives a zero-width interval: allow one input's worth
    assert low - slack <= report["metrics"][check["metric"]]["mean"] <= high + slack
    recorded_low, recorded_high = record["results"]["accuracy"]["ci95"]
    half = max((high - low) / 2, slack)
    assert recorded_low <= check["mean"] + half and check["mean"] - half <= recorded_high
    assert (PRETRAINED / name / "weights.pt").stat().st_size <= 5 * 2**20


@pytest.mark.parametrize("arguments, message", [
    (["eval", "pretrained=no_such_task"], "unknown pretrained='no_such_task'; allowed: "),
    (["eval"], "give either run=<run directory> or pretrained=<name>"),
    (["eval", "run=runs/x", "pretrained=coloring"], "give either run=<run directory> or pretrained=<name>"),
])
def test_pretrained_argument_errors_are_one_line(capsys, arguments, message):
    assert main(arguments) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
