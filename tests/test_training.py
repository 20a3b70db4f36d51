"""Training runs end to end: config composition, exact resume, and one-line errors for bad input."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gram_pyro.cli import main
from gram_pyro.config import UserError, group_options
from gram_pyro.run import lr_factor
from gram_pyro.training import config_differences, train, train_or_keep
from tests.helpers import TINY, tiny_config


def losses(run_dir: Path) -> list[str]:
    with (run_dir / "metrics.csv").open() as f:
        return [row["loss"] for row in csv.DictReader(f)]


def test_configs_compose_for_every_model_guide_and_objective():
    for model in ("gram", "trm", "zero_mean", "fixed_noise"):
        assert tiny_config(f"model={model}").model.noise in ("learned", "none", "zero_mean", "fixed")
    assert tiny_config("objective=tracemeanfield_elbo").objective.elbo == "TraceMeanField_ELBO"
    assert tiny_config("guide=prior").guide._target_ == "gram_pyro.guides.PriorGuide"


def test_resume_continues_exactly(tmp_path):
    straight = train(tiny_config("trainer.max_batches=4"), tmp_path / "straight", quiet=True)
    first = train(tiny_config("trainer.max_batches=2"), tmp_path / "resumed", quiet=True)
    train(tiny_config("trainer.max_batches=4"), first, resume=True, quiet=True)
    assert len(losses(straight)) == 4
    assert losses(first) == losses(straight)
    with (first / "metrics.csv").open() as f:  # training time since batch 0, across the two invocations
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    assert seconds == sorted(seconds) and seconds[0] > 0
    assert torch.load(first / "checkpoint.pt", weights_only=True)["seconds"] >= seconds[-1]


def test_resuming_a_finished_run_changes_none_of_its_rows(tmp_path):
    run = train(tiny_config("trainer.max_batches=2"), tmp_path / "done", quiet=True)
    rows = {name: (run / f"{name}.csv").read_text() for name in ("metrics", "eval")}
    assert rows["eval"].count("\n") == 2  # header and the final evaluation at batch 2
    train(tiny_config("trainer.max_batches=2"), run, resume=True, quiet=True)
    assert {name: (run / f"{name}.csv").read_text() for name in rows} == rows



def test_each_batch_and_evaluation_runs_with_the_threads_threads_gives(tmp_path, monkeypatch, one_thread):
    """Runs side by side hand a finished run's cores to the others: ``threads`` is asked before every
    batch and every evaluation."""
    from gram_pyro import training

    seen = []
    train_batch, evaluate = training.train_batch, training.evaluate

    def recorded(name, function):
        def call(*args, **kwargs):
            seen.append((name, torch.get_num_threads()))
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(training, "train_batch", recorded("batch", train_batch))
    monkeypatch.setattr(training, "evaluate", recorded("eval", evaluate))
    offered = iter([1, 3, 2, 2])
    train(tiny_config("trainer.max_batches=2", "trainer.eval_every=1", "trainer.threads=1"), tmp_path / "run",
          quiet=True, threads=lambda: next(offered))
    assert seen == [("batch", 1), ("eval", 3), ("batch", 2), ("eval", 2)]


def test_lr_factor_warms_up_then_follows_the_schedule():
    """Warm-up of 4 steps, then 8 more: constant stays at 1; cosine halves the way to ``final`` at the
    middle and ends on it (0.1 + 0.9 (1 + cos(pi / 2)) / 2 = 0.55)."""
    constant = [lr_factor(step, 4, 12, "constant", 0.1) for step in range(14)]
    assert constant[:4] == [0.25, 0.5, 0.75, 1.0] and constant[4:] == [1.0] * 10
    cosine = [lr_factor(step, 4, 12, "cosine", 0.1) for step in range(14)]
    assert cosine[:4] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(cosine[8], 0.55) and math.isclose(cosine[12], 0.1) and math.isclose(cosine[13], 0.1)
    assert all(a > b for a, b in zip(cosine[4:13], cosine[5:13]))


def test_a_cosine_run_ends_at_lr_final_and_is_not_continued_to_another_length(tmp_path):
    """The logged rate of a cosine run falls to ``lr_final x lr`` at its last batch; a run directory of
    another length is another schedule, so ``train_or_keep`` refuses it (a constant-rate run is continued)."""
    cfg = tiny_config("trainer.max_batches=6", "trainer.warmup_steps=0", "trainer.lr_schedule=cosine",
                      "trainer.lr_final=0.2", "trainer.lr=0.01")
    run = train(cfg, tmp_path / "cosine", quiet=True)
    with (run / "metrics.csv").open() as f:
        rates = [float(row["lr"]) for row in csv.DictReader(f)]
    assert all(a > b for a, b in zip(rates, rates[1:])) and math.isclose(rates[-1], 0.002), rates
    longer = tiny_config("trainer.max_batches=8", "trainer.warmup_steps=0", "trainer.lr_schedule=cosine",
                         "trainer.lr_final=0.2", "trainer.lr=0.01")
    assert config_differences(cfg, longer) == ["trainer.max_batches"]
    assert config_differences(tiny_config("trainer.max_batches=6"), tiny_config("trainer.max_batches=8")) == []
    with pytest.raises(UserError, match="differs in trainer.max_batches"):
        train_or_keep("cosine", longer, run, quiet=True)


def test_trace_elbo_objective_trains(tmp_path):
    """Pyro's Trace_ELBO through the trainer, seed 0, lr 0.01, 4 batches. Measured: loss 3.371 -> 2.431
    (x 0.72; with lr=0 it ends at 3.413, x 1.01), halt and value losses falling at every batch (constant
    with lr=0: they do not depend on the data here), the logged loss the sum of its parts, and the guide
    off the prior (eval KL 0.18 nats per token; 0 untrained, the guide starts at the prior)."""
    run = train(tiny_config("trainer.max_batches=4", "trainer.lr=0.01", "objective=trace_elbo"), tmp_path / "elbo",
                quiet=True)
    with (run / "metrics.csv").open() as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    assert [row["batch"] for row in rows] == [1, 2, 3, 4] and (run / "checkpoint.pt").is_file()
    for row in rows:  # halt_weight = value_weight = 1
        assert math.isclose(row["loss"], row["neg_elbo"] + row["halt"] + row["value"], abs_tol=1e-5), row
        assert row["halt"] > 0 and 0 <= row["value"] <= 1 and 0 <= row["acc"] <= 1  # BCE, squared error, share
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"], rows
    for key in ("halt", "value"):
        assert all(a[key] > b[key] for a, b in zip(rows, rows[1:])), [row[key] for row in rows]
    with (run / "eval.csv").open() as f:
        (scores,) = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    assert 0 <= scores["accuracy"] <= 1 and 0 <= scores["coverage"] <= 1
    assert 0.05 < scores["kl_per_token"] < 1, scores
    model = tiny_config().model
    per_transition = [[scores[f"kl_per_token/{n}/{t}"] for t in range(model.transitions)] for n in range(model.n_sup)]
    assert math.isclose(sum(map(sum, per_transition)), scores["kl_per_token"], rel_tol=1e-6), per_transition
    assert all(step[-1] != 0 and not any(step[:-1]) for step in per_transition), per_transition  # posterior: the last


@pytest.mark.parametrize("override, message", [
    ("task=chess", f"unknown task 'chess'; allowed: {', '.join(group_options('task'))}"),
    ("model=transformer", f"unknown model 'transformer'; allowed: {', '.join(group_options('model'))}"),
    ("guide=oracle", f"unknown guide 'oracle'; allowed: {', '.join(group_options('guide'))}"),
    ("trainer.learning_rate=1", "unknown config key 'trainer.learning_rate'; allowed: device, seed, batch_size"),
    ("model.noise=loud", "bad model config: unknown noise 'loud'"),
    ("trainer.device=tpu", "unknown trainer.device 'tpu'; allowed: auto, cpu, cuda"),
    ("trainer.batch_size=-3", "trainer.batch_size=-3 is out of range; allowed: >= 1"),
    ("trainer.ema_decay=1.5", "trainer.ema_decay=1.5 is out of range; allowed: in [0, 1]"),
    ("trainer.lr=fast", "trainer.lr='fast' is not a number"),
    ("trainer.betas=[0.9]", "trainer.betas=[0.9] must be two numbers in [0, 1)"),
    ("trainer.betas=0.9", "trainer.betas=0.9 must be two numbers in [0, 1)"),
    ("trainer.lr_schedule=linear", "unknown trainer.lr_schedule 'linear'; allowed: constant, cosine"),
    ("trainer.lr_final=2", "trainer.lr_final=2 is out of range; allowed: in [0, 1]"),
    ("trainer.spike_factor=0.5", "trainer.spike_factor=0.5 is out of range; allowed: >= 1"),
])
def test_bad_config_is_one_line_and_exit_2(capsys, override, message):
    assert main(["train", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_cuda_without_cuda_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["train", "trainer.device=cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_truncated_checkpoint_is_one_line_and_keeps_the_file(tmp_path, capsys):
    run = train(tiny_config("trainer.max_batches=1"), tmp_path / "run", quiet=True)
    checkpoint = run / "checkpoint.pt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    assert main(["train", f"resume={run}", "trainer.max_batches=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unreadable" in err and str(checkpoint) in err
    assert checkpoint.stat().st_size == len(data) // 2  # nothing overwritten


def test_command_line_error_has_no_traceback():
    result = subprocess.run([sys.executable, "-m", "gram_pyro.cli", "train", "task=nope"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"gram-pyro: error: unknown task 'nope'; allowed: {', '.join(group_options('task'))}"]


def test_ema_warms_up_then_uses_its_decay():
    from torch import nn

    from gram_pyro.run import EMA

    layer = nn.Linear(1, 1, bias=False)
    ema = EMA([layer], decay=0.999)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    ema.shadow[0].zero_()
    ema.update()  # d_0 = 1/10: the average moves 90% of the way
    assert torch.allclose(ema.shadow[0], torch.tensor([[0.9]]))
    ema.updates = 100_000
    assert ema.current_decay() == 0.999
    with ema.applied():
        assert torch.allclose(layer.weight, ema.shadow[0])
    assert torch.equal(layer.weight, torch.ones(1, 1))


def test_non_finite_losses_are_skipped_then_stop_the_run_without_a_poisoned_checkpoint(tmp_path, monkeypatch):
    from gram_pyro.config import UserError
    from gram_pyro.objectives import TruncatedSurrogate

    from gram_pyro.checkpoint import load_checkpoint

    run_dir = train(tiny_config("trainer.max_batches=1"), tmp_path / "run", quiet=True)
    good = load_checkpoint(run_dir / "checkpoint.pt")["model"]
    real_loss = TruncatedSurrogate.loss

    def poisoned(self, *args):
        loss, metrics = real_loss(self, *args)
        return loss * float("nan"), metrics

    monkeypatch.setattr(TruncatedSurrogate, "loss", poisoned)
    with pytest.raises(UserError, match="non-finite"):
        train(tiny_config("trainer.max_batches=3", "trainer.max_bad_steps=2", "trainer.checkpoint_every=1"),
              run_dir, resume=True, quiet=True)
    saved = load_checkpoint(run_dir / "checkpoint.pt")
    assert saved["bad_steps"] == 2  # the first batch's two updates were skipped and counted
    for name, value in saved["model"].items():
        assert torch.isfinite(value).all() and torch.equal(value, good[name]), name


def test_the_spike_guard_skips_a_lone_update_far_above_its_running_gradient_norm():
    from types import SimpleNamespace

    from gram_pyro.training import gradient_spike

    run = SimpleNamespace(grad_norm_mean=torch.full((2,), math.nan), spiked=torch.zeros(2, dtype=torch.bool))
    seen = []
    for update, norm, finite in [(0, 2.0, True), (1, 50.0, True), (0, 2.2, True), (0, math.inf, False),
                                 (0, 50.0, True), (0, 60.0, True), (0, 70.0, True), (1, 60.0, True)]:
        spike = gradient_spike(run, update, torch.tensor(norm), torch.tensor(finite), factor=10.0)
        seen.append((bool(spike), run.grad_norm_mean.tolist()))
    # the infinite loss is neither taken nor a spike; 50 is update 1's usual, update 0's 50 is a spike, 60
    # right after it is taken (a lasting rise), 70 after that taken 60 is a spike again
    assert [spike for spike, _ in seen] == [False, False, False, False, True, False, True, False]
    first = 0.99 * 2.0 + 0.01 * 2.2  # update 0's mean starts at its first norm
    followed = 0.99 * first + 0.01 * 60
    assert [means[0] for _, means in seen] == pytest.approx([2.0, 2.0, first, first, first, followed, followed,
                                                              followed])
    assert seen[-1][1][1] == pytest.approx(0.99 * 50 + 0.01 * 60)
    assert run.spiked.tolist() == [True, False]  # update 0 last skipped 70, update 1 took 60


@pytest.mark.parametrize("factor,changed", [("10", False), ("null", True)])
def test_a_spiking_batch_leaves_the_weights_as_they_were_when_guarded(monkeypatch, factor, changed):
    from gram_pyro.objectives import TruncatedSurrogate
    from gram_pyro.run import Run
    from gram_pyro.training import batch_at, train_batch

    run = Run(tiny_config("trainer.device=cpu", f"trainer.spike_factor={factor}"))
    split, size = run.task.splits["train"], run.cfg.trainer.batch_size
    for index in range(3):
        metrics = train_batch(run, batch_at(split, index, size, 0, run.device))
    if factor != "null":
        assert float(metrics["spikes"]) == 0 and run.grad_norm_mean.isfinite().all()
    before = {name: value.clone() for name, value in run.model.state_dict().items()}
    real_loss = TruncatedSurrogate.loss

    def spiking(self, *args):
        loss, metrics = real_loss(self, *args)
        return loss * 1e6, metrics

    monkeypatch.setattr(TruncatedSurrogate, "loss", spiking)
    metrics = train_batch(run, batch_at(split, 3, size, 0, run.device))
    same = all(torch.equal(value, before[name]) for name, value in run.model.state_dict().items())
    assert same != changed
    if factor != "null":
        assert float(metrics["spikes"]) == 1 and int(run.bad_steps) == 0
        assert run.state()["spiked"] == [True] * run.objective.updates_per_batch(run.model)  # checkpointed


def test_keep_checkpoints_writes_one_file_per_checkpoint(tmp_path):
    run = train(tiny_config("trainer.max_batches=2", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=true"),
                tmp_path / "kept", quiet=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["batch_000001.pt", "batch_000002.pt"]


@pytest.mark.parametrize("overrides, message", [
    (["guide=flow"], "guide ConditionalFlow has no analytic KL: use objective=truncated_mc"),
    (["model=trm", "guide=prior", "objective=iwae"], "ImportanceWeighted needs a stochastic model"),
])
def test_incompatible_guide_and_objective_is_one_line(capsys, overrides, message):
    assert main(["train", *TINY, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
