"""Tiny training configs the test modules share: the config directory, the tiny n-queens overrides
``TINY`` and :func:`tiny_config` composed from them, and ``TINY_MODEL``, the tiny model and trainer
overrides that any task can take."""

from pathlib import Path

from hydra import compose, initialize_config_dir

import gram_pyro.experiments.configs

CONFIG_DIR = str(Path(gram_pyro.experiments.configs.__file__).parent)
TINY = ["task.n=6", "task.removals=[2,3]", "model.dim=16", "model.ffn_hidden=16", "model.num_layers=1",
        "model.n_sup=2", "model.num_prefix=2", "trainer.batch_size=8", "trainer.log_every=1",
        "trainer.eval_every=0", "trainer.eval_inputs=4", "trainer.eval_samples=2", "trainer.warmup_steps=2"]
TINY_MODEL = ["model.dim=16", "model.ffn_hidden=16", "model.num_layers=1", "model.n_sup=2", "model.num_prefix=2",
              "trainer.batch_size=4", "trainer.max_batches=1", "trainer.eval_every=0", "trainer.eval_inputs=4",
              "trainer.eval_samples=2"]


def tiny_config(*overrides):
    """The train config on the tiny n-queens task (``TINY``), then ``overrides``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="train", overrides=[*TINY, *overrides])
