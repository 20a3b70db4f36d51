"""Merge the JSON files of several ``training_speed.py --json`` runs into one headline file.

    python benchmarks/merge_throughput.py OUT.json RUN.json [RUN.json ...] [--cold COLD.json ...]
                                          [--demo-seconds S]

``rows`` holds every row of the ``RUN`` files in the order given; the top level repeats the fields of
the fastest row (most updates per second) among those of the first row's model and batch: the headline
configuration, whichever compile mode and precision serve it best.
``--cold`` files are runs of the same configurations from an empty compile cache: their
``first_batch_s`` (compilation included) is added to the matching rows as ``cold_first_batch_s``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def key(row: dict) -> tuple:
    """What makes two rows the same configuration."""
    return json.dumps(row["config"], sort_keys=True), row["batch"], row["compile_mode"], row["precision"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--cold", type=Path, nargs="*", default=[])
    parser.add_argument("--demo-seconds", type=float, default=None)
    args = parser.parse_args()
    cold = {key(row): row["first_batch_s"] for path in args.cold for row in json.loads(path.read_text())["rows"]}
    rows = [{**row, **({"cold_first_batch_s": cold[key(row)]} if key(row) in cold else {})}
            for path in args.runs for row in json.loads(path.read_text())["rows"]]
    headline = max((row for row in rows if key(row)[:2] == key(rows[0])[:2]), key=lambda row: row["updates_per_s"])
    args.out.write_text(json.dumps({**headline, "demo_seconds": args.demo_seconds, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}: {len(rows)} rows, headline {headline['compile_mode']} "
          f"{headline['updates_per_s']} updates/s")


if __name__ == "__main__":
    main()
