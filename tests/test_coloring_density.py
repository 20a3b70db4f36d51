"""The colouring-density measurement against hand counts: an empty graph on 4 nodes has the 14 set
partitions of 4 nodes into at most 3 blocks as its canonical colourings; K4 has none."""

import json
import math

from gram_pyro.experiments.coloring_density import main


def test_rows_match_hand_counts_and_are_written(tmp_path, capsys):
    out = tmp_path / "density.json"
    assert main(["--nodes", "4", "--probs", "0.0001", "0.9999", "--draws", "50", "--samples", "7",
                 "--out", str(out)]) == 0
    empty, complete = json.loads(out.read_text())
    assert empty["colourable"] == 1 and empty["mean_edges"] == 0
    assert empty["median_colourings"] == empty["mean_colourings"] == 14  # S(4,1) + S(4,2) + S(4,3)
    assert math.isclose(empty["mean_inverse_colourings"], 1 / 14) and empty["one_colouring"] == 0
    assert math.isclose(empty["coverage_ceiling"], 7 / 14)  # 7 answers cover at most half of 14
    assert complete["colourable"] == 0 and math.isnan(complete["mean_colourings"])
    assert "| 4 | 0.00 | 1.00 | 0.0 | 14 / 14.0 | 0% | 7.1% | 50.0% |" in capsys.readouterr().out


def test_bad_arguments_are_one_line_errors(capsys):
    assert main(["--nodes", "3"]) == 2
    assert main(["--probs", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "--nodes must lie in 4..12" in err and "strictly between 0 and 1" in err
