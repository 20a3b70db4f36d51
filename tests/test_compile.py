"""Training speed switches: ``trainer.compile`` gives the eager step's numbers and the same Pyro sites,
and ``trainer.precision`` picks the autocast a step runs under."""

import pyro.poutine as poutine
import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from gram_pyro import nn
from gram_pyro.nn import GaussianHead, ReasoningNet, compile_networks, training_dtype
from gram_pyro.run import Run
from gram_pyro.training import batch_at, train_batch
from tests.helpers import tiny_config


def first_batch(*overrides):
    """The run of ``tiny_config(*overrides)`` after one training batch, its metrics and the batch."""
    run = Run(tiny_config(*overrides))
    batch = batch_at(run.task.splits["train"], 0, run.cfg.trainer.batch_size, 0, run.device)
    return run, {k: float(v) for k, v in train_batch(run, batch).items()}, batch


def test_compiled_step_matches_the_eager_step_and_keeps_the_sites(one_thread):
    eager, eager_metrics, batch = first_batch("trainer.device=cpu")
    compiled, compiled_metrics, _ = first_batch("trainer.device=cpu", "trainer.compile=default")
    assert compiled_metrics == pytest.approx(eager_metrics, rel=1e-4, abs=1e-5)
    for name, value in eager.model.state_dict().items():
        assert torch.allclose(compiled.model.state_dict()[name], value, atol=1e-5), name
    nets = [m for m in compiled.model.modules() if isinstance(m, ReasoningNet)]
    assert nets and all(hasattr(net.run_blocks, "_torchdynamo_orig_callable") for net in nets)

    def sites(run):
        with torch.no_grad():
            trace = poutine.trace(run.model).get_trace(batch.x, batch.y)
        return {name: site["type"] for name, site in trace.nodes.items()}

    assert sites(compiled) == sites(eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["default", "max"])
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("bf16", 0.02)])
def test_compiled_step_matches_the_eager_step_on_cuda(mode, precision, tolerance):
    """In fp32 the compiled kernels give the eager step's numbers; in bf16 both round, at different
    places (eager autocast rounds every intermediate, the fused kernels keep fp32 in between)."""
    cuda = ("trainer.device=cuda", f"trainer.precision={precision}")
    eager, eager_metrics, _ = first_batch(*cuda)
    compiled, compiled_metrics, _ = first_batch(*cuda, f"trainer.compile={mode}")
    assert compiled_metrics == pytest.approx(eager_metrics, rel=tolerance, abs=tolerance / 10)
    for name, value in eager.model.state_dict().items():
        assert torch.allclose(compiled.model.state_dict()[name], value, rtol=tolerance, atol=tolerance / 10), name


def test_compile_networks_takes_the_backbone_and_the_gaussian_heads_once():
    run = Run(tiny_config())  # shared f_L = f_H: one backbone network; prior and guide heads
    heads = sum(isinstance(m, GaussianHead) for m in [*run.model.modules(), *run.guide.modules()])
    assert compile_networks([run.model, run.guide], "none") == 0
    assert compile_networks([run.model, run.guide], "default") == 1 + heads
    with pytest.raises(ValueError, match="unknown compile mode 'fast'; allowed: none, default, max"):
        compile_networks([run.model], "fast")


@pytest.mark.parametrize("native", [True, False])
def test_precision_picks_bf16_only_where_asked_and_native(monkeypatch, native):
    monkeypatch.setattr(nn, "native_bf16", lambda device: native)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    expected = torch.bfloat16 if native else None
    table = {(p, d.type): training_dtype(p, d)
             for p in ("auto", "fp32", "bf16") for d in (cpu, cuda)}
    assert table == {("auto", "cpu"): None, ("auto", "cuda"): expected, ("fp32", "cpu"): None,
                     ("fp32", "cuda"): None, ("bf16", "cpu"): expected, ("bf16", "cuda"): expected}


def test_a_bf16_step_on_cpu_rounds_but_does_not_change_the_loss(monkeypatch, one_thread):
    monkeypatch.setattr(nn, "native_bf16", lambda device: True)  # bf16 autocast runs on any CPU
    _, fp32, _ = first_batch("trainer.device=cpu")
    _, bf16, _ = first_batch("trainer.device=cpu", "trainer.precision=bf16")
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05, abs=0.01)


def test_a_truncated_step_compiles_one_backbone_graph_per_grad_mode(one_thread):
    """The backbone sees a stride-0 first state (z0 expanded) and, in a truncated step, detached and
    attached states; none of that may cost a recompilation: one graph without grad (the first
    transitions), one with (the last)."""
    torch._dynamo.reset()
    run, _, batch = first_batch("trainer.device=cpu", "trainer.compile=default", "objective=truncated")
    train_batch(run, batch)
    graphs = _debug_get_cache_entry_list(ReasoningNet.run_blocks.__code__)
    assert len(graphs) == 2
