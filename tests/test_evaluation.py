"""gram-pyro eval / solve / sample on tiny trained runs: files written, metrics recomputable, errors."""

import json

import numpy as np
import pytest
import torch

from gram_pyro import evaluation
from gram_pyro.cli import main
from gram_pyro.evaluation import interval
from gram_pyro.run import load_run
from gram_pyro.training import train
from tests.helpers import TINY_MODEL, tiny_config


@pytest.fixture(scope="module")
def nqueens_run(tmp_path_factory):
    return train(tiny_config("trainer.max_batches=2"), tmp_path_factory.mktemp("runs") / "nqueens", quiet=True)


def test_interval_is_the_normal_approximation():
    values = torch.tensor([0.0, 1.0, 1.0, 1.0])
    result = interval(values)
    half = 1.96 * values.std().item() / 2
    assert result["mean"] == 0.75 and result["n"] == 4
    assert result["ci95"] == pytest.approx([0.75 - half, 0.75 + half])


def test_eval_writes_metrics_that_the_samples_reproduce(nqueens_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", f"run={nqueens_run}", "samples=3", "inputs=6", "depth=3", "select=first",
                 f"out={out}"]) == 0
    assert "coverage@3" in capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    saved = np.load(out / "samples.npz")
    assert saved["answers"].shape == (3, 6, 36) and report["depth"] == 3
    task = load_run(nqueens_run).task
    inputs, answers = torch.from_numpy(saved["inputs"]), torch.from_numpy(saved["answers"])
    assert torch.equal(torch.from_numpy(saved["selected"]), answers[0])  # select=first
    valid = task.judge(inputs, answers).double()
    assert report["metrics"]["sample_accuracy"]["mean"] == pytest.approx(valid.mean().item())
    assert report["metrics"]["accuracy"]["mean"] == pytest.approx(valid[0].mean().item())
    assert report["metrics"]["pass@3"]["mean"] == pytest.approx(valid.amax(0).mean().item())


def test_eval_at_a_prior_temperature_records_it_and_refuses_a_bad_one(nqueens_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for rule in ("vote", "smc"):  # near zero every trajectory (every SMC survivor) follows the prior's mean
        assert main(["eval", f"run={nqueens_run}", "samples=4", "inputs=6", f"select={rule}",
                     "prior_temperature=1e-6"]) == 0
        assert "prior temperature 1e-06" in capsys.readouterr().out
        out = nqueens_run / "eval" / f"test-N4-d{load_run(nqueens_run).model.n_sup}-{rule}-T1e-06"
        answers = np.load(out / "samples.npz")["answers"]
        assert json.loads((out / "metrics.json").read_text())["prior_temperature"] == 1e-6
        assert (answers == answers[:1]).all()
    assert main(["eval", f"run={nqueens_run}", "samples=4", "inputs=6", "prior_temperature=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "prior_temperature=0" in err and "above 0" in err


def test_solve_round_trips_a_user_file(nqueens_run, tmp_path, capsys):
    source = tmp_path / "boards.jsonl"
    source.write_text('{"n": 6, "queens": [[0, 1]]}\n# a comment\n{"n": 6, "queens": []}\n')
    assert main(["solve", f"run={nqueens_run}", f"input={source}", "samples=2"]) == 0
    lines = (tmp_path / "boards.answers.jsonl").read_text().splitlines()
    assert [json.loads(line)["queens"] for line in lines] == [[[0, 1]], []]
    assert all(isinstance(json.loads(line)["valid"], bool) for line in lines)
    assert "wrote 2 answers" in capsys.readouterr().out
    source.write_text('{"n": 6, "queens": [[0, 1]]}\n{"n": 6, "queens": [[9, 9]]}\n')
    assert main(["solve", f"run={nqueens_run}", f"input={source}", f"output={source}"]) == 2
    assert main(["solve", f"run={nqueens_run}", f"input={source}"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert "would overwrite the input" in errors[0] and "boards.jsonl:2: queen (9, 9) is off" in errors[1]


def test_solve_writes_bare_sudoku_grids_and_their_verdicts_beside_them(tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from gram_pyro.tasks.sudoku import format_answer
    from tests.helpers import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name="train", overrides=["task=sudoku", "task.size=4", "task.num_train=8",
                                                      "task.num_test=4", "task.extreme_pool=0",
                                                      "task.num_extreme=0", *TINY_MODEL])
    run = train(cfg, tmp_path / "sudoku", quiet=True)
    task = load_run(run).task
    puzzles = task.splits["test"].inputs[:3]
    source = tmp_path / "puzzles.txt"
    source.write_text("".join(format_answer(p) + "\n" for p in puzzles))
    assert main(["solve", f"run={run}", f"input={source}", "samples=2"]) == 0
    answers = (tmp_path / "puzzles.answers.txt").read_text().splitlines()
    verdicts = (tmp_path / "puzzles.answers.valid.txt").read_text().splitlines()
    assert len(answers) == len(verdicts) == 3 and all(len(line) == 16 for line in answers)
    tokens = torch.tensor([[int(c) + 1 if c.isdigit() else 0 for c in line] for line in answers])
    assert verdicts == ["valid" if ok else "invalid" for ok in task.judge(puzzles, tokens).tolist()]
    assert f"their verdicts to {tmp_path / 'puzzles.answers.valid.txt'}" in capsys.readouterr().out


def test_solve_in_bf16_answers_like_fp32_up_to_rounding(nqueens_run, tmp_path):
    source = boards_file(tmp_path / "boards.jsonl", 12)
    common = [f"run={nqueens_run}", f"input={source}", "samples=1", "select=first", "seed=3"]
    assert main(["solve", *common, f"output={tmp_path / 'fp32.jsonl'}"]) == 0
    assert main(["solve", *common, "precision=bf16", f"output={tmp_path / 'bf16.jsonl'}"]) == 0
    fp32, bf16 = ([json.loads(line)["answer"] for line in (tmp_path / name).read_text().splitlines()]
                  for name in ("fp32.jsonl", "bf16.jsonl"))
    assert len(bf16) == 12 and sum(a == b for a, b in zip(fp32, bf16)) >= 9  # bf16 flips few argmaxes


def boards_file(path, count: int):
    """``count`` 6x6 N-Queens boards (of one or no queen) as a JSON Lines file."""
    lines = [json.dumps({"n": 6, "queens": [[i % 6, (i // 6) % 6]] if i % 7 else []}) for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_solve_streams_blocks_whose_answers_are_those_of_the_whole_file(nqueens_run, tmp_path, monkeypatch,
                                                                      one_thread):
    source = boards_file(tmp_path / "boards.jsonl", 40)
    common = [f"run={nqueens_run}", f"input={source}", "samples=3", "select=vote", "seed=5"]
    assert main(["solve", *common, f"output={tmp_path / 'whole.jsonl'}"]) == 0  # blocks of 16 and 24
    on_disk = []
    real = evaluation._draw

    def drawn(loaded, x, samples, **sampling):  # what the output file holds when each block starts
        on_disk.append(len((tmp_path / "blocks.jsonl").read_text().splitlines()))
        return real(loaded, x, samples, **sampling)

    monkeypatch.setattr(evaluation, "_draw", drawn)
    monkeypatch.setattr(evaluation, "SOLVE_FIRST_BLOCK", 3)
    monkeypatch.setattr(evaluation, "SOLVE_LARGEST_BLOCK", 8)
    assert main(["solve", *common, f"output={tmp_path / 'blocks.jsonl'}", "memory_budget_mb=0.01"]) == 0
    assert on_disk == [0, 3, 9, 17, 25, 33]  # blocks of 3, 6, 8, 8, 8, 7: each written as it finished
    assert (tmp_path / "blocks.jsonl").read_text() == (tmp_path / "whole.jsonl").read_text()


def test_solve_blocks_double_up_to_the_largest():
    assert [len(block) for block in evaluation.solve_blocks(100, 40)] == [16, 32, 40, 12]
    assert [len(block) for block in evaluation.solve_blocks(5, 2)] == [2, 2, 1]
    assert evaluation.solve_blocks(0, 8) == []


def test_sample_writes_grids_and_scores_for_an_unconditional_task(tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from tests.helpers import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name="train", overrides=["task=uncond_sudoku4", "task.num_test=4", *TINY_MODEL])
    run = train(cfg, tmp_path / "uncond", quiet=True)
    assert main(["sample", f"run={run}", "samples=5"]) == 0
    lines = (run / "samples" / "samples.txt").read_text().splitlines()
    assert len(lines) == 5 and all(len(line) == 16 for line in lines)  # bare 4x4 grids, one a line
    assert (run / "samples" / "samples.png").stat().st_size > 1000
    assert set(json.loads((run / "samples" / "scores.json").read_text())) >= {"validity", "uniqueness"}
    assert main(["sample", f"run={tmp_path / 'uncond'}", "samples=0"]) == 2
    assert main(["sample", f"run={tmp_path / 'uncond'}", "n=5"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert "samples=0; allowed: an integer >= 1" in errors[0]
    assert "n= is now called samples=: use samples=5" in errors[1]


def test_image_sheet_lays_out_the_images_in_framed_tiles(tmp_path):
    import matplotlib.image

    from gram_pyro.evaluation import _image_sheet

    bits = torch.zeros(3, 2, 2, dtype=torch.bool)
    bits[1, 0, 1] = True  # image 1, top right pixel
    _image_sheet(bits, tmp_path / "sheet.png", columns=2)
    sheet = matplotlib.image.imread(tmp_path / "sheet.png")[::8, ::8, 0]  # one value per image pixel
    assert sheet.shape == (2 * 3 + 1, 2 * 3 + 1)  # 2 rows x 2 columns of 2x2 tiles, 1-pixel frames
    assert sheet[1, 5] == 1.0 and sheet[1, 4] == 0.0 and sheet[4, 4] == pytest.approx(0.5, abs=0.01)
    assert sheet[0].tolist() == pytest.approx([sheet[0, 0]] * 7) and 0.4 < sheet[0, 0] < 0.6


def test_sample_on_a_conditional_task_points_to_solve(nqueens_run, capsys):
    assert main(["sample", f"run={nqueens_run}"]) == 2
    assert "use gram-pyro solve" in capsys.readouterr().err


def test_scaling_sweep_reads_every_point_off_one_recorded_run(nqueens_run, tmp_path):
    import csv

    from gram_pyro.experiments.scaling import main as scaling

    trm = train(tiny_config("trainer.max_batches=1", "model=trm", "guide=prior"), tmp_path / "trm", quiet=True)
    scaling([f"runs.GRAM={nqueens_run}", f"runs.TRM={trm}", "baselines=[ptrm]", "inputs=4", "samples=[1,3]",
             "depths=[1,3]", f"out={tmp_path / 'sweep'}"])
    with (tmp_path / "sweep" / "scaling.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * 2 * 2 and (tmp_path / "sweep" / "scaling.png").is_file()
    trm_rows = {(r["samples"], r["depth"]): r for r in rows if r["label"] == "TRM"}
    assert trm_rows[("1", "3")]["accuracy"] == trm_rows[("3", "3")]["accuracy"]  # N identical copies
    assert trm_rows[("3", "3")]["compute"] == "6"  # one trajectory of 3 steps x T = 2, whatever N
    gram = {(r["samples"], r["depth"]): r for r in rows if r["label"] == "GRAM"}
    assert gram[("3", "3")]["compute"] == "18"


def test_diagnose_writes_the_inference_data_report_and_figures(tmp_path, capsys):
    run = train(tiny_config("trainer.max_batches=2", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=true"),
                tmp_path / "kept", quiet=True)
    assert main(["diagnose", f"run={run}", "inputs=4", "particles=4", "samples=2"]) == 0
    out = run / "diagnostics"
    assert (out / "diagnostics.nc").is_file() and (out / "report.md").is_file()
    assert any(out.glob("*.png")) and "wrote" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"] == 4


def test_a_run_saved_before_newer_trainer_and_objective_keys_still_loads(nqueens_run, tmp_path):
    import shutil

    from omegaconf import OmegaConf

    from gram_pyro.config import _translate_trainer

    old = tmp_path / "old"
    shutil.copytree(nqueens_run, old)
    cfg = OmegaConf.load(old / "config.yaml")
    del cfg.trainer["keep_checkpoints"], cfg.trainer["precision"]
    cfg.trainer.bf16, cfg.trainer.compile = False, False  # the keys before precision and compile modes
    cfg.model._target_ = "models.RecursiveReasoningModel"  # the classes before the gram_pyro namespace
    cfg.guide._target_ = cfg.guide._target_.removeprefix("gram_pyro.")
    del cfg.objective["prior_rollouts"]  # an objective option added since
    OmegaConf.save(cfg, old / "config.yaml")
    run = load_run(old)
    loaded = run.cfg.trainer
    assert (loaded.precision, loaded.compile, "bf16" in loaded) == ("fp32", "none", False)
    assert run.cfg.objective.prior_rollouts == 1
    assert (run.cfg.model._target_, run.cfg.guide._target_) == ("gram_pyro.models.RecursiveReasoningModel",
                                                                "gram_pyro.guides.TargetConditionedGaussian")
    translated = _translate_trainer(OmegaConf.create({"bf16": True, "compile": True}))
    assert dict(translated) == {"precision": "auto", "compile": "default"}
    assert main(["train", f"resume={old}", "trainer.max_batches=3"]) == 0
