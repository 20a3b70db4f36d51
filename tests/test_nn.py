"""The plain-torch networks: shapes with arbitrary leading dims, unit-RMS outputs, encoder layout."""

import pytest
import torch

from gram_pyro.nn import (GaussianHead, RecursiveCore, ReasoningNet, ScalarHead, TokenDecoder, TokenEncoder,
                          network_precision, tf32_beside_bf16)


@pytest.mark.parametrize("mixer", ["attention", "mlp"])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_reasoning_net_keeps_shape_and_ends_with_unit_rms(mixer, lead):
    torch.manual_seed(0)
    net = ReasoningNet(dim=16, ffn_hidden=32, seq_len=7, num_layers=2, mixer=mixer, num_heads=4)
    z = torch.randn(*lead, 5, 7, 16) * 10
    out = net(z, torch.randn_like(z))
    assert out.shape == z.shape
    assert torch.allclose(out.square().mean(-1), torch.ones(out.shape[:-1]), atol=1e-3)


@pytest.mark.parametrize("mixer", ["attention", "mlp"])
def test_network_precision_runs_the_backbone_in_bf16_and_the_gaussian_heads_in_the_model_dtype(mixer):
    torch.manual_seed(0)
    core = RecursiveCore(dim=16, ffn_hidden=32, seq_len=7, num_layers=2, mixer=mixer, num_heads=4, low_steps=2,
                         shared=False)
    head = GaussianHead(16, 8, init_scale=0.5)
    h, l = torch.randn(3, 7, 16), torch.randn(3, 7, 16)
    seen = []
    for module in (core.f_high.blocks[0].mlp.down, head.loc.down, head.raw_scale.down):
        module.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    core.propose_high(h, l), head(h)
    assert seen == [torch.float32] * 3
    with network_precision([core, head], torch.bfloat16):
        low = core.propose_high(h, l)
        loc, scale = head(low)
    assert seen[3:] == [torch.bfloat16, torch.float32, torch.float32]
    assert low.dtype == loc.dtype == scale.dtype == torch.float32
    assert core.f_low.compute_dtype is core.f_high.compute_dtype is None  # restored


def test_gaussian_heads_give_the_full_precision_kl_under_an_outer_bf16_autocast():
    """Training wraps the whole loss in autocast; the KL between a posterior head and the prior's must
    not carry bf16 rounding of the two means (each rounded on its own, to 2^-8 of its size)."""
    torch.manual_seed(0)
    prior, posterior = GaussianHead(16, 32, init_scale=0.2), GaussianHead(16, 32, init_scale=0.2)
    for head in (prior, posterior):
        torch.nn.init.normal_(head.loc.down.weight, std=1.0)  # means of about 1, as trained ones grow
    posterior.load_state_dict(prior.state_dict())  # the same map: the KL is exactly 0
    u = torch.randn(64, 7, 16)

    def kl() -> torch.Tensor:
        (mu_p, s_p), (mu_q, s_q) = prior(u), posterior(u + 1e-3)
        return torch.distributions.kl_divergence(torch.distributions.Normal(mu_q, s_q),
                                                 torch.distributions.Normal(mu_p, s_p)).sum()

    full = kl()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(kl(), full)
        mu_rounded = prior.loc(u + 1e-3)  # what an autocast head would give: the rounding no head can train away
    assert prior(u)[0].abs().mean() > 0.5
    assert ((mu_rounded.float() - prior(u + 1e-3)[0]) ** 2 / (2 * 0.2 ** 2)).sum() > 10 * full


def test_bf16_on_cuda_lets_the_float32_matmuls_use_tf32_and_nothing_else_does():
    matmul = torch.backends.cuda.matmul
    saved, matmul.fp32_precision = matmul.fp32_precision, "ieee"
    try:
        for dtype, device in ((None, "cuda"), (torch.bfloat16, "cpu")):
            tf32_beside_bf16(dtype, torch.device(device))
            assert matmul.fp32_precision == "ieee"
        with network_precision([GaussianHead(4, 8, init_scale=0.5)], torch.bfloat16):  # CPU parameters
            assert matmul.fp32_precision == "ieee"
        tf32_beside_bf16(torch.bfloat16, torch.device("cuda"))
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = saved


def test_network_precision_is_close_to_full_precision_and_leaves_an_outer_autocast_alone():
    torch.manual_seed(0)
    net = ReasoningNet(dim=16, ffn_hidden=32, seq_len=7, num_layers=2, mixer="mlp", num_heads=4)
    z, injection = torch.randn(4, 7, 16), torch.randn(4, 7, 16)
    full = net(z, injection)
    with network_precision([net], torch.bfloat16):
        low = net(z, injection)
    assert 0 < (low - full).abs().max() < 0.05  # bf16 rounding of the branches; the residual stream is fp32
    seen = []
    net.blocks[0].mlp.down.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # unset precision must not switch an outer autocast off
        net(z, injection)
    assert seen == [torch.bfloat16]


def test_attention_mixes_positions_and_is_permutation_sensitive():
    torch.manual_seed(0)
    net = ReasoningNet(dim=16, ffn_hidden=32, seq_len=6, num_layers=1, mixer="attention", num_heads=2)
    z = torch.randn(1, 6, 16)
    out = net(z, torch.zeros_like(z))
    flipped = net(z.flip(-2), torch.zeros_like(z)).flip(-2)
    assert not torch.allclose(out, flipped, atol=1e-4)  # RoPE makes the block position-aware


@pytest.mark.parametrize("shared", [True, False])
def test_core_shares_or_separates_the_levels(shared):
    core = RecursiveCore(16, 32, 6, 1, "mlp", 2, low_steps=3, shared=shared)
    assert (core.f_low is core.f_high) == shared
    h, l, e = torch.randn(3, 2, 6, 16).unbind(0)
    assert core.propose_high(h, core.refine_low(l, h, e)).shape == h.shape


def test_encoder_puts_zero_prefix_before_scaled_tokens():
    enc = TokenEncoder(vocab_size=3, dim=16, num_prefix=4)
    x = torch.tensor([[1, 2, 1]])
    e = enc(x)
    assert e.shape == (1, 7, 16)
    assert torch.equal(e[:, :4], torch.zeros(1, 4, 16))
    assert torch.allclose(e[:, 4:], 4.0 * enc.embed(x))


def test_heads_read_the_right_positions():
    h = torch.randn(2, 3, 5, 8)
    assert TokenDecoder(8, 3, num_prefix=2)(h).shape == (2, 3, 3, 3)
    assert ScalarHead(8)(h).shape == (2, 3)
    loc, scale = GaussianHead(8, 16, init_scale=0.5)(h)
    assert torch.equal(loc, torch.zeros_like(h))
    assert torch.allclose(scale, torch.full_like(h, 0.5))


def test_gaussian_head_rejects_scale_below_minimum():
    with pytest.raises(ValueError, match="init_scale"):
        GaussianHead(8, 16, init_scale=1e-4)
