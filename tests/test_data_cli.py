"""``gram-pyro data stats``: counts as JSON, one-line errors."""

import json

from gram_pyro.cli import main


def test_data_stats_prints_the_counts_as_json(capsys):
    assert main(["data", "stats", "task=nqueens", "task.n=6", "task.removals=[2,3]"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["task"] == "nqueens" and stats["seq_len"] == 36 and stats["total_solutions"] == 4
    splits = stats["splits"]
    assert splits["train"]["inputs"] + splits["test"]["inputs"] == sum(
        sum(split["solutions_per_input"].values()) for split in splits.values())


def test_data_without_stats_or_with_a_bad_value_is_one_line(capsys):
    assert main(["data"]) == 2
    assert main(["data", "stats", "task.n=3"]) == 2
    assert main(["data", "stats", "task=mnist"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["gram-pyro: error: usage: gram-pyro data stats task=<name> [key=value ...]",
                     "gram-pyro: error: nqueens: n must be an integer in 4..12, got 3",
                     "gram-pyro: error: missing required value task.images: set it on the command line, "
                     "e.g. task.images=<value>"]
