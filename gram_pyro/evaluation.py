"""Evaluating a trained run: N prior trajectories per held-out input, one answer selected, the task's
metrics with 95% confidence intervals, and the files that let any other tool recompute them.

``load_run(run_dir)`` (:mod:`gram_pyro.run`) rebuilds task, model and guide from the run's ``config.yaml`` and loads the EMA
weights of its checkpoint (what training evaluates with). ``evaluate_run`` then samples with
:func:`gram_pyro.inference.sample_trajectories` and reports, for ``M`` inputs:

* ``<metric>`` (e.g. ``accuracy``, ``exact``, ``conflicts``): the task's per-input metric of the
  **selected** answer (``select``: vote | lprm | halt | first | smc, :mod:`gram_pyro.selection`);
* ``sample_<metric>``: the same metric averaged over all ``N`` answers of an input (one random sample);
* ``coverage@N``: distinct valid solutions among the ``N`` answers / all valid solutions, where the task
  defines coverage; ``pass@N``: some answer is correct (the oracle selector);
* set-level scores of all ``N x M`` answers that have no per-input form (``validity``, ``uniqueness``,
  ``inception_score``, ``fid``, ARC's voted ``pass@1``/``pass@2``, ``conflicts_total``).

With ``select=smc`` the ``N`` answers are the survivors of test-time SMC
(:mod:`gram_pyro.test_time_smc`: the same ``N`` trajectories, resampled between supervision steps by
the value or halt head) rather than independent trajectories, so ``sample_<metric>`` and ``coverage@N``
are those of the survivors; the report's ``smc`` entry holds the SMC options and, per step, the mean
ESS (``ess_by_step``) and the share of inputs resampled (``resampled_by_step``).

A per-input metric is reported as its mean with the normal-approximation 95% interval
``mean +- 1.96 * sd / sqrt(M)``; where inputs differ in their number of valid solutions the per-input
metrics are also broken down by that number (the paper's coverage figure).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch

from gram_pyro.config import UserError, first_line
from gram_pyro.inference import Trajectories, default_memory_budget_mb, result_bytes, sample_trajectories
from gram_pyro.nn import compile_networks, network_dtype, network_precision
from gram_pyro.run import LoadedRun
from gram_pyro.selection import select
from gram_pyro.test_time_smc import SMCResult, as_smc_options, smc_trajectories
from gram_pyro.tasks.base import held_out_index
from gram_pyro.tasks.cache import progress


def interval(values: torch.Tensor) -> dict:
    """``{"mean", "ci95": [low, high], "n"}`` of per-input values ``[M]`` (normal approximation)."""
    values = values.double()
    mean = values.mean().item()
    half = 1.96 * values.std().item() / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": len(values)}


def breakdown(per_input: dict[str, torch.Tensor], num_solutions: torch.Tensor) -> dict[str, dict]:
    """Per-input metrics averaged within each group of inputs with the same number of valid solutions."""
    groups = {}
    for count in torch.unique(num_solutions).tolist():
        rows = num_solutions == count
        groups[str(count)] = {"inputs": int(rows.sum()), **{k: v[rows].double().mean().item()
                                                           for k, v in per_input.items()}}
    return groups


def draw(model, x: torch.Tensor, num_samples: int, rule: str = "vote", smc=None, halting: bool = False,
         perturbation=None, **sampling) -> Trajectories | SMCResult:
    """The candidates of selection rule ``rule`` for inputs ``x [B, S]``: the survivors of test-time SMC
    (options ``smc``) for ``smc``, else ``num_samples`` independent trajectories; ``sampling`` as
    :func:`gram_pyro.inference.sample_trajectories`. SMC runs every trajectory to the full depth on the
    model's own noise: halting and perturbations are refused."""
    if rule != "smc":
        if smc is not None:
            raise UserError(f"smc options apply to select=smc, not select={rule}")
        return sample_trajectories(model, x, num_samples, halting=halting, perturbation=perturbation, **sampling)
    if halting or perturbation is not None:
        raise UserError("select=smc runs every trajectory to the full depth on the model's own noise: "
                        "it takes neither halting=true nor a perturbation")
    return smc_trajectories(model, x, num_samples, smc, **sampling)


def evaluate_run(loaded: LoadedRun, split: str = "test", num_inputs: int = 256, num_samples: int = 20,
                 depth: int | None = None, rule: str = "vote", halting: bool = False, seed: int = 0,
                 memory_budget_mb: float | None = None, perturbation=None, smc=None, prior_temperature: float = 1.0
                 ) -> tuple[dict, dict]:
    """``(report, arrays)``: the metrics (see the module docstring) and what ``samples.npz`` holds;
    ``smc``: the options of test-time SMC (:class:`gram_pyro.test_time_smc.SMCOptions` or a mapping of
    them) for ``rule="smc"``, default options where ``None``; ``prior_temperature`` as
    :func:`gram_pyro.inference.sample_trajectories`."""
    task, model = loaded.task, loaded.model
    if split not in task.splits:
        raise UserError(f"unknown split {split!r}; this task has: {', '.join(task.splits)}")
    data = task.splits[split]
    index = held_out_index(len(data), num_inputs, seed)
    x = data.inputs[index].to(loaded.device)
    puzzle = None if data.puzzles is None else data.puzzles[index].to(loaded.device)
    start = time.perf_counter()
    drawn = draw(model, x, num_samples, rule, smc, halting, perturbation, depth=depth, puzzle=puzzle,
                 memory_budget_mb=memory_budget_mb, seed=seed, prior_temperature=prior_temperature)
    seconds = time.perf_counter() - start
    paths = drawn.trajectories if isinstance(drawn, SMCResult) else drawn
    answers = paths.answers.cpu()
    value, halt_logit = paths.value.cpu(), paths.halt_logit.cpu()
    budget_mb = memory_budget_mb or default_memory_budget_mb(torch.device("cpu"))
    selected, chosen = select(rule, answers, value, halt_logit, memory_budget_mb=budget_mb)

    all_answers = task.per_input(split, index, answers)
    chosen_answer = task.per_input(split, index, selected[None])
    metrics = {k: interval(v) for k, v in chosen_answer.items() if k != "coverage"}
    metrics.update({f"sample_{k}": interval(v) for k, v in all_answers.items() if k != "coverage"})
    if "coverage" in all_answers:
        metrics[f"coverage@{num_samples}"] = interval(all_answers["coverage"])
    if not task.unconditional:  # some answer correct (the oracle selector); accuracy is the share correct
        metrics[f"pass@{num_samples}"] = interval((all_answers["accuracy"] > 0).double())
    for key, score in task.score(split, index, answers).items():
        if key not in all_answers:
            metrics[key] = score
    report = {"run": str(loaded.run_dir), "task": task.name, "split": split, "inputs": len(index),
              "samples": num_samples, "depth": depth or model.n_sup, "select": rule, "halting": halting,
              "seed": seed, "prior_temperature": prior_temperature,
              "perturbation": None if perturbation is None else dict(perturbation),
              "sampling_seconds": round(seconds, 3), "metrics": metrics}
    if isinstance(drawn, SMCResult):
        report["smc"] = {**dataclasses.asdict(as_smc_options(smc)), "ess_by_step": drawn.ess.mean(1).tolist(),
                         "resampled_by_step": drawn.resampled.double().mean(1).tolist()}
    num_solutions = getattr(data, "num_solutions", None)
    if num_solutions is not None and len(torch.unique(num_solutions[index])) > 1:
        per_input = {**{k: v for k, v in chosen_answer.items() if k != "coverage"},
                     **({f"coverage@{num_samples}": all_answers["coverage"]} if "coverage" in all_answers else {})}
        report["by_num_solutions"] = breakdown(per_input, num_solutions[index])
    arrays = {"index": index.numpy(), "inputs": data.inputs[index].numpy(), "answers": answers.numpy(),
              "selected": selected.numpy(), "chosen": chosen.numpy(), "value": value.numpy(),
              "halt_logit": halt_logit.numpy(), "steps": paths.steps.cpu().numpy()}
    if isinstance(drawn, SMCResult):
        arrays.update(ess=drawn.ess.cpu().numpy(), resampled=drawn.resampled.cpu().numpy())
    if num_solutions is not None:
        arrays["num_solutions"] = num_solutions[index].numpy()
    return report, arrays


def json_ready(value):
    """Plain JSON: NaN becomes ``None``, infinities the strings ``"inf"``/``"-inf"``, tuples lists."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def write_evaluation(report: dict, arrays: dict, out_dir: Path) -> None:
    """``metrics.json`` and ``samples.npz`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(json_ready(report), indent=1))
    np.savez_compressed(out_dir / "samples.npz", **arrays)


def format_table(report: dict) -> str:
    """The metrics as an aligned text table (mean and 95% interval)."""
    lines = [f"{report['task']} {report['split']}: {report['inputs']} inputs, N={report['samples']}, "
             f"depth={report['depth']}, select={report['select']}" + (", halting" if report["halting"] else "")
             + (f", prior temperature {report['prior_temperature']:g}" if report["prior_temperature"] != 1 else "")]
    for name, value in report["metrics"].items():
        if isinstance(value, dict):
            low, high = value["ci95"]
            lines.append(f"  {name:24s} {value['mean']:9.4f}   [{low:.4f}, {high:.4f}]")
        else:
            lines.append(f"  {name:24s} {value:9.4f}")
    if "smc" in report:
        smc = report["smc"]
        lines.append(f"  smc: tempering {smc['tempering']}, threshold {smc['threshold']}, potential "
                     f"{smc['potential']}; mean ESS by step " + " ".join(f"{e:.1f}" for e in smc["ess_by_step"]))
    return "\n".join(lines)


@contextmanager
def inference_speed(loaded: LoadedRun, precision: str, compile_mode: str):
    """Within the block the run's networks are compiled (``compile_mode``, one of
    :data:`gram_pyro.nn.COMPILE_MODES`; once, in place) and run their matmuls in the dtype of
    ``precision`` (:func:`gram_pyro.nn.network_dtype`; densities stay in the model's dtype)."""
    dtype = network_dtype(precision, loaded.device)
    compile_networks([loaded.model], compile_mode)
    with network_precision([loaded.model], dtype):
        yield


def _draw(loaded: LoadedRun, x: torch.Tensor, num_samples: int, rule: str = "vote", **sampling) -> Trajectories:
    """The ``num_samples`` candidates of selection rule ``rule`` (:func:`draw`) for inputs ``x [B, S]``."""
    if loaded.task.num_puzzles:
        raise UserError(f"task {loaded.task.name} needs puzzle identifiers, which user inputs do not carry")
    drawn = draw(loaded.model, x.to(loaded.device), num_samples, rule, **sampling)
    return drawn.trajectories if isinstance(drawn, SMCResult) else drawn


SOLVE_FIRST_BLOCK = 16
"""Inputs of ``solve``'s first block: its answers reach the file within seconds."""
SOLVE_LARGEST_BLOCK = 4096
"""Inputs of ``solve``'s largest block (blocks double up to it, or to what the memory budget holds)."""


def solve_blocks(total: int, largest: int) -> list[range]:
    """Consecutive blocks of ``total`` inputs: :data:`SOLVE_FIRST_BLOCK` inputs, then twice as many each
    time up to ``largest``, so that the first answers come fast and later blocks amortise the work
    per block (selection, formatting, writing)."""
    blocks, start, size = [], 0, min(SOLVE_FIRST_BLOCK, largest)
    while start < total:
        blocks.append(range(start, min(total, start + size)))
        start, size = start + size, min(2 * size, largest)
    return blocks


def verdicts_path(output: Path) -> Path:
    """Where ``solve`` writes the verdicts of a task whose answer lines are bare (``answers.txt`` ->
    ``answers.valid.txt``): one ``valid`` or ``invalid`` per answer, the same order."""
    return output.with_suffix(".valid" + output.suffix)


def solve_file(loaded: LoadedRun, source: Path, output: Path, num_samples: int, rule: str,
               memory_budget_mb: float | None = None, **sampling) -> tuple[int, int]:
    """Answer every puzzle of the user file ``source`` (the task's format) with the answer ``rule``
    selects among ``num_samples`` trajectories; write one line per puzzle, in the same format, to
    ``output``, and the judge's verdict of each either in its line or, where the task's answer lines
    are bare (``verdict_in_answer`` false: Sudoku grids), to :func:`verdicts_path`. The whole file is
    read (and checked) first; then the puzzles are answered in blocks (:func:`solve_blocks`, each at
    most what ``memory_budget_mb`` holds of results) whose lines are appended as each block finishes,
    with a progress bar. Each block samples with its ``first_row``, so the answers are those of the
    whole file at once. Returns ``(answers written, valid answers)``."""
    task = loaded.task
    if task.unconditional:
        raise UserError(f"task {task.name} is unconditional: draw samples with gram-pyro sample run=<dir>")
    verdicts = None if task.verdict_in_answer else verdicts_path(output)
    for path in (output, verdicts):
        if path is not None and path.resolve() == source.resolve():
            raise UserError(f"output={output} would overwrite the input file")
    x = task.read_inputs(source)
    budget_mb = memory_budget_mb or default_memory_budget_mb(torch.device("cpu"))
    largest = max(1, min(SOLVE_LARGEST_BLOCK, int(budget_mb * 2**20 // result_bytes(num_samples, 1, x.shape[1], 0))))
    valid = 0
    try:
        with output.open("w") as handle, ExitStack() as stack, \
                progress(total=len(x), desc=f"solve {source.name}") as bar:
            verdict_handle = None if verdicts is None else stack.enter_context(verdicts.open("w"))
            for rows in solve_blocks(len(x), largest):
                block = x[rows.start:rows.stop]
                paths = _draw(loaded, block, num_samples, rule=rule, memory_budget_mb=memory_budget_mb,
                              first_row=rows.start, **sampling)
                selected, _ = select(rule, paths.answers.cpu(), paths.value.cpu(), paths.halt_logit.cpu(),
                                     memory_budget_mb=budget_mb)
                handle.write("".join(task.format_answer(puzzle, answer) + "\n"
                                     for puzzle, answer in zip(block, selected)))
                handle.flush()
                judged = task.judge(block, selected)
                if verdict_handle is not None:
                    verdict_handle.write("".join("valid\n" if ok else "invalid\n" for ok in judged.tolist()))
                    verdict_handle.flush()
                valid += int(judged.sum())
                bar.update(len(rows))
    except OSError as error:
        raise UserError(f"output={output}: cannot write it ({error.strerror or first_line(error)})") from None
    return len(x), valid


def sample_unconditional(loaded: LoadedRun, num_samples: int, out_dir: Path, **sampling) -> list[Path]:
    """Draw ``num_samples`` answers to the blank input of an unconditional task; write ``samples.txt`` (one
    answer per line in the task's format, or ``#``/``.`` rows for images), ``scores.json`` (the task's
    set-level scores of the samples) and, for images and grids (``task.box``), ``samples.png``. Returns
    the written paths."""
    task = loaded.task
    if not task.unconditional:
        raise UserError(f"task {task.name} answers inputs: use gram-pyro solve run=<dir> input=<file>")
    x = task.splits["test"].inputs[:1]
    answers = _draw(loaded, x, num_samples, **sampling).answers.cpu()  # [num_samples, 1, S]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "samples.txt", out_dir / "scores.json"]
    if task.image_side:
        side = task.image_side
        bits = (answers[:, 0] == answers.new_tensor(2)).view(num_samples, side, side)
        text = "\n\n".join("\n".join("".join("#" if b else "." for b in row) for row in image.tolist())
                           for image in bits)
        written.append(out_dir / "samples.png")
        _image_sheet(bits, written[-1])
    else:
        text = "\n".join(task.format_answer(x[0], answer) for answer in answers[:, 0])
        if task.box:
            written.append(out_dir / "samples.png")
            _grid_sheet(text.splitlines(), task.box, task.judge(x.expand(num_samples, -1), answers[:, 0]), written[-1])
    written[0].write_text(text + "\n")
    scores = task.score("test", torch.zeros(1, dtype=torch.long), answers)
    written[1].write_text(json.dumps(json_ready({"samples": num_samples, **scores}), indent=1))
    return written


GRID_SHEET_MAX = 16
"""Grids drawn on a ``samples.png`` sheet (the first ones drawn; ``samples.txt`` holds all)."""


def _grid_sheet(lines: list[str], box: tuple[int, int], valid: torch.Tensor, path: Path, columns: int = 4) -> None:
    """A PNG sheet of the first :data:`GRID_SHEET_MAX` grids given as answer lines (one character per
    cell, row by row), ``columns`` a row: the digits in their cells, box borders thick, each grid titled
    ``valid`` (black) or ``invalid`` (red) by ``valid [n]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines, side = lines[:GRID_SHEET_MAX], box[0] * box[1]
    columns = min(len(lines), columns)
    rows = math.ceil(len(lines) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(0.3 * side * columns + 0.4, (0.3 * side + 0.4) * rows),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, line in enumerate(lines):
        ax = axes.flat[i]
        ax.set_xlim(0, side), ax.set_ylim(side, 0), ax.set_aspect("equal")
        for k in range(side + 1):
            ax.axhline(k, color="black", linewidth=1.6 if k % box[0] == 0 else 0.4)
            ax.axvline(k, color="black", linewidth=1.6 if k % box[1] == 0 else 0.4)
        for cell, char in enumerate(line):
            ax.text(cell % side + 0.5, cell // side + 0.5, char, ha="center", va="center", fontsize=7)
        ok = bool(valid[i])
        ax.set_title("valid" if ok else "invalid", fontsize=7, color="black" if ok else "red")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _image_sheet(bits: torch.Tensor, path: Path, columns: int = 8) -> None:
    """A PNG mosaic of binary images ``[n, side, side]``: white strokes on black, ``columns`` a row, each
    image framed by a one-pixel grey line, every pixel a square of 8 x 8 screen pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, side = len(bits), bits.shape[-1]
    columns = min(n, columns)
    rows = math.ceil(n / columns)
    mosaic = torch.full((rows * (side + 1) + 1, columns * (side + 1) + 1), 0.5)
    for i, image in enumerate(bits.float()):
        top, left = 1 + (i // columns) * (side + 1), 1 + (i % columns) * (side + 1)
        mosaic[top:top + side, left:left + side] = image
    plt.imsave(path, mosaic.repeat_interleave(8, 0).repeat_interleave(8, 1).numpy(), cmap="gray", vmin=0, vmax=1)