"""Render ``docs/results.md`` from the published reproductions ``docs/results/*.json``.

    python experiments/results_table.py [--check] [--results DIR] [--out FILE]

The file is ``experiments/results_header.md``, then one markdown table per task family (a row per task,
budget, split and model, naming budget and device, each value as mean ± the half-width of its 95%
interval, the paper's figures beside them where known, and a note per reproduction), then each result's
GRAM rows against the task's targets (:data:`TARGETS`), then the posterior shortcut check of the shipped
weights (a row per ``docs/results/shortcut/<weights>.json``: the ``summary.json`` that ``gram-pyro
diagnose run=pretrained/<weights>`` writes), then ``experiments/results_footer.md``, both verbatim. The
same files give the same bytes. ``--check`` writes nothing and exits with 1 where ``--out`` differs from
the rendering.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gram_pyro.config import UserError, command_line, compose_config, group_options
from gram_pyro.training import config_differences

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

FAMILIES = {
    "N-Queens": {"nqueens": "N-Queens 8x8", "nqueens10": "N-Queens 10x10"},
    "Graph colouring": {"coloring": "colouring, 8 nodes", "coloring10": "colouring, 10 nodes"},
    "Sudoku": {"sudoku": "Sudoku 9x9"},
    "Unconditional Sudoku": {"uncond_sudoku4": "unconditional 4x4", "uncond_sudoku": "unconditional 9x9"},
    "Binarized digits": {"digits": "digits 8x8"},
}
"""Task families, each a table, with the tasks in their order and the label of each."""

PAPER = {
    ("nqueens", "test", "GRAM"): "accuracy 99.7, coverage 90.3",
    ("nqueens", "test", "TRM"): "accuracy 66.8, coverage 36.1",
    ("nqueens10", "test", "GRAM"): "accuracy 89.7, coverage 57.5",
    ("nqueens10", "test", "TRM"): "accuracy 17.5, coverage 2.0",
    ("coloring", "test", "GRAM"): "conflicts_total 2.7, coverage 85.8",
    ("coloring", "test", "TRM"): "conflicts_total 109.3, coverage 22.3",
    ("coloring10", "test", "GRAM"): "conflicts_total 3.3, coverage 51.3",
    ("coloring10", "test", "TRM"): "conflicts_total 170.7, coverage 6.8",
    ("uncond_sudoku", "test", "GRAM"): "validity 99.05",
    ("sudoku", "extreme", "GRAM"): "accuracy 97.0 (20 samples)",
    ("sudoku", "extreme", "TRM"): "accuracy 87.4",
}
"""The paper's figures (full-scale models) per ``(task, split, model)``."""

MODEL_ORDER = ["GRAM", "TRM", "PTRM", "data"]
METRIC_ORDER = ["accuracy", "exact", "cells", "conflicts", "conflicts_total", "coverage", "pass", "vote", "lprm",
                "halt", "first", "validity", "uniqueness", "equal_pairs", "grids", "well_formed", "distinct", "novel",
                "inception_score", "fid"]
"""Column order; a metric ``<name>@<N>`` sorts as ``<name>``, unlisted metrics last, alphabetically."""
PERCENT = {"accuracy", "exact", "cells", "coverage", "pass", "vote", "lprm", "halt", "first", "best_rule", "validity",
           "uniqueness", "well_formed", "distinct", "novel"}
"""Metrics shown in percent (``<name>@<N>`` by its name)."""
DECIMALS = {"conflicts": 2, "conflicts_total": 1, "equal_pairs": 0, "grids": 0, "inception_score": 2, "fid": 1}
"""Decimals of the metrics not in percent (others: 3); percentages have 1."""
REQUIRED = ("task", "budget", "device", "wall_seconds", "test_inputs", "samples", "models")
SHORTCUT_FOLDER = "shortcut"
"""Subfolder of the results folder with one diagnose summary per shipped weights."""
SELECTION_RULES = ("vote", "lprm", "halt")
"""The rules whose ``<rule>@N`` scores ``best_rule@N`` takes the best of."""


@dataclass(frozen=True)
class Of:
    """A bound taken from another row of the same table: ``times * <model's metric> + plus``."""
    model: str
    metric: str
    times: float = 1.0
    plus: float = 0.0


@dataclass(frozen=True)
class Target:
    """GRAM's ``metric`` on the test split against ``bound`` (a number, or :class:`Of` another row);
    ``best_rule@20`` is the best of the ``vote``, ``lprm`` and ``halt`` scores."""
    metric: str
    relation: str  # >= | > | <= | <
    bound: float | Of

    def text(self) -> str:
        """The target as the table states it: ``coverage@20 >= 2 x TRM's coverage@20``."""
        if isinstance(self.bound, Of):
            scaled = f"{self.bound.times:g} x " if self.bound.times != 1 else ""
            added = f" + {number(self.metric, self.bound.plus)}" if self.bound.plus else ""
            return f"{self.metric} {self.relation} {scaled}{self.bound.model}'s {self.bound.metric}{added}"
        return f"{self.metric} {self.relation} {number(self.metric, self.bound)}"

    def check(self, models: dict, model: str) -> tuple[float, float, bool]:
        """``(value, bound, met)`` of ``model``'s row."""
        value = row_value(models, model, self.metric)
        bound = self.bound if not isinstance(self.bound, Of) else (
            self.bound.times * row_value(models, self.bound.model, self.bound.metric) + self.bound.plus)
        met = {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}[self.relation]
        return value, bound, met


def row_value(models: dict, model: str, metric: str) -> float:
    """A row's mean of ``metric`` (``best_rule@N``: the best of its selection rules' scores)."""
    if metric.startswith("best_rule@"):
        return max(entry["mean"] for name, entry in models[model].items()
                   if name.split("@")[0] in SELECTION_RULES)
    return models[model][metric]["mean"]


TARGETS = {
    "nqueens": [Target("accuracy", ">=", 0.97), Target("coverage@20", ">=", 0.90)],
    "nqueens10": [Target("accuracy", ">=", 0.70), Target("coverage@20", ">=", 0.40),
                  Target("coverage@20", ">=", Of("TRM", "coverage@20", times=3))],
    **{task: [Target("accuracy", ">=", 0.80), Target("conflicts", "<=", Of("TRM", "conflicts", times=0.2)),
              Target("coverage@20", ">=", Of("TRM", "coverage@20", times=2))] for task in ("coloring", "coloring10")},
    "sudoku": [Target("best_rule@20", ">=", 0.50), Target("best_rule@20", ">=", Of("TRM", "accuracy", plus=0.10)),
               Target("best_rule@20", ">=", Of("PTRM", "best_rule@20"))],
    "uncond_sudoku4": [Target("validity", ">=", 0.99), Target("grids", ">=", 250)],
    "uncond_sudoku": [Target("validity", ">=", 0.90), Target("uniqueness", ">=", 0.99)],
    "digits": [Target("inception_score", ">=", Of("data", "inception_score", times=0.7)),
               Target("inception_score", ">", Of("TRM", "inception_score")), Target("fid", "<", Of("TRM", "fid"))],
}
"""The project's targets per task, each checked on every GRAM row of a result's test split."""


THROUGHPUT_PREFIX = "throughput-"
"""Speed figures (``throughput-<cpu|gpu>.json``, benchmarks/training_speed.py) sit beside the results
files but are not results: docs/performance.md reports them."""


def load_results(folder: Path) -> list[dict]:
    """Every ``*.json`` in ``folder`` (sorted by name) but the throughput files, checked for the keys a
    table needs."""
    results = []
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith(THROUGHPUT_PREFIX):
            continue
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: not JSON ({error})") from None
        missing = [key for key in REQUIRED if key not in result]
        if missing:
            raise UserError(f"{path}: not a results file (no {missing[0]!r})")
        if family_of(result["task"]) is None:
            raise UserError(f"{path}: unknown task {result['task']!r}; allowed: "
                            f"{', '.join(t for tasks in FAMILIES.values() for t in tasks)}")
        results.append(result)
    return results


def load_shortcut_checks(folder: Path) -> dict[str, dict]:
    """The diagnose summaries ``folder/<weights>.json`` by weights name (none if the folder is absent),
    each checked for the parts the table reads."""
    checks = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            summary = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: not JSON ({error})") from None
        if not isinstance(summary, dict) or not {"task", "inputs", "shortcut", "kl"} <= set(summary):
            raise UserError(f"{path}: not a diagnose summary (gram-pyro diagnose writes one as summary.json)")
        checks[path.stem] = summary
    return checks


def render_shortcut_checks(checks: dict[str, dict]) -> str:
    """The table of the shortcut checks (empty without any)."""
    if not checks:
        return ""
    lines = ["### Posterior shortcut check of the shipped weights", "",
             "`gram-pyro diagnose run=pretrained/<weights>` on the test split (the summary it writes is "
             "`docs/results/shortcut/<weights>.json`): a metric of answers decoded along prior and along "
             "posterior trajectories on the same held-out inputs, in percent (accuracy; for digits, whose "
             "every well-formed image is an answer, the share of images the digits classifier recognises), "
             "and the KL of the posterior from the prior summed over a trajectory, in nats per input.", "",
             "| weights | task | inputs | metric | prior | posterior | gap | KL per input | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, summary in checks.items():
        check = summary["shortcut"]
        verdict = "shortcut" if check["flagged"] else "no shortcut"
        lines.append(f"| `{name}` | {summary['task']} | {summary['inputs']} | {check.get('metric', 'accuracy')} "
                     f"| {100 * check['prior_accuracy']:.1f} "
                     f"| {100 * check['posterior_accuracy']:.1f} | {100 * check['gap']:+.1f} "
                     f"| {summary['kl']['total']:.1f} | {verdict} (threshold {100 * check['threshold']:.0f}) |")
    return "\n".join(lines)


def family_of(task: str) -> str | None:
    """The family a task's rows go to."""
    return next((family for family, tasks in FAMILIES.items() if task in tasks), None)


def sections(result: dict) -> list[tuple[str, int, dict]]:
    """``(split, inputs, models)`` of a result: the test split, then any other split."""
    others = [(name, s["inputs"], s["models"]) for name, s in result.get("splits", {}).items()]
    return [("test", result["test_inputs"], result["models"]), *others]


def metric_key(metric: str) -> tuple[int, str]:
    """Sort key of a column: its place in :data:`METRIC_ORDER`, then its name."""
    base = metric.split("@")[0]
    return (METRIC_ORDER.index(base) if base in METRIC_ORDER else len(METRIC_ORDER), metric)


def model_key(model: str) -> tuple[int, str]:
    """Sort key of a row's model: the place in :data:`MODEL_ORDER` of its first word (``GRAM T=1.3``
    follows ``GRAM``), then its name."""
    base = model.split(" ")[0]
    return (MODEL_ORDER.index(base) if base in MODEL_ORDER else len(MODEL_ORDER), model)


def number(metric: str, value: float, extra: int = 0) -> str:
    """``value`` of ``metric`` as shown: percent with 1 decimal, or the metric's decimals (``extra``
    more of either)."""
    base = metric.split("@")[0]
    if base in PERCENT:
        return f"{100 * value:.{1 + extra}f}"
    return f"{value:.{DECIMALS.get(base, 3) + extra}f}"


def apart(metric: str, values: list[float], bound: float) -> list[str]:
    """``values`` and then ``bound`` as :func:`number` shows them, with as many more decimals (up to 3)
    as it takes for no value to read like the bound it differs from."""
    for extra in range(4):
        shown = [number(metric, value, extra) for value in [*values, bound]]
        if all(text != shown[-1] or value == bound for text, value in zip(shown, values)):
            break
    return shown


def cell(metric: str, entry: dict | None) -> str:
    """``mean ± half-width`` of a ``{"mean", "ci95": [low, high]}`` entry (no interval: the mean alone)."""
    if entry is None or entry.get("mean") is None:
        return "–"
    interval = entry.get("ci95")
    if not interval or None in interval:
        return number(metric, entry["mean"])
    return f"{number(metric, entry['mean'])} ± {number(metric, (interval[1] - interval[0]) / 2)}"


def ordered(results: list[dict]) -> list[dict]:
    """Results in table order: family, task within the family, budget."""
    tasks = [task for family in FAMILIES.values() for task in family]
    return sorted(results, key=lambda r: (tasks.index(r["task"]), r["budget"]))


def markdown_table(results: list[dict]) -> str:
    """One markdown table of every row of ``results`` (task, budget, device, model, metrics, paper)."""
    rows = [(result, split, model, metrics) for result in ordered(results)
            for split, _, models in sections(result) for model, metrics in sorted(models.items(),
                                                                                 key=lambda m: model_key(m[0]))]
    columns = sorted({m for *_, metrics in rows for m in metrics if m != "by_solutions"}, key=metric_key)
    paper = any((r["task"], split, model) in PAPER for r, split, model, _ in rows)
    header = ["task", "budget", "device", "model", *columns, *(["paper"] if paper else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result, split, model, metrics in rows:
        label = FAMILIES[family_of(result["task"])][result["task"]] + ("" if split == "test" else f", {split}")
        values = [cell(column, metrics.get(column)) for column in columns]
        figures = [PAPER.get((result["task"], split, model), "")] if paper else []
        lines.append("| " + " | ".join([label, result["budget"], result["device"], model, *values, *figures]) + " |")
    return "\n".join(lines)


def recipe_changed(result: dict) -> bool:
    """Whether the recipe file of ``result``, with the recipe overrides the result records, now trains or
    scores otherwise than the recipe the result records (or is gone): the train config of each run, as
    the result records it (``configs``; results written before that are composed from the recipe they
    record, which misses a change of the task's recipe in ``experiments/configs/recipe/``) against
    the one composed now with the command's train arguments the result records (thread counts aside),
    and the ``eval`` settings the result records."""
    name = f"{result['task']}-{result['budget']}"
    if name not in group_options("reproduce"):
        return True
    then = result.get("recipe", {})
    now = OmegaConf.to_container(compose_config(f"reproduce/{name}", then.get("recipe_overrides", [])),
                                 resolve=True)
    if any(now["eval"].get(key) != value for key, value in then.get("eval", {}).items()):
        return True
    extra = then.get("overrides", [])  # the command's train arguments, given to both runs

    def train_config(recipe: dict, model: str) -> DictConfig:
        return compose_config("train", [*recipe.get("train", []), *recipe.get(model, []), *extra, "run_dir=."])

    recorded = result.get("configs", {})
    for model in ("gram", "trm"):
        then_config = OmegaConf.create(recorded[model]) if model in recorded else train_config(then, model)
        if config_differences(then_config, train_config(now, model), continuable=("trainer.threads",)):
            return True
    return False


def note(result: dict) -> str:
    """What a reproduction measured on, how long it took and its recipe, as one list item."""
    name = f"{result['task']}-{result['budget']}"
    inputs = " and ".join(f"{n} {split} inputs" for split, n, _ in sections(result))
    extra = [*result.get("recipe", {}).get("recipe_overrides", []), *result.get("recipe", {}).get("overrides", [])]
    depth, trained = result.get("depth"), result.get("trained_depth")
    deeper = f" of {depth} supervision steps (trained with {trained})" if depth != trained else ""
    side_by_side = ", the two runs trained side by side" if result.get("jobs", 1) > 1 else ""
    recipe = (f"the recipe of the time, recorded in `docs/results/{name}.json` (`experiments/configs/reproduce/"
              f"{name}.yaml` has changed since)" if recipe_changed(result) else
              f"recipe `experiments/configs/reproduce/{name}.yaml`")
    return (f"- `{name}`: {inputs}, {result['samples']} prior trajectories each{deeper}; "
            f"{result['wall_seconds'] / 60:.1f} min in all on {result['device']}{side_by_side}; {recipe}"
            + (f" with `{' '.join(extra)}`" if extra else "") + ".")


def render_tables(results: list[dict]) -> str:
    """The generated part: per family with results, a heading, its table and a note per reproduction."""
    if not results:
        return "No reproduction is published yet."
    parts = []
    for family in FAMILIES:
        members = [r for r in results if family_of(r["task"]) == family]
        if members:
            notes = "\n".join(note(r) for r in ordered(members))
            parts.append(f"### {family}\n\n{markdown_table(members)}\n\n{notes}")
    return "\n\n".join(parts)


def render_targets(results: list[dict]) -> str:
    """The table of every result's GRAM rows against its task's :data:`TARGETS` (empty without any)."""
    lines = []
    for result in ordered(results):
        models = result["models"]
        grams = sorted((model for model in models if model.split(" ")[0] == "GRAM"), key=model_key)
        label = FAMILIES[family_of(result["task"])][result["task"]]
        for target in TARGETS.get(result["task"], []):
            try:
                checks = [target.check(models, model) for model in grams]
            except KeyError:  # a result without a row or metric the target reads
                continue
            prefixes = [f"{model.removeprefix('GRAM ')}: " if model != "GRAM" else "" for model in grams]
            *values, bound = apart(target.metric, [value for value, _, _ in checks], checks[0][1])
            measured = "; ".join(f"{p}{value}" for p, value in zip(prefixes, values))
            met = "; ".join(f"{p}{'yes' if ok else 'no'}" for p, (_, _, ok) in zip(prefixes, checks))
            lines.append(f"| {label} | {result['budget']} | {target.text()} | {measured} | {bound} | {met} |")
    if not lines:
        return ""
    return "\n".join(["### Targets", "",
                      "Each reproduction's GRAM rows (the test split) against the targets the project set for it "
                      "from the paper's claims, in the tables' units; `best_rule@20` is the best of "
                      "`vote@20`, `lprm@20` and `halt@20`, and `T=t` the row scored at prior temperature `t`; a value that "
                      "would read like its bound is shown with more decimals. What was tried for a missed target is in docs/shortcut.md and the task's page under "
                      "docs/tasks/.", "",
                      "| task | budget | target | GRAM | bound | met |", "|---|---|---|---|---|---|", *lines])


def render(results: list[dict], checks: dict[str, dict]) -> str:
    """The whole of ``docs/results.md``: header, tables, targets, shortcut checks, footer."""
    header = (HERE / "results_header.md").read_text().rstrip("\n")
    footer = (HERE / "results_footer.md").read_text().rstrip("\n")
    body = "\n\n".join(part for part in (render_tables(results), render_targets(results),
                                          render_shortcut_checks(checks)) if part)
    return f"{header}\n\n{body}\n\n{footer}\n"


@command_line("results_table")
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results", help="folder of results JSON")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md", help="the markdown file")
    parser.add_argument("--check", action="store_true", help="exit 1 if --out is not the rendering")
    args = parser.parse_args(argv)
    text = render(load_results(args.results), load_shortcut_checks(args.results / SHORTCUT_FOLDER))
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"{args.out} is not the rendering of {args.results}/*.json: run python "
                  f"experiments/results_table.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
