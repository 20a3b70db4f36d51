"""The posterior comparison over training seeds: per pair (run name), the mean and the sample
standard deviation over seeds of each measured column of several ``comparison.csv`` files, one per
training seed, each written by ``experiments/compare_posteriors.py trainer.seed=<s> out=<dir>``.

    python experiments/compare_seeds.py runs/compare_posteriors runs/compare_posteriors_seed1 ... [--out DIR]

The spread over seeds is the training randomness (initialisation, batches, noise draws) that a single
comparison's 95% intervals, which cover only the held-out sampling, leave out. Every directory must
hold the same pairs with the same particles, batches and held-out settings. Writes
``<out>/comparison_seeds.csv`` (``<column>_mean`` and ``<column>_sd`` per measured column) and
``<out>/comparison_seeds.md`` (default ``out``: the first directory) and prints the markdown table.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path

from gram_pyro.config import UserError, command_line

MEASURED = ["accuracy", "coverage", "log_evidence", "ess", "khat", "kl", "train_seconds"]
"""Columns of ``comparison.csv`` summarised over seeds."""
SAME_IN_EVERY_SEED = ["particles", "batches", "optimizer_steps", "transitions"]
"""Columns that must agree between the seeds' files (the same comparison, another seed)."""


def read_comparison(directory: Path) -> dict[str, dict[str, str]]:
    """The rows of ``<directory>/comparison.csv`` keyed by the pair's run name."""
    path = directory / "comparison.csv"
    if not path.is_file():
        raise UserError(f"{path}: no such file (run experiments/compare_posteriors.py out={directory} first)")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing = [c for c in ["name", "guide", "objective", *SAME_IN_EVERY_SEED, *MEASURED] if rows and c not in rows[0]]
    if not rows or missing:
        raise UserError(f"{path}: not a comparison table ({'no rows' if not rows else 'no column ' + missing[0]})")
    return {row["name"]: row for row in rows}


def value(row: dict[str, str], column: str, where: str) -> float:
    """The number in ``row[column]`` (an empty cell is NaN: a scheme without that measurement)."""
    text = row[column]
    try:
        return float(text) if text else math.nan
    except ValueError:
        raise UserError(f"{where}: {column}={text!r} is not a number") from None


def summarise(directories: list[Path]) -> list[dict]:
    """One row per pair, in the first file's order: the fixed columns and ``<column>_mean``/``_sd``."""
    tables = [read_comparison(d) for d in directories]
    first = tables[0]
    for directory, table in zip(directories[1:], tables[1:]):
        if set(table) != set(first):
            odd = sorted(set(table) ^ set(first))[0]
            raise UserError(f"{directory}: pair {odd} is in one comparison but not the other")
        for pair, row in table.items():
            for column in SAME_IN_EVERY_SEED:
                if row[column] != first[pair][column]:
                    raise UserError(f"{directory}: {pair} has {column}={row[column]}, "
                                    f"{directories[0]} has {first[pair][column]}")
    rows = []
    for pair, row in first.items():
        out = {"name": pair, "guide": row["guide"], "objective": row["objective"], "seeds": len(tables),
               **{column: row[column] for column in SAME_IN_EVERY_SEED}}
        for column in MEASURED:
            values = [value(t[pair], column, f"{d / 'comparison.csv'} {pair}")
                      for d, t in zip(directories, tables)]
            finite = [v for v in values if not math.isnan(v)]
            out[f"{column}_mean"] = statistics.fmean(finite) if finite else math.nan
            out[f"{column}_sd"] = statistics.stdev(finite) if len(finite) > 1 else math.nan
        rows.append(out)
    return rows


def cell(row: dict, column: str, scale: float, digits: int) -> str:
    mean, sd = scale * row[f"{column}_mean"], scale * row[f"{column}_sd"]
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" + ("" if math.isnan(sd) else f" ± {sd:.{digits}f}")


def markdown(rows: list[dict], directories: list[Path]) -> str:
    header = ("| run | guide | objective | K | batches | accuracy % | coverage % | log p(y\\|x) | ESS | k-hat | KL "
              "| train s |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"Mean ± standard deviation over {len(directories)} training seeds "
             f"({', '.join(str(d) for d in directories)}).", "", header]
    for r in rows:
        lines.append(f"| {r['name']} | {r['guide']} | {r['objective']} | {r['particles']} | {r['batches']} "
                     f"| {cell(r, 'accuracy', 100, 1)} | {cell(r, 'coverage', 100, 1)} "
                     f"| {cell(r, 'log_evidence', 1, 2)} | {cell(r, 'ess', 1, 1)} | {cell(r, 'khat', 1, 2)} "
                     f"| {cell(r, 'kl', 1, 3)} "
                     f"| {cell(r, 'train_seconds', 1, 0)} |")
    return "\n".join(lines) + "\n"


@command_line("compare_seeds")
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directories", nargs="+", type=Path, help="comparison directories, one per seed")
    parser.add_argument("--out", type=Path, help="where to write the tables (default: the first directory)")
    args = parser.parse_args(argv)
    if len(args.directories) < 2:
        raise UserError("give at least two comparison directories (one per training seed)")
    rows = summarise(args.directories)
    out = args.out or args.directories[0]
    out.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    with (out / "comparison_seeds.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, args.directories)
    (out / "comparison_seeds.md").write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
