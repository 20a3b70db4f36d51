"""Every task trains through the same command: one batch of a tiny model, then a prior-sampled
evaluation that produces the task's metrics."""

import csv

import pytest
from hydra import compose, initialize_config_dir

from gram_pyro.training import train
from tests.test_training import CONFIG_DIR

TINY_MODEL = ["model.dim=16", "model.ffn_hidden=16", "model.num_layers=1", "model.n_sup=2", "model.num_prefix=2",
              "trainer.batch_size=4", "trainer.max_batches=1", "trainer.eval_every=0", "trainer.eval_inputs=4",
              "trainer.eval_samples=2"]
SMALL_DATA = {
    "nqueens10": (["task.n=6", "task.removals=[2]"], ["accuracy", "coverage"]),
    "coloring": (["task.n=6", "task.num_train=20", "task.num_test=5"], ["accuracy", "conflicts", "coverage"]),
    "sudoku4": (["task.num_train=8", "task.num_test=4"], ["accuracy", "exact"]),
    "uncond_sudoku4": (["task.num_test=4"], ["validity", "uniqueness", "coverage"]),
    "digits": ([], ["well_formed", "inception_score", "fid"]),
    "arc1": (["task.max_tasks=3", "task.eval_augmentations=2"], ["pass@1", "pass@2"]),
}


@pytest.mark.parametrize("task", sorted(SMALL_DATA))
def test_every_task_trains_and_reports_its_metrics(tmp_path, task):
    overrides, metrics = SMALL_DATA[task]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name="train", overrides=[f"task={task}", *overrides, *TINY_MODEL])
    run = train(cfg, tmp_path / task, quiet=True)
    with (run / "eval.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and set(metrics) <= set(rows[0])
