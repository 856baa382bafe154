"""Backbones, the Gaussian policy head, sampling, the LDVN log-likelihood, KL and model configs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from morphseek.errors import MorphSeekError
from morphseek.nets import (
    BACKBONES,
    Encoded,
    GaussianPolicyHead,
    MorphSeekNet,
    TransMorph,
    VoxelMorph,
    build_model,
    head_parameter_fraction,
    kl_standard_normal,
    ldvn_log_prob,
)
from morphseek.nets import voxelmorph
from morphseek.nets.base import few_output_conv3d, inference_conv3d
from morphseek.nets.voxelmorph import upsampled_conv
from morphseek.nets.transmorph import (
    MASK_VALUE,
    SwinBlock,
    attention_mask,
    relative_position_index,
    window_partition,
    window_reverse,
)

torch.manual_seed(0)


# A 3-stage TransMorph (divisor 16) for the tests that need a transformer but not the full preset.
SMALL_TRANSMORPH = {"backbone": "transmorph-tiny", "depths": [2, 2, 2], "heads": [2, 2, 4]}
SMALL = {"tiny": {"backbone": "tiny"}, "transmorph": SMALL_TRANSMORPH}


def pair(shape, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, *shape, generator=g), torch.rand(batch, 1, *shape, generator=g)


# ---------------------------------------------------------------- backbones and shapes

# (preset, grid): small grids each preset's divisor allows; the big presets only at 32^3.
SHAPE_CASES = [
    ("tiny", (32, 32, 48)),
    ("voxelmorph", (32, 32, 48)),
    ("voxelmorph-l", (32, 32, 32)),
    ("transmorph-tiny", (32, 32, 64)),
    ("transmorph", (32, 32, 32)),
]


@pytest.mark.parametrize("name,grid", SHAPE_CASES)
def test_preset_shapes_and_near_identity(name, grid):
    model = build_model({"backbone": name}).eval()
    moving, fixed = pair(grid, batch=2 if name in ("tiny", "transmorph-tiny") else 1)
    with torch.no_grad():
        enc = model.encode(moving, fixed)
        disp = model.decode(enc.skips, enc.mu)
    latent = model.backbone.latent_shape(grid)
    assert latent == (model.top_channels, *(n // model.divisor for n in grid))
    assert enc.mu.shape == enc.log_sigma.shape == (moving.shape[0], *latent)
    assert disp.shape == (moving.shape[0], 3, *grid)
    assert disp.dtype == torch.float32 and torch.isfinite(disp).all()
    # Flow convolution initialised with std 1e-5: an untrained model is close to the identity.
    assert disp.abs().max() < 0.05
    assert disp.abs().max() > 0  # ... but not identically zero: the network is wired through


def test_divisor_error_names_shape_and_divisor():
    model = build_model({"backbone": "tiny"})
    moving, fixed = pair((32, 30, 32))
    with pytest.raises(MorphSeekError, match=r"\(32, 30, 32\).*multiple of 16"):
        model(moving, fixed)
    tm = build_model({"backbone": "transmorph-tiny"})
    moving, fixed = pair((32, 32, 48))
    with pytest.raises(MorphSeekError, match="multiple of 32"):
        tm(moving, fixed)


def test_bad_inputs_are_morphseek_errors():
    model = build_model({"backbone": "tiny"})
    moving, fixed = pair((16, 16, 16))
    with pytest.raises(MorphSeekError, match="same shape"):
        model(moving, fixed[:, :, :8])
    with pytest.raises(MorphSeekError, match=r"\(B, 1, D, H, W\)"):
        model(torch.cat([moving, moving], 1), torch.cat([fixed, fixed], 1))
    enc = model.encode(moving, fixed)
    with pytest.raises(MorphSeekError, match="channels"):
        model.decode(enc.skips, enc.mu[:, :3])


def test_voxelmorph_divisor_and_widths():
    net = VoxelMorph(enc_channels=(4, 8, 8), dec_channels=(8, 8, 8, 4))
    assert net.divisor == 8 and net.top_channels == 8
    moving, fixed = pair((8, 16, 24))
    skips, top = net.encode(moving, fixed)
    assert [tuple(s.shape[1:]) for s in skips] == [(2, 8, 16, 24), (4, 4, 8, 12), (8, 2, 4, 6)]
    assert tuple(top.shape[1:]) == (8, 1, 2, 3)
    with pytest.raises(MorphSeekError, match="decoder widths"):
        VoxelMorph(enc_channels=(4, 8, 8), dec_channels=(8, 8))


def test_transmorph_pads_stages_that_are_not_window_multiples():
    # Window 3 on stage grids 8, 4, 2: padding at stage 1 and 2, clipped windows at stage 3.
    net = TransMorph(embed_dim=8, depths=(2, 2, 2), heads=(2, 2, 2), window=3).eval()
    assert net.divisor == 16 and net.top_channels == 32
    moving, fixed = pair((32, 32, 48))
    with torch.no_grad():
        skips, top = net.encode(moving, fixed)
        disp = net.decode(skips, top)
    assert [tuple(s.shape[1:]) for s in skips] == [
        (16, 32, 32, 48), (4, 16, 16, 24), (8, 8, 8, 12), (16, 4, 4, 6)
    ]
    assert tuple(top.shape[1:]) == (32, 2, 2, 3)
    assert disp.shape == (1, 3, 32, 32, 48)


@pytest.mark.parametrize("name", ["tiny", "transmorph"])
def test_channels_last_gives_same_result(name):
    model = build_model(SMALL[name]).eval()
    grid = (16, 16, 32)
    moving, fixed = pair(grid)
    with torch.no_grad():
        ref = model(moving, fixed)
        model.to(memory_format=torch.channels_last_3d)
        cl = model(moving.contiguous(memory_format=torch.channels_last_3d),
                   fixed.contiguous(memory_format=torch.channels_last_3d))
    assert cl.shape == ref.shape
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("config", [
    {"backbone": "tiny"},
    # no full-resolution convolution: the flow convolution itself reads the upsampled level
    {"backbone": "voxelmorph", "enc_channels": [4, 8], "dec_channels": [8, 6]},
], ids=["tiny", "no-full-res"])
def test_voxelmorph_inference_path_equals_the_training_path(config, monkeypatch):
    # registration (CPU, no gradients) decodes with the convolutions after each upsampling run on the
    # coarse grid (upsampled_conv) and the full-resolution ones channels-last; training keeps the plain
    # path: the two must give the same displacement
    model = build_model(config).eval()
    with torch.no_grad():  # an untrained flow layer outputs ~1e-5 voxels: make the comparison count
        torch.nn.init.normal_(model.backbone.flow.weight, std=1e-2, generator=torch.Generator().manual_seed(0))
    moving, fixed = pair((16, 32, 48))
    enc = model.encode(moving, fixed)
    trained = model.decode(enc.skips, enc.mu)  # gradients enabled: the plain path
    interpolate = torch.nn.functional.interpolate

    def no_upsampling(*args, **kwargs):  # the inference path must never make an upsampled tensor
        raise AssertionError("the inference path upsampled a tensor")

    monkeypatch.setattr(torch.nn.functional, "interpolate", no_upsampling)
    with torch.no_grad():
        inferred = model.decode(enc.skips, enc.mu)
    monkeypatch.setattr(torch.nn.functional, "interpolate", interpolate)
    assert inferred.is_contiguous() and inferred.shape == trained.shape
    assert float(trained.detach().abs().max()) > 1e-3  # displacements worth comparing
    torch.testing.assert_close(inferred, trained.detach(), rtol=1e-4, atol=1e-6)


def test_decode_layouts_in_training_and_in_registration(monkeypatch):
    # full-resolution convolutions run channels-last without gradients on the CPU; in train mode
    # (training's own steps without gradients) on the plain path, in eval mode (registration) on the
    # coarse-grid one, whose blocks run through inference_conv3d rather than as modules
    model = build_model({"backbone": "tiny"})
    assert len(model.backbone.full_res_convs) >= 2
    first, second, inferred = [], [], []
    model.backbone.full_res_convs[0].register_forward_pre_hook(
        lambda module, args: first.append(args[0].is_contiguous(memory_format=torch.channels_last_3d)))
    model.backbone.full_res_convs[1].register_forward_pre_hook(
        lambda module, args: second.append(args[0].is_contiguous(memory_format=torch.channels_last_3d)))
    moving, fixed = pair((16, 16, 32))
    enc = model.encode(moving, fixed)
    model.train()
    model.decode(enc.skips, enc.mu)

    def recording(x, weight, bias, stride=1, padding=1):
        if tuple(x.shape[2:]) == (16, 16, 32):
            inferred.append(x.is_contiguous(memory_format=torch.channels_last_3d))
        return inference_conv3d(x, weight, bias, stride, padding)

    monkeypatch.setattr(voxelmorph, "inference_conv3d", recording)
    with torch.no_grad():
        model.decode(enc.skips, enc.mu)
        assert not inferred  # train mode without gradients: the plain path
        model.eval()
        model.decode(enc.skips, enc.mu)
    assert first == [False, True]  # train mode: plain, then channels-last without gradients
    assert len(second) == 2  # eval mode calls no full-resolution block as a module
    assert inferred and all(inferred)  # ... but through inference_conv3d, channels-last


@pytest.mark.parametrize("shape,out_channels,stride,padding", [
    ((1, 2, 16, 16, 12), 16, 2, 1),  # the model grid's first encoder convolution (PyTorch's native kernel)
    ((1, 2, 16, 16, 12), 16, 1, 1),
    ((1, 8, 5, 6, 7), 12, 1, 0),
    ((2, 4, 8, 8, 8), 3, 1, 1),
])
def test_inference_conv3d_equals_conv3d(shape, out_channels, stride, padding):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g)
    weight = torch.randn(out_channels, shape[1], 3, 3, 3, generator=g)
    bias = torch.randn(out_channels, generator=g)
    expected = torch.nn.functional.conv3d(x, weight, bias, stride=stride, padding=padding)
    with torch.no_grad():
        for layout in (torch.contiguous_format, torch.channels_last_3d):
            got = inference_conv3d(x.contiguous(memory_format=layout), weight, bias, stride, padding)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
        # under bf16 autocast the call is F.conv3d's, which autocast casts
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert inference_conv3d(x, weight, bias, stride, padding).dtype == torch.bfloat16
    # with gradients it is F.conv3d's too: differentiable
    w = weight.clone().requires_grad_()
    inference_conv3d(x, w, bias, stride, padding).sum().backward()
    assert w.grad is not None and w.grad.shape == weight.shape


@pytest.mark.parametrize("shape,out_channels", [
    ((1, 16, 8, 6, 5), 3),  # the flow convolution: depth a multiple of 4, packed
    ((2, 5, 12, 4, 4), 1),
    ((1, 16, 4, 3, 3), 4),
    ((1, 16, 6, 6, 5), 3),  # depth not a multiple of 4: the plain convolution
    ((1, 4, 8, 6, 5), 5),  # too many outputs to pack
])
def test_few_output_conv3d_equals_conv3d(shape, out_channels):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g)
    weight = torch.randn(out_channels, shape[1], 3, 3, 3, generator=g)
    bias = torch.randn(out_channels, generator=g)
    expected = torch.nn.functional.conv3d(x, weight, bias, padding=1)
    with torch.no_grad():
        for layout in (torch.contiguous_format, torch.channels_last_3d):
            got = few_output_conv3d(x.contiguous(memory_format=layout), weight, bias)
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(few_output_conv3d(x, weight, None), expected - bias.view(1, -1, 1, 1, 1),
                                   rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(few_output_conv3d(x, weight, bias, padding=0),  # other paddings: plain
                                   torch.nn.functional.conv3d(x, weight, bias), rtol=1e-5, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # F.conv3d on the packed kernel: bf16's rounding
            torch.testing.assert_close(few_output_conv3d(x, weight, bias).float(), expected, rtol=0.05, atol=0.5)
    w = weight.clone().requires_grad_()  # with gradients: the plain, differentiable convolution
    few_output_conv3d(x, w, bias).sum().backward()
    assert w.grad is not None


def test_inference_conv3d_takes_onednn_only_where_it_should(monkeypatch):
    from morphseek.nets import base

    calls = []
    real = base._ONEDNN_CONV
    if real is None or not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch has no oneDNN")
    monkeypatch.setattr(base, "_ONEDNN_CONV", lambda *args: calls.append(1) or real(*args))
    x, weight = torch.randn(1, 2, 8, 8, 8), torch.randn(4, 2, 3, 3, 3)
    with torch.no_grad():
        inference_conv3d(x, weight, None)
        assert len(calls) == 1  # float32, CPU, no gradients: oneDNN, whatever PyTorch's rule says
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inference_conv3d(x, weight, None)
        inference_conv3d(x.double(), weight.double(), None)
        with torch.backends.mkldnn.flags(enabled=False):
            inference_conv3d(x, weight, None)
    inference_conv3d(x, weight.requires_grad_(), None)
    assert len(calls) == 1  # autocast, float64, oneDNN switched off and autograd: F.conv3d


def test_voxelmorph_inference_encoder_equals_the_training_path():
    model = build_model({"backbone": "tiny"}).eval()
    moving, fixed = pair((16, 32, 48))
    skips, top = model.backbone.encode(moving, fixed)  # gradients enabled: the modules' own path
    with torch.no_grad():
        fast_skips, fast_top = model.backbone.encode(moving, fixed)
    for a, b in zip([*skips, top], [*fast_skips, fast_top]):
        torch.testing.assert_close(b, a.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("coarse_size,batch", [((1, 1, 1), 1), ((2, 3, 5), 1), ((4, 4, 6), 1), ((2, 3, 5), 3)])
def test_upsampled_conv_equals_upsampling_then_convolving(coarse_size, batch):
    # a 3x3x3 convolution of [nearest x2 upsampling, skip] computed on the coarse grid, borders included
    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv3d(5 + 2, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(4, generator=g))
    coarse = torch.randn(batch, 5, *coarse_size, generator=g)
    skip = torch.randn(batch, 2, *(2 * n for n in coarse_size), generator=g)
    with torch.no_grad():
        expected = conv(torch.cat([torch.nn.functional.interpolate(coarse, scale_factor=2, mode="nearest"), skip], 1))
        got = upsampled_conv(conv, coarse, skip)
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # a skip that is not exactly twice the coarse size takes the plain path, same result
    odd_skip = skip[:, :, :-1] if skip.shape[2] > 1 else None
    if odd_skip is not None:
        with torch.no_grad():
            expected = conv(torch.cat([torch.nn.functional.interpolate(coarse, size=odd_skip.shape[2:], mode="nearest"),
                                       odd_skip], 1))
            torch.testing.assert_close(upsampled_conv(conv, coarse, odd_skip), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- parameter budget of the head

@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_head_adds_under_three_percent(name):
    model = build_model({"backbone": name})
    c = model.top_channels
    assert sum(p.numel() for p in model.head.parameters()) == 2 * (c * c + c)
    assert head_parameter_fraction(model) < 0.03


def test_transmorph_preset_matches_paper_size():
    # The paper's TransMorph: 46.77 M parameters, head +1.18 M (+2.53 %).
    model = build_model({"backbone": "transmorph"})
    backbone = sum(p.numel() for p in model.backbone.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert 45e6 < backbone < 48e6
    assert abs(head - 1.18e6) < 0.01e6


# ---------------------------------------------------------------- the Gaussian head and sampling

def test_head_initialisation_and_clipping():
    head = GaussianPolicyHead(6, lambda_scale=2.0, s_min=-3.0, s_max=0.5)
    f = torch.randn(2, 6, 3, 3, 3) * 4
    mu, log_sigma = head(f)
    torch.testing.assert_close(mu, 2.0 * torch.tanh(f / 2.0))
    assert torch.equal(log_sigma, torch.zeros_like(f))
    assert mu.abs().max() <= 2.0
    with torch.no_grad():
        head.log_sigma_conv.bias.fill_(10.0)
    assert torch.equal(head(f)[1], torch.full_like(f, 0.5))
    with torch.no_grad():
        head.log_sigma_conv.bias.fill_(-10.0)
    assert torch.equal(head(f)[1], torch.full_like(f, -3.0))
    with pytest.raises(MorphSeekError):
        GaussianPolicyHead(6, s_min=1.0, s_max=0.0)


def test_tau_zero_is_exactly_mu_and_deterministic():
    model = build_model({"backbone": "tiny"}).eval()
    moving, fixed = pair((16, 32, 32))
    with torch.no_grad():
        enc = model.encode(moving, fixed)
        assert model.sample(enc, 0.0) is enc.mu
        a = model(moving, fixed, tau=0.0)
        b = model(moving, fixed)
        c = model.decode(enc.skips, enc.mu)
    assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(MorphSeekError, match="tau"):
        model.sample(enc, -0.1)


def test_sampled_latents_have_mean_mu_and_std_tau_sigma():
    model = build_model({"backbone": "tiny"})
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(1, 8, 2, 2, 2, generator=g)
    log_sigma = torch.rand(1, 8, 2, 2, 2, generator=g) * 2 - 1.5
    n, tau = 20000, 0.3
    z = model.sample((mu.expand(n, -1, -1, -1, -1), log_sigma.expand(n, -1, -1, -1, -1)), tau, generator=g)
    std = tau * log_sigma.exp()[0]
    # Mean within 5 standard errors, std within 4 % (its standard error is ~0.5 % here).
    assert ((z.mean(0) - mu[0]).abs() < 5 * std / math.sqrt(n)).all()
    assert ((z.std(0) / std - 1).abs() < 0.04).all()
    # Same generator seed -> same sample; the sample is differentiable in mu and log_sigma.
    mu_leaf, ls_leaf = mu.clone().requires_grad_(), log_sigma.clone().requires_grad_()
    z1 = model.sample((mu_leaf, ls_leaf), tau, generator=torch.Generator().manual_seed(5))
    z2 = model.sample((mu, log_sigma), tau, generator=torch.Generator().manual_seed(5))
    assert torch.equal(z1.detach(), z2)
    z1.sum().backward()
    assert torch.equal(mu_leaf.grad, torch.ones_like(mu))
    assert ls_leaf.grad.abs().sum() > 0


# ---------------------------------------------------------------- LDVN log-likelihood and KL

def test_ldvn_hand_computed_case():
    # Two latent dims: z = (1, 0), mu = 0, sigma = (1, 2), tau = 0.5 -> tau sigma = (0.5, 1).
    z = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1, 1)
    mu = torch.zeros_like(z)
    log_sigma = torch.tensor([0.0, math.log(2.0)]).view(1, 2, 1, 1, 1)
    # sum_i = (1/0.5)^2 + log(2 pi 0.25) + 0 + log(2 pi 1) = 4 + 2 log(2 pi) + log(0.25) = 6.289459
    expected_sum = 6.289459
    out_none = ldvn_log_prob(z, mu, log_sigma, 0.5, scale="none")
    out_sqrt = ldvn_log_prob(z, mu, log_sigma, 0.5, scale="sqrt")
    out_float = ldvn_log_prob(z, mu, log_sigma, 0.5, scale=4.0)
    assert out_none.shape == (1,)
    assert out_none.item() == pytest.approx(-expected_sum / 2, abs=1e-5)
    assert out_sqrt.item() == pytest.approx(-expected_sum / (2 * math.sqrt(2)), abs=1e-5)
    assert out_float.item() == pytest.approx(-expected_sum / 8, abs=1e-5)


def test_ldvn_matches_torch_normal_and_keeps_order():
    g = torch.Generator().manual_seed(3)
    shape = (5, 4, 2, 3, 4)
    mu = torch.randn(shape, generator=g)
    log_sigma = torch.rand(shape, generator=g) * 3 - 2
    tau = 0.3
    z = mu + tau * log_sigma.exp() * torch.randn(shape, generator=g) * torch.linspace(0.5, 2, 5).view(5, 1, 1, 1, 1)
    exact = Normal(mu, tau * log_sigma.exp()).log_prob(z).flatten(1).sum(1)
    n = 4 * 2 * 3 * 4
    torch.testing.assert_close(ldvn_log_prob(z, mu, log_sigma, tau, "none"), exact, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ldvn_log_prob(z, mu, log_sigma, tau, "sqrt"), exact / math.sqrt(n), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ldvn_log_prob(z, mu, log_sigma, tau, 12.5), exact / 12.5, rtol=1e-5, atol=1e-4)
    order_none = torch.argsort(ldvn_log_prob(z, mu, log_sigma, tau, "none"))
    order_sqrt = torch.argsort(ldvn_log_prob(z, mu, log_sigma, tau, "sqrt"))
    assert torch.equal(order_none, order_sqrt)
    assert torch.equal(order_none, torch.argsort(exact))
    for bad in (0.0, -1.0):
        with pytest.raises(MorphSeekError, match="tau"):
            ldvn_log_prob(z, mu, log_sigma, bad)
    for bad in ("adaptive", -2.0, 0, True):
        with pytest.raises(MorphSeekError, match="scale"):
            ldvn_log_prob(z, mu, log_sigma, tau, bad)


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(4)
    mu = torch.randn(2, 3, 2, 2, 2, generator=g) * 2
    log_sigma = torch.rand(2, 3, 2, 2, 2, generator=g) * 4 - 3
    expected = kl_divergence(Normal(mu, log_sigma.exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu))).mean()
    torch.testing.assert_close(kl_standard_normal(mu, log_sigma), expected)
    assert kl_standard_normal(torch.zeros(1, 2, 2, 2, 2), torch.zeros(1, 2, 2, 2, 2)).item() == 0.0
    assert kl_standard_normal(mu, log_sigma).dim() == 0


# ---------------------------------------------------------------- gradients reach the encoder

@pytest.mark.parametrize("name", ["tiny", "transmorph"])
def test_gradient_flows_from_decoder_output_to_encoder_through_z(name):
    model = build_model(SMALL[name])
    moving, fixed = pair((16, 16, 32))
    enc = model.encode(moving, fixed)
    z = model.sample(enc, 0.3, generator=torch.Generator().manual_seed(0))
    # Skips detached: the only path from the displacement back to the encoder is z (mu, sigma).
    disp = model.decode([s.detach() for s in enc.skips], z)
    (disp**2).sum().backward()
    first = next(model.backbone.encoder.parameters()) if name == "tiny" else model.backbone.patch_embed.weight
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert model.head.mu_conv.weight.grad.abs().sum() > 0
    assert model.head.log_sigma_conv.weight.grad.abs().sum() > 0


def test_policy_gradient_reaches_encoder_through_log_prob():
    model = build_model({"backbone": "tiny"})
    moving, fixed = pair((16, 16, 32))
    enc = model.encode(moving, fixed)
    z = model.sample(enc, 0.3, generator=torch.Generator().manual_seed(0)).detach()
    ldvn_log_prob(z, enc.mu, enc.log_sigma, 0.3).sum().backward()
    assert model.backbone.encoder[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.flow.parameters())  # decoder not involved


# ---------------------------------------------------------------- shifted-window attention

def test_window_partition_round_trip_and_grouping():
    shape, window = (4, 6, 4), (2, 3, 2)
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij"), -1)[None]
    windows = window_partition(coords, window)  # (nW, N, 3)
    assert windows.shape == (2 * 2 * 2, 12, 3)
    block = windows // torch.tensor(window)
    assert (block == block[:, :1]).all()  # every window holds one aligned block of the grid
    assert len({tuple(b[0].tolist()) for b in block}) == 8
    assert torch.equal(window_reverse(windows, window, shape), coords)


@pytest.mark.parametrize(
    "real,window,shift",
    [((8, 8, 8), (4, 4, 4), (2, 2, 2)), ((5, 6, 4), (3, 3, 2), (1, 1, 1)), ((5, 6, 4), (3, 3, 2), (0, 0, 0)),
     ((4, 7, 2), (4, 3, 2), (0, 1, 0))],
)
def test_attention_mask_against_brute_force(real, window, shift):
    padded = tuple(-(-n // w) * w for n, w in zip(real, window))
    mask = attention_mask(padded, real, window, shift)
    # Brute force on coordinates: token at rolled position q came from p = (q + s) mod L_padded.
    # i may attend j iff j is a real voxel and i, j are neighbours in the un-rolled volume.
    q = torch.stack(torch.meshgrid(*[torch.arange(n) for n in padded], indexing="ij"), -1)
    p = (q + torch.tensor(shift)) % torch.tensor(padded)
    qw, pw = window_partition(q[None], window), window_partition(p[None], window)  # (nW, N, 3)
    same_offset = ((pw[:, :, None] - pw[:, None, :]) == (qw[:, :, None] - qw[:, None, :])).all(-1)
    key_real = (pw < torch.tensor(real)).all(-1)[:, None, :]
    allowed = same_offset & key_real
    if allowed.all():
        assert mask is None
        return
    assert mask.shape == allowed.shape
    assert torch.equal(mask == 0, allowed)
    assert (mask[~allowed] == MASK_VALUE).all()


def test_shifted_block_does_not_mix_wrapped_or_padded_tokens():
    torch.manual_seed(1)
    block = SwinBlock(dim=8, heads=2, window=(4, 4, 4)).eval()
    shape, window, shift = (8, 8, 8), (4, 4, 4), (2, 2, 2)
    x = torch.randn(1, *shape, 8)
    mask = attention_mask(shape, shape, window, shift)
    x2 = x.clone()
    # Perturb the corner token (not by a constant: LayerNorm would remove that); the shift carries
    # it round to the far side of the volume.
    x2[0, 0, 0, 0] += 5.0 * torch.randn(8)
    with torch.no_grad():
        y, y2 = block(x, window, shift, mask), block(x2, window, shift, mask)
        y_nomask, y2_nomask = block(x, window, shift, None), block(x2, window, shift, None)
    changed = (y2 - y).abs().amax(-1)[0] > 1e-6
    assert changed[1, 1, 1]  # a true neighbour sees it
    for far in [(7, 7, 7), (6, 0, 0), (0, 7, 0)]:  # in the same rolled window only via wrap-around
        assert not changed[far]
        assert (y2_nomask - y_nomask)[0][far].abs().max() > 1e-6  # without the mask they would
    # Padding: real tokens do not see what is in the padded voxels.
    real, padded = (6, 8, 8), (8, 8, 8)
    pad_mask = attention_mask(padded, real, window, (0, 0, 0))
    xp = x.clone()
    xp[0, 6:] = 0.0
    xq = xp.clone()
    xq[0, 6:] = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(xp, window, (0, 0, 0), pad_mask)[0, :6],
                                   block(xq, window, (0, 0, 0), pad_mask)[0, :6])


def test_relative_position_index_for_clipped_windows():
    full, clipped = (4, 4, 4), (2, 4, 1)
    index = relative_position_index(clipped, full)
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in clipped], indexing="ij")).flatten(1).T
    offsets = coords[:, None] - coords[None, :]
    # Same offset <-> same table entry, and the indices stay inside the table.
    same_offset = (offsets[:, :, None, None] == offsets[None, None]).all(-1)
    same_index = index[:, :, None, None] == index[None, None]
    assert torch.equal(same_offset, same_index)
    assert index.min() >= 0 and index.max() < 7 * 7 * 7
    assert torch.equal(relative_position_index(full, full).diagonal(), torch.full((64,), (3 * 7 + 3) * 7 + 3))


# ---------------------------------------------------------------- configs

@pytest.mark.parametrize("name", ["tiny", "transmorph"])
def test_config_round_trip_rebuilds_the_same_model(name):
    model = build_model({**SMALL[name], "lambda_scale": 2, "s_min": -4})
    config = json.loads(json.dumps(model.config))  # JSON-serialisable
    assert config["lambda_scale"] == 2.0 and config["s_min"] == -4.0 and config["s_max"] == 1.0
    twin = build_model(config)
    assert twin.config == model.config
    twin.load_state_dict(model.state_dict())
    moving, fixed = pair((16, 16, 32))
    with torch.no_grad():
        assert torch.equal(model.eval()(moving, fixed), twin.eval()(moving, fixed))


def test_direct_construction_and_overrides():
    net = MorphSeekNet(VoxelMorph((4, 8), (8, 8, 4)), GaussianPolicyHead(8))
    config = net.config
    assert config["backbone"] == "voxelmorph" and config["enc_channels"] == [4, 8]
    assert build_model(config).config == config
    assert isinstance(net.encode(*pair((8, 8, 8))), Encoded)
    with pytest.raises(MorphSeekError, match="channels"):
        MorphSeekNet(VoxelMorph((4, 8), (8, 8, 4)), GaussianPolicyHead(4))
    with pytest.raises(MorphSeekError, match="unknown backbone"):
        build_model({"backbone": "resnet"})
    with pytest.raises(MorphSeekError, match="bad arguments"):
        build_model({"backbone": "tiny", "kernel": 5})
    with pytest.raises(MorphSeekError, match="backbone"):
        build_model({"enc_channels": [1]})
    with pytest.raises(MorphSeekError, match="head settings"):
        build_model({"backbone": "tiny", "lambda_scale": "large"})


def test_numpy_free_config():
    # model.config holds plain Python types only (checkpoints load with weights_only=True)
    def plain(v):
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        if isinstance(v, list):
            return all(plain(x) for x in v)
        return isinstance(v, (int, float, str, bool)) and not isinstance(v, np.generic)

    for name in BACKBONES:
        assert plain(build_model({"backbone": name}).config)
