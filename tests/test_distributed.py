"""Data-parallel training: two gloo processes on localhost train the same parameters as one process
with the same global batch and seed."""

import subprocess
import sys

import pytest
import torch

from gram_pyro.checkpoint import load_checkpoint
from gram_pyro.config import UserError
from gram_pyro.distributed import World, join
from gram_pyro.run import Run
from gram_pyro.training import train
from tests.helpers import TINY, tiny_config

# a deterministic model (TRM), so that one process and two ranks draw no different noise; 7 rows per
# global batch, so the two ranks hold 4 and 3 (an uneven split); gloo ranks on the CPU, also where a GPU is
OVERRIDES = ["model=trm", "guide=prior", "trainer.batch_size=7", "trainer.max_batches=3", "trainer.log_every=1",
             "trainer.device=cpu"]


def torchrun(*args: str) -> None:
    """``gram-pyro <args>`` on two gloo ranks; on failure, shows what the ranks printed (the launcher's
    own report, which follows it, names only exit codes)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "gram_pyro.cli", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    ranks_output = result.stderr.split("failed (exitcode")[0]
    assert result.returncode == 0, ranks_output[-6000:] + result.stdout[-2000:]


def test_two_gloo_ranks_train_the_parameters_of_one_process(tmp_path):
    single = train(tiny_config(*OVERRIDES), tmp_path / "single", quiet=True)
    torchrun("train", *TINY, *OVERRIDES, f"run_dir={tmp_path / 'ddp'}")
    ours = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    reference = load_checkpoint(single / "checkpoint.pt")
    assert ours["batches_done"] == reference["batches_done"] == 3
    initial = Run(tiny_config(*OVERRIDES)).model.state_dict()
    assert any(not torch.allclose(initial[name], value) for name, value in reference["model"].items())
    for name, value in reference["model"].items():
        assert torch.allclose(ours["model"][name], value, atol=1e-5, rtol=1e-4), name


def test_a_single_process_checkpoint_resumes_on_two_ranks(tmp_path):
    straight = train(tiny_config(*OVERRIDES), tmp_path / "straight", quiet=True)
    two_batches = [o for o in OVERRIDES if not o.startswith("trainer.max_batches=")] + ["trainer.max_batches=2"]
    first = train(tiny_config(*two_batches), tmp_path / "resumed", quiet=True)
    torchrun("train", f"resume={first}", "trainer.max_batches=3")
    ours, reference = load_checkpoint(first / "checkpoint.pt"), load_checkpoint(straight / "checkpoint.pt")
    assert ours["batches_done"] == 3
    for name, value in reference["model"].items():
        assert torch.allclose(ours["model"][name], value, atol=1e-5, rtol=1e-4), name


def test_more_cuda_ranks_per_node_than_gpus_is_one_line(monkeypatch):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    with pytest.raises(UserError, match=r"^2 or more processes per node on CUDA, but this node has 1 GPU\(s\)"):
        join(World(rank=1, size=2, local_rank=1), torch.device("cuda"))
