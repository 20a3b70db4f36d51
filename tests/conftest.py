"""Shared fixtures: tiny models and data, Pyro validation on (as docs/paper.md, "Known pitfalls", asks for tests); data set
caches go to a temporary directory, never the user's."""

import os

import pyro
import pytest
import torch

from gram_pyro.guides import TargetConditionedGaussian
from gram_pyro.models import RecursiveReasoningModel

VOCAB, SEQ, BATCH = 3, 6, 5


@pytest.fixture(autouse=True, scope="session")
def task_cache(tmp_path_factory):
    os.environ["GRAM_PYRO_CACHE"] = str(tmp_path_factory.mktemp("task-cache"))
    os.environ["GRAM_PYRO_QUIET"] = "1"
    yield


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread avoids oversubscribing the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def pyro_validation():
    pyro.enable_validation(True)
    pyro.clear_param_store()
    yield
    pyro.enable_validation(False)


class BootstrapGuide:
    """SMC proposal = the model's prior: nothing to sample in the guide."""

    def init(self, state, x):
        pass

    def step(self, state, x, y=None):
        pass


def tiny_model(**overrides) -> RecursiveReasoningModel:
    torch.manual_seed(0)
    options = dict(vocab_size=VOCAB, seq_len=SEQ, dim=8, ffn_hidden=16, num_layers=1, low_steps=2,
                   transitions=2, n_sup=2, num_prefix=2, noise="learned", init_scale=0.7)
    options.update(overrides)
    model = RecursiveReasoningModel(**options)
    with torch.no_grad():  # zero-initialised read-outs would hide mistakes in the tests
        for p in [*model.noise_heads.parameters(), *model.halt_head.parameters(), *model.value_head.parameters()]:
            p.add_(0.3 * torch.randn_like(p))
    return model


def tiny_guide(model, **overrides) -> TargetConditionedGaussian:
    guide = TargetConditionedGaussian(model, **{"hidden": 12, "init_scale": 0.5, **overrides})
    with torch.no_grad():  # move the posterior away from its initial value so q != p
        for p in guide.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return guide


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    y = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    return x, y
