"""morphseek.losses: hand-computed values, invariances, reference transcriptions and finite gradients."""

import pytest
import torch
import torch.nn.functional as F

from morphseek import losses
from morphseek.errors import MorphSeekError

torch.manual_seed(0)


def _smooth_image(shape=(20, 22, 24), seed=0):
    """A smooth random image in [0, 1] (blurred noise), structured at several voxels' scale."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, *[n // 4 for n in shape], generator=generator)
    return F.interpolate(noise, size=shape, mode="trilinear", align_corners=True)


def _label_map(shape=(20, 22, 24), seed=1):
    """Piecewise-constant labels 0..4 from a coarse random grid upsampled by nearest neighbour."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 5, (1, 1, *[n // 4 for n in shape]), generator=generator).float()
    return F.interpolate(coarse, size=shape, mode="nearest").long()


# ------------------------------------------------------------------------------------------- MSE
@pytest.mark.parametrize("window", [3, 5])
def test_box_mean_equals_avg_pool_with_its_gradient(window):
    # adapt's filter of its variable: the in-grid mean of each box, border boxes included
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, 7, 9, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(1, 3, 7, 9, 6, generator=generator, dtype=torch.float64)
    ours = losses.box_mean(x, window)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), x)
    reference = F.avg_pool3d(x, window, stride=1, padding=window // 2, count_include_pad=False)
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), x)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_reference, rtol=0, atol=1e-12)
    # a corner voxel's box holds (window // 2 + 1)^3 in-grid voxels: its mean by hand
    r = window // 2
    corner = x.detach()[0, 1, : r + 1, : r + 1, : r + 1].mean()
    assert float(ours.detach()[0, 1, 0, 0, 0]) == pytest.approx(float(corner), abs=1e-12)


@pytest.mark.parametrize("window", [0, 2, -3])
def test_box_mean_rejects_a_window_that_has_no_centre(window):
    with pytest.raises(MorphSeekError, match="odd"):
        losses.box_mean(torch.zeros(1, 1, 4, 4, 4), window)


def test_mse_hand_value():
    a = torch.zeros(2, 1, 4, 4, 4)
    assert losses.mse(a, a + 0.5).item() == pytest.approx(0.25)
    with pytest.raises(MorphSeekError, match="differ"):
        losses.mse(a, a[:, :, :3])


# ------------------------------------------------------------------------------------------- NCC
def _voxelmorph_ncc_map(i, j, window):
    """cc map of VoxelMorph's NCC (zero-padded box sums, eps only in the denominator), transcribed."""
    filt = torch.ones(1, 1, window, window, window, dtype=i.dtype)
    pad = window // 2
    sums = [F.conv3d(x, filt, padding=pad) for x in (i, j, i * i, j * j, i * j)]
    i_sum, j_sum, i2_sum, j2_sum, ij_sum = sums
    size = window**3
    u_i, u_j = i_sum / size, j_sum / size
    cross = ij_sum - u_j * i_sum - u_i * j_sum + u_i * u_j * size
    i_var = i2_sum - 2 * u_i * i_sum + u_i * u_i * size
    j_var = j2_sum - 2 * u_j * j_sum + u_j * u_j * size
    return cross * cross / (i_var * j_var + 1e-5)


def test_ncc_equals_voxelmorph_away_from_borders():
    a, b = _smooth_image(seed=2).double(), _smooth_image(seed=3).double()
    window, inner = 5, (Ellipsis, slice(2, -2), slice(2, -2), slice(2, -2))
    ours = losses._local_ncc_map(a, b, window, eps=1e-5)
    # equal to VoxelMorph wherever the window lies inside the grid (eps placement aside)
    assert torch.allclose(ours[inner], _voxelmorph_ncc_map(a, b, window)[inner], atol=1e-3)
    assert not torch.allclose(ours, _voxelmorph_ncc_map(a, b, window), atol=1e-3)  # borders differ
    assert losses.local_ncc_loss(a, b, window=window).item() == pytest.approx(1 - ours.mean().item())


def test_ncc_is_zero_for_identical_and_affinely_rescaled_images():
    a = _smooth_image()
    a[..., :4] = 0.3  # a flat slab: windows with no variance still count as a perfect match
    assert losses.local_ncc_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.local_ncc_loss(a, 3.0 * a + 0.5).item() == pytest.approx(0.0, abs=1e-5)
    assert losses.local_ncc_loss(a, 1.0 - 2.0 * a).item() == pytest.approx(0.0, abs=1e-5)  # squared NCC
    unrelated = losses.local_ncc_loss(a, _smooth_image(seed=7)).item()
    assert unrelated > 0.3  # and far from 0 for unrelated images
    shifted = losses.local_ncc_loss(a, torch.roll(a, 3, dims=4)).item()
    assert 0.01 < shifted < unrelated
    with pytest.raises(MorphSeekError, match="odd"):
        losses.local_ncc_loss(a, a, window=4)


# ------------------------------------------------------------------------------------------ MIND
def _reference_mind_ssc(img, radius=2, dilation=2):
    """MIND-SSC as in the widely used reference (Learn2Reg baselines, TransMorph's MIND_loss),
    transcribed for the CPU; valid for batch size 1."""
    kernel_size = radius * 2 + 1
    six_neighbourhood = torch.tensor(
        [[0, 1, 1], [1, 1, 0], [1, 0, 1], [1, 1, 2], [2, 1, 1], [1, 2, 1]], dtype=torch.long
    )
    x = six_neighbourhood.t().unsqueeze(0).float()
    xx = (x**2).sum(dim=1).unsqueeze(2)
    dist = (xx + xx.permute(0, 2, 1) - 2.0 * torch.bmm(x.permute(0, 2, 1), x)).squeeze(0)
    xg, yg = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    mask = (xg > yg).view(-1) & (dist == 2).view(-1)
    idx_shift1 = six_neighbourhood.unsqueeze(1).repeat(1, 6, 1).view(-1, 3)[mask, :]
    idx_shift2 = six_neighbourhood.unsqueeze(0).repeat(6, 1, 1).view(-1, 3)[mask, :]
    mshift1 = torch.zeros(12, 1, 3, 3, 3)
    mshift1.view(-1)[torch.arange(12) * 27 + idx_shift1[:, 0] * 9 + idx_shift1[:, 1] * 3 + idx_shift1[:, 2]] = 1
    mshift2 = torch.zeros(12, 1, 3, 3, 3)
    mshift2.view(-1)[torch.arange(12) * 27 + idx_shift2[:, 0] * 9 + idx_shift2[:, 1] * 3 + idx_shift2[:, 2]] = 1
    rpad1 = torch.nn.ReplicationPad3d(dilation)
    rpad2 = torch.nn.ReplicationPad3d(radius)
    ssd = F.avg_pool3d(
        rpad2((F.conv3d(rpad1(img), mshift1, dilation=dilation) - F.conv3d(rpad1(img), mshift2, dilation=dilation)) ** 2),
        kernel_size,
        stride=1,
    )
    mind = ssd - torch.min(ssd, 1, keepdim=True)[0]
    mind_var = torch.mean(mind, 1, keepdim=True)
    mind_var = torch.clamp(mind_var, (mind_var.mean() * 0.001).item(), (mind_var.mean() * 1000).item())
    mind /= mind_var
    mind = torch.exp(-mind)
    return mind[:, torch.tensor([6, 8, 1, 11, 2, 10, 0, 7, 9, 4, 5, 3], dtype=torch.long)]


@pytest.mark.parametrize("radius, dilation", [(2, 2), (1, 1)])
def test_mind_ssc_matches_reference_implementation(radius, dilation):
    image = _smooth_image() + 0.05 * torch.rand(1, 1, 20, 22, 24)
    ours = losses.mind_ssc(image, radius=radius, dilation=dilation)
    assert ours.shape == (1, 12, 20, 22, 24)
    assert torch.allclose(ours, _reference_mind_ssc(image, radius, dilation), atol=1e-5)


def test_mind_ssc_is_per_item_and_finite_on_constant_images():
    a, b = _smooth_image(seed=4), torch.full((1, 1, 20, 22, 24), 0.7)
    both = losses.mind_ssc(torch.cat([a, b]))
    assert torch.allclose(both[:1], losses.mind_ssc(a), atol=1e-6)
    assert torch.allclose(both[1:], torch.ones_like(both[1:]))  # no structure: exp(-0)
    with pytest.raises(MorphSeekError, match=r"\(B, 1, D, H, W\)"):
        losses.mind_ssc(torch.cat([a, b], dim=1))


def test_mind_loss_is_invariant_to_intensity_inversion_but_not_to_misalignment():
    a = _smooth_image(seed=5)
    inverted = 1.0 - a  # a different "modality" with the same structure
    assert losses.mind_loss(a, a).item() == 0.0
    # MIND compares squared intensity differences within the image, so inversion leaves it unchanged
    # (up to rounding), while MSE sees a large difference
    assert losses.mind_loss(a, inverted).item() < 1e-9
    assert losses.mse(a, inverted).item() > 0.05
    assert losses.mind_loss(a, 0.5 * a + 0.2).item() < 1e-9
    # ... yet it is sensitive to structure: a 2-voxel shift costs orders of magnitude more
    assert losses.mind_loss(a, torch.roll(inverted, 2, dims=3)).item() > 1e-3


def test_mind_prefers_alignment_across_modalities_where_mse_does_not():
    """Two 'modalities' of one label map (unrelated, non-monotone intensities per label): MIND is
    lowest for the aligned pair, below every shifted one, whereas MSE prefers the shifted ones."""
    labels = _label_map()
    t1 = torch.tensor([0.0, 0.9, 0.3, 0.6, 0.1])[labels]
    t2 = torch.tensor([0.5, 0.1, 1.0, 0.2, 0.8])[labels]
    shifted = [torch.roll(t2, s, dims=d) for d in (2, 3, 4) for s in (1, 3)]
    aligned_mind = losses.mind_loss(t1, t2).item()
    assert aligned_mind < 0.8 * min(losses.mind_loss(t1, m).item() for m in shifted)
    assert losses.mse(t1, t2).item() > max(losses.mse(t1, m).item() for m in shifted)


# ------------------------------------------------------------------------------- regulariser
def test_diffusion_regulariser_of_linear_ramps_is_hand_computed():
    shape = (6, 7, 8)
    k, j, i = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    disp = torch.zeros(1, 3, *shape, dtype=torch.float64)
    disp[0, 0] = 0.3 * k  # forward difference 0.3 along D, in 1 channel of 3: mean 0.09 / 3; other axes 0
    assert losses.diffusion_regulariser(disp).item() == pytest.approx(0.09 / 9)
    disp[0, 2] = -0.5 * j  # adds (0.25 / 3) / 3 from the H axis
    assert losses.diffusion_regulariser(disp).item() == pytest.approx(0.09 / 9 + 0.25 / 9)
    assert losses.diffusion_regulariser(torch.full((1, 3, *shape), 2.0)).item() == 0.0  # translation
    with pytest.raises(MorphSeekError, match="displacement"):
        losses.diffusion_regulariser(torch.zeros(1, 2, *shape))


def test_diffusion_regulariser_gradient_is_that_of_its_formula():
    # the gradient is written out by hand (faster); autograd through the slice formula must agree
    disp = torch.randn(2, 3, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    losses.diffusion_regulariser(disp).backward()
    reference = disp.detach().clone().requires_grad_(True)
    d = [reference.diff(dim=k) for k in (2, 3, 4)]
    (sum(torch.mean(x**2) for x in d) / 3.0).backward()
    torch.testing.assert_close(disp.grad, reference.grad, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(losses.diffusion_regulariser, (disp.detach().requires_grad_(True),))


def test_ncc_against_a_fixed_image_equals_ncc_with_its_gradient():
    # adapt computes the fixed image's window sums once; the loss and its gradient must not change
    g = torch.Generator().manual_seed(3)
    fixed = torch.rand(1, 1, 9, 10, 11, generator=g, dtype=torch.float64)
    warped = torch.rand(1, 1, 9, 10, 11, generator=g, dtype=torch.float64, requires_grad=True)
    reference = warped.detach().clone().requires_grad_(True)
    loss = losses.local_ncc_to(fixed, 5)(warped)
    expected = losses.local_ncc_loss(reference, fixed, 5)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(warped.grad, reference.grad, rtol=1e-10, atol=1e-14)
    with pytest.raises(MorphSeekError, match="window"):
        losses.local_ncc_to(fixed, 4)
    with pytest.raises(MorphSeekError, match="differ"):
        losses.local_ncc_to(fixed, 5)(warped[:, :, 1:])


# ---------------------------------------------------------------------------------- soft Dice
def test_soft_dice_loss_hand_cases():
    f = torch.zeros(1, 2, 2, 2, 2)
    f[:, 0, 0] = 1.0  # label A: first half of the grid
    f[:, 1, 1] = 1.0  # label B: second half
    assert losses.soft_dice_loss(f, f).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.soft_dice_loss(f, f.flip(1)).item() == pytest.approx(1.0, abs=1e-5)  # disjoint
    # half of each label's voxels match: overlap 2 of 4 + 4 -> Dice 1/2, loss 1/2
    w = torch.zeros_like(f)
    w[:, 0, 0, 0] = 1.0
    w[:, 0, 1, 0] = 1.0
    w[:, 1, 1, 1] = 1.0
    w[:, 1, 0, 1] = 1.0
    assert losses.soft_dice_loss(f, w).item() == pytest.approx(0.5, abs=1e-5)


# ------------------------------------------------------------------------------- selection
def test_similarity_loss_by_name():
    a, b = _smooth_image(seed=8), _smooth_image(seed=9)
    assert losses.similarity_loss("mse")(a, b).item() == pytest.approx(losses.mse(a, b).item())
    assert losses.similarity_loss("NCC", window=3)(a, b).item() == pytest.approx(
        losses.local_ncc_loss(a, b, window=3).item()
    )
    assert losses.similarity_loss("mind")(a, b).item() == pytest.approx(losses.mind_loss(a, b).item())
    with pytest.raises(MorphSeekError, match="unknown similarity loss 'ssim'.*mind, mse, ncc"):
        losses.similarity_loss("ssim")
    with pytest.raises(MorphSeekError, match="bad options"):
        losses.similarity_loss("mse", window=3)


# ------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", ["mse", "ncc", "mind"])
def test_similarity_gradients_are_finite_even_on_flat_images(name):
    loss_fn = losses.similarity_loss(name)
    fixed = _smooth_image(seed=10)
    for moving, flat in ((_smooth_image(seed=11), False), (torch.full_like(fixed, 0.4), True)):
        moving = moving.clone().requires_grad_(True)
        loss = loss_fn(moving, fixed)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(moving.grad).all()
        if not flat or name == "mse":  # NCC and MIND have a zero gradient at a flat image
            assert moving.grad.abs().sum() > 0


def test_regulariser_and_soft_dice_gradients_are_finite():
    disp = torch.randn(1, 3, 8, 8, 8, requires_grad=True)
    losses.diffusion_regulariser(disp).backward()
    assert torch.isfinite(disp.grad).all() and disp.grad.abs().sum() > 0
    fixed = (torch.rand(1, 3, 8, 8, 8) > 0.5).float()
    soft = torch.rand(1, 3, 8, 8, 8, requires_grad=True)
    losses.soft_dice_loss(fixed, soft).backward()
    assert torch.isfinite(soft.grad).all() and soft.grad.abs().sum() > 0


def test_gaussian_blur_keeps_constants_and_the_mean_and_sigma_zero_is_identity():
    from morphseek.geometry import gaussian_blur

    constant = torch.full((1, 1, 9, 10, 11), 0.7)
    assert torch.allclose(gaussian_blur(constant, 1.0), constant, atol=1e-6)
    spike = torch.zeros(1, 1, 15, 15, 15)
    spike[0, 0, 7, 7, 7] = 1.0
    blurred = gaussian_blur(spike, 1.0)
    assert abs(float(blurred.sum()) - 1.0) < 1e-5 and float(blurred.max()) < 0.1
    assert gaussian_blur(spike, 0.0) is spike


def test_presmoothing_takes_away_what_blur_alone_gains():
    """A uniform quarter-voxel shift aligns nothing, but on noisy images its interpolation blur
    lowers NCC by a lot (docs/QUALITY.md section 1); with both images presmoothed it barely does."""
    from morphseek import geometry
    from morphseek.losses import presmoothed, similarity_loss

    generator = torch.Generator().manual_seed(0)
    anatomy = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 40, 40, 40, generator=generator), 5, 1, 2)
    anatomy = (anatomy - anatomy.min()) / (anatomy.max() - anatomy.min())
    moving = anatomy + 0.05 * torch.randn(anatomy.shape, generator=generator)
    fixed = anatomy + 0.05 * torch.randn(anatomy.shape, generator=generator)
    shift = torch.full((1, 3, 40, 40, 40), 0.25)
    gains = {}
    for sigma in (0.0, 1.0):
        loss = presmoothed(similarity_loss("ncc", window=5), sigma)
        before = float(loss(moving, fixed))
        gains[sigma] = (before - float(loss(geometry.warp(moving, shift), fixed))) / before
    assert gains[0.0] > 0.1, gains  # blur passes for alignment
    assert gains[1.0] < gains[0.0] / 3, gains
