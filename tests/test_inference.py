"""Sampling trajectories: shapes, depth, halting, keyed randomness under chunking, baselines."""

import pyro
import pytest
import torch
from pyro import poutine

from gram_pyro.config import UserError
from gram_pyro.inference import (KeyedNoise, KeyedRandom, Perturbation, int64, mix64, plan_chunks, sample_trajectories,
                                 trajectory_bytes)
from gram_pyro.nn import network_dtype
from tests.conftest import BATCH, SEQ, VOCAB, tiny_model

N = 4


@pytest.fixture
def x():
    return torch.randint(1, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def assert_same(a, b):
    """Two runs agree: identical answers and steps, heads equal up to float rounding (a chunk of
    another size may take another matmul kernel)."""
    assert torch.equal(a.answers, b.answers) and torch.equal(a.steps, b.steps)
    torch.testing.assert_close(a.halt_logit, b.halt_logit)
    torch.testing.assert_close(a.value, b.value)


def differ(answers):
    """Whether the N trajectories of some input disagree."""
    return bool((answers != answers[:1]).any())


def bias_towards_late_halting(model, bias=-0.4):
    """Shift the halt logits down so that trajectories halt at different steps."""
    with torch.no_grad():
        model.halt_head.linear.bias.fill_(bias)


class HaltFromStep(torch.nn.Module):
    """A halt head whose logit turns positive at supervision step ``k`` (1-based), counted by calls."""

    def __init__(self, k):
        super().__init__()
        self.k, self.calls = k, 0

    def forward(self, h):
        self.calls += 1
        return torch.full(h.shape[:-2], 1.0 if self.calls >= self.k else -1.0)


def test_shapes_and_default_depth(x):
    model = tiny_model()
    out = sample_trajectories(model, x, N, seed=0, record_steps=True)
    assert out.answers.shape == (N, BATCH, SEQ) and out.answers.dtype == torch.long
    assert out.halt_logit.shape == out.value.shape == out.steps.shape == (N, BATCH)
    assert out.step_answers.shape == (model.n_sup, N, BATCH, SEQ)
    assert out.step_value.shape == out.step_halt_logit.shape == (model.n_sup, N, BATCH)
    assert (out.steps == model.n_sup).all()
    assert ((out.value > 0) & (out.value < 1)).all()
    assert torch.equal(out.answers, out.step_answers[-1])
    assert sample_trajectories(model, x, N, seed=0).step_answers is None


def test_stochastic_trajectories_differ_and_are_reproducible(x):
    model = tiny_model()
    out = sample_trajectories(model, x, N, seed=5)
    assert differ(out.answers)
    assert_same(out, sample_trajectories(model, x, N, seed=5))
    assert not torch.equal(out.halt_logit, sample_trajectories(model, x, N, seed=6).halt_logit)
    torch.manual_seed(3)
    drawn = sample_trajectories(model, x, N)
    torch.manual_seed(3)
    assert_same(drawn, sample_trajectories(model, x, N))


@pytest.mark.parametrize("chunk", [(3, BATCH), (1, BATCH), (1, 2), (1, 1)])
@pytest.mark.parametrize("perturbation", [None, {"kind": "ptrm", "sigma": 0.3}, {"kind": "z0"},
                                          {"kind": "decoder", "temperature": 2.0}])
def test_chunked_equals_unchunked(x, chunk, perturbation):
    model = tiny_model(noise="learned" if perturbation is None else "none")
    bias_towards_late_halting(model)
    whole = sample_trajectories(model, x, N, depth=4, halting=True, seed=1, perturbation=perturbation)
    budget_mb = chunk[0] * chunk[1] * trajectory_bytes(model, 1) / 2**20
    assert plan_chunks(N, BATCH, trajectory_bytes(model, 1), budget_mb * 2**20) == chunk
    chunked = sample_trajectories(model, x, N, depth=4, halting=True, seed=1, perturbation=perturbation,
                                  memory_budget_mb=budget_mb)
    assert_same(whole, chunked)
    assert differ(whole.answers)


def test_a_trajectory_does_not_depend_on_how_many_are_drawn(x):
    model = tiny_model()
    few, many = (sample_trajectories(model, x, n, seed=2, halting=True) for n in (2, 7))
    assert torch.equal(few.answers, many.answers[:2])
    torch.testing.assert_close(few.value, many.value[:2])


def test_halted_trajectories_keep_the_answer_of_their_halting_step(x):
    model = tiny_model()
    bias_towards_late_halting(model)
    depth = 6
    out = sample_trajectories(model, x, 8, depth=depth, halting=True, seed=0, record_steps=True)
    step = torch.arange(1, depth + 1)[:, None, None]
    expected_steps = torch.where(out.step_halt_logit > 0, step, depth).min(0).values
    assert torch.equal(out.steps, expected_steps)
    assert len(out.steps.unique()) > 2  # trajectories halt at different steps
    taken = (out.steps - 1)[None]
    assert torch.equal(out.answers, out.step_answers.gather(0, taken[..., None].expand(1, *out.answers.shape))[0])
    assert torch.equal(out.halt_logit, out.step_halt_logit.gather(0, taken)[0])
    assert torch.equal(out.value, out.step_value.gather(0, taken)[0])
    moved_on = (out.steps < depth) & (out.step_answers[-1] != out.answers).any(-1)
    assert moved_on.any()  # some answers would have changed after halting
    running = sample_trajectories(model, x, 8, depth=depth, seed=0)
    assert not torch.equal(running.answers, out.answers)


@pytest.mark.parametrize("noise", ["learned", "none"])
def test_halting_at_a_known_step_freezes_the_outputs_and_stops(x, noise):
    model = tiny_model(noise=noise)
    model.halt_head = HaltFromStep(3)
    halted = sample_trajectories(model, x, N, depth=8, halting=True, seed=4)
    assert (halted.steps == 3).all()
    assert model.halt_head.calls == 3  # the chunk stopped once every trajectory had halted
    model.halt_head = HaltFromStep(3)
    assert_same(halted, sample_trajectories(model, x, N, depth=3, seed=4))


def test_depth_beyond_training_continues_the_same_trajectories(x):
    model = tiny_model(n_sup=2)
    deep = sample_trajectories(model, x, N, depth=7, seed=3, record_steps=True)
    assert deep.step_answers.shape[0] == 7 and (deep.steps == 7).all()
    shallow = sample_trajectories(model, x, N, seed=3)
    assert torch.equal(deep.step_answers[1], shallow.answers)
    torch.testing.assert_close(deep.step_value[1], shallow.value)


def test_deterministic_model_runs_one_lane_and_repeats_it(x):
    model = tiny_model(noise="none")
    lanes = []
    model.core.f_low.register_forward_pre_hook(lambda module, args: lanes.append(args[0].shape[0]))
    out = sample_trajectories(model, x, 10, seed=0)
    assert set(lanes) == {1}
    assert not differ(out.answers) and not differ(out.value)
    assert out.answers.shape == (10, BATCH, SEQ)


def test_encoder_reads_the_inputs_once_per_step_not_per_trajectory(x):
    model = tiny_model()
    shapes = []
    model.encoder.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    sample_trajectories(model, x, 9, depth=3, seed=0)
    assert shapes == [(BATCH, SEQ)] * 3


@pytest.mark.parametrize("perturbation", [Perturbation("ptrm", sigma=0.5), Perturbation("ptrm", 0.5, which="l"),
                                          Perturbation("decoder", temperature=2.0), Perturbation("z0")])
def test_perturbations_make_deterministic_trajectories_differ(x, perturbation):
    model = tiny_model(noise="none")
    plain = sample_trajectories(model, x, 6, depth=3, seed=0)
    out = sample_trajectories(model, x, 6, depth=3, seed=0, perturbation=perturbation)
    assert not differ(plain.answers) and differ(out.answers)


def test_ptrm_noise_enters_between_steps_only(x):
    model = tiny_model(noise="none")
    one_step = sample_trajectories(model, x, N, depth=1, seed=0, perturbation={"kind": "ptrm", "sigma": 1.0})
    assert not differ(one_step.answers) and not differ(one_step.value)


def test_decoder_sampling_follows_the_tempered_softmax(x):
    model = tiny_model(noise="none", n_sup=1)
    temperature = 1.5
    probs = torch.softmax(model(x[:1]) / temperature, -1)[0]  # [S, V]
    out = sample_trajectories(model, x[:1], 4000, seed=0, perturbation={"kind": "decoder", "temperature": temperature})
    freq = torch.nn.functional.one_hot(out.answers[:, 0], VOCAB).float().mean(0)
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)
    cold = sample_trajectories(model, x, N, seed=0, perturbation=Perturbation("decoder", temperature=1e-4))
    assert torch.equal(cold.answers, sample_trajectories(model, x, N, seed=0).answers)


def test_keyed_noise_draws_prior_loc_plus_scale_times_keyed_normal(x):
    model = tiny_model()
    draws = KeyedRandom(7, range(3), range(BATCH), x.device, torch.float32)
    with poutine.trace() as tracer, pyro.plate("trajectories", 3, dim=-2), KeyedNoise(model.noise_sites, draws):
        state = {}
        model.init(state, x)
        model.step(state, x)
    site = tracer.trace.nodes["eps/0/0"]
    normal = site["fn"].base_dist
    z = KeyedRandom(7, range(3), range(BATCH), x.device, torch.float32).normal(model.h0.shape)
    torch.testing.assert_close(site["value"], normal.loc + normal.scale * z)
    rows = KeyedRandom(7, range(1, 3), range(1, 3), x.device, torch.float32).normal(model.h0.shape)
    assert rows.shape == (2, 2, *model.h0.shape)
    assert torch.equal(rows, z[1:3, 1:3])


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_keyed_noise_at_a_temperature_scales_the_prior_spread(x, temperature):
    model = tiny_model()
    values = {}
    for t in (1.0, temperature):
        keyed = KeyedRandom(7, range(3), range(BATCH), x.device, torch.float32)
        with poutine.trace() as tracer, pyro.plate("trajectories", 3, dim=-2), \
                KeyedNoise(model.noise_sites, keyed, temperature=t):
            state = {}
            model.init(state, x)
            model.step(state, x)
        site = tracer.trace.nodes["eps/0/0"]  # the first site: its loc and scale do not depend on earlier noise
        values[t], loc = site["value"], site["fn"].base_dist.loc
    torch.testing.assert_close(values[temperature] - loc, temperature * (values[1.0] - loc))


def test_prior_temperature_spreads_or_collapses_the_trajectories(x):
    model = tiny_model()
    default = sample_trajectories(model, x, N, seed=3)
    assert_same(default, sample_trajectories(model, x, N, seed=3, prior_temperature=1.0))
    assert differ(default.answers)
    collapsed = sample_trajectories(model, x, N, seed=3, prior_temperature=1e-6)  # every trajectory at the mean
    assert not differ(collapsed.answers)
    torch.testing.assert_close(collapsed.value, collapsed.value[:1].expand_as(collapsed.value))


def splitmix64_reference(z: int) -> int:
    """SplitMix64's finalizer on Python integers (unsigned 64-bit words)."""
    mask = 2**64 - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_mix64_is_splitmix64_with_wrapping_int64_arithmetic():
    words = [0, 1, 2**31, 2**32 + 5, 2**62 + 3, 2**63 - 1, 2**63, 2**64 - 1,
             *torch.randint(-2**63, 2**63 - 1, (200,), generator=torch.Generator().manual_seed(0)).tolist()]
    mixed = mix64(torch.tensor([int64(w) for w in words]))
    assert mixed.tolist() == [int64(splitmix64_reference(w % 2**64)) for w in words]
    assert int64(2**64 + 5) == 5 and int64(2**63) == -2**63


def test_keyed_draws_are_standard_and_independent():
    draws = KeyedRandom(3, range(4), range(5), torch.device("cpu"), torch.float32)
    z = draws.normal(torch.Size([20000]))
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs((z ** 4).mean() - 3) < 0.1  # the normal's kurtosis, not a uniform's or a bimodal's
    flat = z.flatten(0, 1)
    correlation = torch.corrcoef(flat) - torch.eye(len(flat))
    assert correlation.abs().max() < 0.04  # no two (trajectory, input) streams move together
    assert not torch.equal(z, draws.normal(torch.Size([20000])))  # each draw continues the streams
    e = draws.exponential(torch.Size([20000]))
    assert (e > 0).all() and abs(e.mean() - 1) < 0.01 and abs(e.var() - 1) < 0.03


def test_a_block_of_inputs_with_its_first_row_gives_the_whole_batch_answers(x):
    model = tiny_model()
    whole = sample_trajectories(model, x, N, seed=9, halting=True)
    for start, stop in ((0, 2), (2, 3), (3, BATCH)):
        block = sample_trajectories(model, x[start:stop], N, seed=9, halting=True, first_row=start)
        assert torch.equal(block.answers, whole.answers[:, start:stop])
        torch.testing.assert_close(block.value, whole.value[:, start:stop])
    shifted = sample_trajectories(model, x[2:4], N, seed=9, halting=True)  # rows 0 and 1 of the streams
    assert not torch.equal(shifted.halt_logit, whole.halt_logit[:, 2:4])


@pytest.mark.parametrize("perturbation", [None, {"kind": "decoder"}, {"kind": "z0"}])
def test_chunks_of_inputs_draw_only_their_rows(x, monkeypatch, perturbation):
    """Splitting the batch into one-input chunks computes as many random numbers as one chunk of all
    inputs (a chunk used to draw the whole batch's noise and keep its rows), and the same answers."""
    model = tiny_model(noise="learned" if perturbation is None else "none")
    drawn = []
    real = KeyedRandom._words

    def counted(self, tail):
        words = real(self, tail)
        drawn.append(words.numel())
        return words

    monkeypatch.setattr(KeyedRandom, "_words", counted)
    whole = sample_trajectories(model, x, N, seed=4, perturbation=perturbation)
    numbers, drawn[:] = sum(drawn), []
    budget_mb = trajectory_bytes(model, 1) / 2**20  # one trajectory of one input per chunk
    assert plan_chunks(N, BATCH, trajectory_bytes(model, 1), budget_mb * 2**20) == (1, 1)
    chunked = sample_trajectories(model, x, N, seed=4, perturbation=perturbation, memory_budget_mb=budget_mb)
    assert sum(drawn) == numbers > 0
    assert_same(whole, chunked)


def test_plan_chunks_fits_the_budget():
    assert plan_chunks(50, 8, bytes_per_input=100, budget_bytes=1e9) == (50, 8)
    assert plan_chunks(50, 8, bytes_per_input=100, budget_bytes=2500) == (3, 8)
    assert plan_chunks(50, 8, bytes_per_input=100, budget_bytes=500) == (1, 5)
    assert plan_chunks(50, 8, bytes_per_input=100, budget_bytes=1) == (1, 1)


def test_a_perturbation_may_be_given_as_a_kind_or_a_mapping(x):
    model = tiny_model(noise="none")
    runs = [sample_trajectories(model, x, N, seed=0, perturbation=spec)
            for spec in ("z0", {"kind": "z0"}, Perturbation("z0"))]
    assert differ(runs[0].answers)
    for run in runs[1:]:
        assert_same(runs[0], run)


@pytest.mark.parametrize("spec, message", [
    ({"kind": "dropout"}, "unknown perturbation kind 'dropout'; allowed: ptrm, decoder, z0"),
    ({"kind": "ptrm", "sigma": 0.0}, "perturbation sigma must be a positive finite number, got 0.0"),
    ({"kind": "ptrm", "sigma": "abc"}, "perturbation sigma must be a positive finite number, got 'abc'"),
    ({"kind": "decoder", "temperature": float("inf")}, "perturbation temperature must be a positive finite number"),
    ({"kind": "ptrm", "which": "z"}, "unknown perturbation latent which='z'; allowed: h, l"),
    ({"kind": "decoder", "temp": 2}, "unknown perturbation option 'temp'; allowed: kind, sigma, which, temperature"),
    ({"sigma": 1.0}, "perturbation needs a kind"),
])
def test_bad_perturbation_is_a_user_error(x, spec, message):
    with pytest.raises(UserError, match=message):
        sample_trajectories(tiny_model(), x, N, perturbation=spec)


def test_bad_sizes_are_user_errors(x):
    with pytest.raises(UserError, match="at least one trajectory"):
        sample_trajectories(tiny_model(), x, 0)
    with pytest.raises(UserError, match="memory_budget_mb must be positive"):
        sample_trajectories(tiny_model(), x, N, memory_budget_mb=0)
    for temperature in (0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(UserError, match="prior_temperature must be a positive finite number"):
            sample_trajectories(tiny_model(), x, N, prior_temperature=temperature)


def test_network_dtype_resolves_auto_from_the_hardware_and_rejects_unknown_names(monkeypatch):
    cpu = torch.device("cpu")
    assert network_dtype("fp32", cpu) is None and network_dtype("bf16", cpu) is torch.bfloat16
    for native, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr("gram_pyro.nn.native_bf16", lambda device, native=native: native)
        assert network_dtype("auto", cpu) is expected
    with pytest.raises(UserError, match="unknown precision 'fp16'; allowed: auto, fp32, bf16"):
        network_dtype("fp16", cpu)
