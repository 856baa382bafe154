"""Conventions of morphseek.geometry: pull-back warping, composition order, Jacobians."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from morphseek import geometry
from morphseek.errors import MorphSeekError

torch.manual_seed(0)


def _ramp(shape=(12, 14, 16)):
    """An image whose value is a known linear function of the voxel index (trilinear-exact)."""
    k, j, i = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    return (1.0 * k + 10.0 * j + 100.0 * i)[None, None]


def _constant_field(shape, vector):
    return torch.tensor(vector, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, *shape).clone()


def test_translation_is_pull_back_along_array_axes():
    shape = (12, 14, 16)
    image = _ramp(shape)
    disp = _constant_field(shape, (1.0, 2.0, 3.0))  # along D, H, W
    warped = geometry.warp(image, disp, padding_mode="border")
    # interior: warped(k, j, i) = image(k + 1, j + 2, i + 3) = ramp + 1 + 20 + 300
    inner = (slice(None), slice(None), slice(0, 10), slice(0, 11), slice(0, 12))
    assert torch.allclose(warped[inner], image[inner] + 321.0, atol=1e-3)


def test_fractional_displacement_is_trilinear():
    shape = (8, 9, 10)
    image = _ramp(shape)
    disp = _constant_field(shape, (0.25, -0.5, 0.75))
    warped = geometry.warp(image, disp)
    expected = image + 0.25 + 10 * -0.5 + 100 * 0.75
    assert torch.allclose(warped[:, :, 1:-1, 1:-1, 1:-2], expected[:, :, 1:-1, 1:-1, 1:-2], atol=1e-3)


def test_warp_of_a_box_is_that_box_of_the_whole_warp():
    # test-time optimisation warps only the box around the content: the same points, the same values
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 2, 9, 10, 11, generator=g)
    disp = 1.5 * torch.randn(1, 3, 9, 10, 11, generator=g)
    box = (slice(2, 7), slice(0, 10), slice(3, 9))
    part = geometry.warp(image, disp[(slice(None), slice(None), *box)], region=box)
    torch.testing.assert_close(part, geometry.warp(image, disp)[(slice(None), slice(None), *box)], rtol=0, atol=1e-6)
    with pytest.raises(MorphSeekError, match="differs from field grid"):
        geometry.warp(image, disp, region=box)


def test_labels_warp_nearest_and_keep_values():
    labels = torch.zeros(1, 1, 10, 10, 10, dtype=torch.int64)
    labels[:, :, 2:5, 2:5, 2:5] = 7
    labels[:, :, 6:8, 6:8, 6:8] = 1000
    disp = _constant_field((10, 10, 10), (1.0, 0.0, -1.0)) + 0.2 * torch.rand(1, 3, 10, 10, 10) - 0.1
    warped = geometry.warp_labels(labels, disp)
    assert warped.dtype == torch.int64
    assert set(torch.unique(warped).tolist()) <= {0, 7, 1000}
    expected = torch.zeros_like(labels)
    expected[:, :, 1:4, 2:5, 3:6] = 7
    expected[:, :, 5:7, 6:8, 7:9] = 1000
    assert torch.equal(warped, expected)


def test_compose_matches_sequential_warping_of_smooth_fields():
    shape = (16, 16, 16)
    coarse = torch.randn(1, 3, 4, 4, 4) * 1.5
    u1 = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
    u2 = torch.nn.functional.interpolate(torch.randn(1, 3, 4, 4, 4), size=shape, mode="trilinear", align_corners=True)
    k, j, i = torch.meshgrid(*[torch.linspace(0, 3.1, n) for n in shape], indexing="ij")
    image = (torch.sin(k) * torch.cos(j) + 0.5 * torch.sin(i))[None, None]
    total = geometry.compose(u1, u2)
    # Phi_2 = Phi_1 o phi_2: first step u1 warps the moving image, second step warps that result by u2
    sequential = geometry.warp(geometry.warp(image, u1, padding_mode="border"), u2, padding_mode="border")
    once = geometry.warp(image, total, padding_mode="border")
    interior = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    assert (sequential[interior] - once[interior]).abs().max() < 0.05
    # and the order matters: the other composition is measurably different
    wrong = geometry.warp(image, geometry.compose(u2, u1), padding_mode="border")
    assert (sequential[interior] - wrong[interior]).abs().max() > 0.1


def test_compose_of_translations_adds_them():
    shape = (10, 10, 10)
    total = geometry.compose(_constant_field(shape, (1, 0, 2)), _constant_field(shape, (0.5, 1, -1)))
    assert torch.allclose(total, _constant_field(shape, (1.5, 1, 1)), atol=1e-5)


def test_jacobian_of_linear_map_and_numpy_gradient_agreement():
    shape = (9, 10, 11)
    a = torch.tensor([[1.2, 0.1, 0.0], [0.0, 0.8, 0.3], [0.2, 0.0, 1.1]])
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    disp = (torch.einsum("ab,bdhw->adhw", a - torch.eye(3), idx))[None]
    det = geometry.jacobian_determinant(disp)
    assert torch.allclose(det, torch.full_like(det, float(torch.det(a))), atol=1e-4)

    rough = torch.randn(1, 3, *shape)
    det_t = geometry.jacobian_determinant(rough)[0].numpy()
    g = [np.gradient(rough[0, c].numpy()) for c in range(3)]
    jac = np.stack([np.stack(g[c], 0) for c in range(3)], 0) + np.eye(3)[:, :, None, None, None]
    det_np = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
    assert np.allclose(det_t, det_np, atol=1e-4)


def test_folding_fraction_counts_non_positive_determinants():
    disp = torch.zeros(1, 3, 10, 10, 10)
    idx = torch.arange(10, dtype=torch.float32)
    disp[0, 2] = (-2.0 * idx).view(1, 1, 10)  # x -> -x along W: det = -1 everywhere
    disp[0, 2, :5] = 0.0  # first half along D untouched (det 1), the boundary slice mixes
    frac = geometry.folding_fraction(disp)
    det = geometry.jacobian_determinant(disp)
    assert frac.item() == pytest.approx((det <= 0).float().mean().item())
    assert 0.4 <= frac.item() <= 0.6


def test_resize_displacement_keeps_physical_meaning():
    # a field that shifts by 2 voxels of a 9-voxel axis = 1/4 of the extent; on 17 voxels that is 4 voxels
    disp = _constant_field((9, 9, 9), (2.0, 0.0, -1.0))
    big = geometry.resize_displacement(disp, (17, 17, 17))
    assert torch.allclose(big, _constant_field((17, 17, 17), (4.0, 0.0, -2.0)), atol=1e-5)


def test_bad_shapes_are_rejected():
    with pytest.raises(MorphSeekError, match="shape"):
        geometry.warp(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(MorphSeekError, match="differs"):
        geometry.warp(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 3, 4, 4, 5))


def test_regrid_is_resize_displacement_between_grids_with_the_same_corners():
    disp = torch.randn(1, 3, 9, 7, 5)
    shape = (17, 13, 9)
    scale = [(m - 1) / (n - 1) for m, n in zip(disp.shape[2:], shape)]  # new index i is old scale * i
    torch.testing.assert_close(geometry.regrid(disp, shape, scale, [0.0, 0.0, 0.0]),
                               geometry.resize_displacement(disp, shape), rtol=0, atol=1e-5)


def test_regrid_keeps_a_linear_map_at_any_offset_and_spacing():
    # u(k) = A k + b in old voxels (array axes) is, on a grid with index k' = (k - offset) / scale,
    # the same physical map: new values (A (scale k' + offset) + b) / scale
    old = (10, 12, 14)
    k = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in old], indexing="ij"))
    a = torch.tensor([[0.05, 0.0, 0.01], [0.0, -0.03, 0.0], [0.02, 0.0, 0.04]], dtype=torch.float64)
    b = torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64)
    disp = (torch.einsum("ij,jdhw->idhw", a, k) + b.view(3, 1, 1, 1))[None]
    scale, offset, shape = [0.5, 0.5, 0.5], [1.25, 2.0, 0.5], (15, 17, 20)  # inside the old grid
    kn = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))
    at_old = kn * torch.tensor(scale, dtype=torch.float64).view(3, 1, 1, 1) + torch.tensor(offset, dtype=torch.float64).view(3, 1, 1, 1)
    expected = (torch.einsum("ij,jdhw->idhw", a, at_old) + b.view(3, 1, 1, 1)) / 0.5
    torch.testing.assert_close(geometry.regrid(disp, shape, scale, offset)[0], expected, rtol=0, atol=1e-9)


def test_regrid_equals_trilinear_grid_sampling_with_the_border_beyond_the_old_grid():
    """The per-axis interpolation is trilinear ``grid_sample`` (align_corners, border padding) at the
    new grid's points, also where they fall beyond the old grid (a batch, an axis of one voxel)."""
    disp = torch.randn(2, 3, 6, 9, 1, dtype=torch.float64)
    shape, scale, offset = (11, 7, 4), [0.6, 1.7, 0.5], [-1.3, 0.4, -0.5]
    axes = [(torch.arange(n, dtype=torch.float64) * a + b) * 2.0 / max(m - 1, 1) - 1.0
            for n, m, a, b in zip(shape, disp.shape[2:], scale, offset)]
    d, h, w = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack((w, h, d), dim=-1)[None].expand(2, -1, -1, -1, -1)
    expected = torch.nn.functional.grid_sample(disp, grid, mode="bilinear", padding_mode="border", align_corners=True)
    expected = expected / torch.tensor(scale, dtype=torch.float64).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(geometry.regrid(disp, shape, scale, offset), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("depth", [9, 12, 3])  # uneven slabs, even slabs, too thin to split
@pytest.mark.parametrize("mode,padding", [("bilinear", "zeros"), ("bilinear", "border"), ("nearest", "zeros")])
def test_grid_sample_on_every_thread_gives_grid_samples_values(depth, mode, padding, monkeypatch):
    """geometry.grid_sample cuts a batch of one into slabs along D, one per thread (PyTorch's 3D CPU
    kernel parallelises over the batch only): the same values as F.grid_sample, from 1 to 3
    threads, and the same gradient with respect to the grid."""
    gen = torch.Generator().manual_seed(depth)
    source = torch.randn(1, 2, 7, 8, 6, generator=gen)
    grid = (torch.rand(1, depth, 5, 4, 3, generator=gen) * 2.4 - 1.2).requires_grad_()
    expected = F.grid_sample(source, grid, mode=mode, padding_mode=padding, align_corners=True)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), grid)
    calls = []
    original = F.grid_sample
    monkeypatch.setattr(F, "grid_sample", lambda s, g, **kw: calls.append(g.shape[0]) or original(s, g, **kw))
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            calls.clear()
            out = geometry.grid_sample(source, grid, mode=mode, padding_mode=padding)
            assert torch.equal(out, expected)
            (grad,) = torch.autograd.grad(out.square().sum(), grid)
            assert torch.equal(grad, expected_grad)
            assert calls == [n if depth >= 2 * n else 1]  # one slab per thread where they fit
    finally:
        torch.set_num_threads(threads)


def test_grid_sample_keeps_one_batch_when_the_sources_gradient_is_needed(monkeypatch):
    source = torch.randn(1, 1, 6, 6, 6, requires_grad=True)
    grid = torch.rand(1, 8, 6, 6, 3) * 2 - 1
    calls = []
    original = F.grid_sample
    monkeypatch.setattr(F, "grid_sample", lambda s, g, **kw: calls.append(g.shape[0]) or original(s, g, **kw))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        geometry.grid_sample(source, grid)
        with torch.no_grad():
            geometry.grid_sample(source, grid)
    finally:
        torch.set_num_threads(threads)
    assert calls == [1, 2]


def test_content_box_holds_the_content_and_its_margin_in_whole_multiples_of_the_divisor():
    shape = (48, 64, 40)
    image = torch.zeros(1, 1, *shape)
    image[..., 12:30, 20:41, 9:23] = 0.8  # the content
    noise = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(0)) * 0.15  # faint background
    box = geometry.content_box([image + noise * (image == 0)], divisor=8, margin=4)
    assert box is not None
    for s, n, (lo, hi) in zip(box, shape, ((12, 30), (20, 41), (9, 23))):
        assert 0 <= s.start and s.stop <= n and (s.stop - s.start) % 8 == 0
        assert s.start <= lo - 4 and s.stop >= hi + 4  # the content and its margin (to the pooled 4 voxels)
        assert s.stop - s.start <= hi - lo + 2 * 4 + 2 * 4 + 8  # not much more: pooling and rounding
    # a second image widens the box to both contents; content everywhere or nowhere: the whole grid
    other = torch.zeros(1, 1, *shape)
    other[..., 36:44, 2:6, 30:38] = 1.0
    both = geometry.content_box([image, other], divisor=8, margin=4)
    assert both[0].stop >= 44 + 4 and both[1].start == 0 and both[2].stop >= 38
    assert geometry.content_box([torch.ones(1, 1, *shape)], 8, 4) is None
    assert geometry.content_box([torch.zeros(1, 1, *shape)], 8, 4) is None
