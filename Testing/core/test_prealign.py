"""Affine pre-alignment (morphseek.prealign): accuracy on a known affine, repeatability, the
downsampling that keeps it fast on large images, cancel and Ctrl-C, the plausibility guard."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk

from morphseek import prealign
from morphseek.errors import Cancelled, MorphSeekError
from test_io import image_from_function, rotation  # the same geometry helpers as the io tests




# A phantom: a body ellipsoid with four inner structures, soft (about 1 mm) edges.
PHANTOM = [((0, 0, 0), (24, 19, 15), 0.3), ((8, -5, 3), (6, 4, 5), 0.7), ((-9, 6, -2), (5, 7, 4), 0.5),
           ((2, 10, -6), (3, 3, 6), 0.4), ((-6, -8, 5), (3, 3, 3), 0.6)]


def phantom(points):
    value = np.zeros(points.shape[:-1])
    for centre, axes, intensity in PHANTOM:
        radius = np.sqrt((((points - np.asarray(centre)) / np.asarray(axes)) ** 2).sum(-1))
        value += intensity / (1 + np.exp((radius - 1) * min(axes) / 0.7))
    return value


# T_true maps fixed points to moving points: 8 degree rotation, mild anisotropic scaling, translation.
MATRIX = rotation((0.3, 1.0, 0.2), 8.0) @ np.diag([1.03, 0.97, 1.0])
TRANSLATION = np.array([4.0, -3.0, 2.0])


def _pair(size, spacing):
    origin = tuple(-(n - 1) * s / 2 for n, s in zip(size, spacing))
    grid = dict(size=size, spacing=spacing, origin=origin, direction=np.eye(3))
    fixed = image_from_function(function=phantom, **grid)
    inverse = np.linalg.inv(MATRIX)
    # moving(T_true(x)) = fixed(x), and a different intensity mapping (MI must cope with it)
    moving = image_from_function(function=lambda y: 1.0 - 0.8 * phantom((y - TRANSLATION) @ inverse.T), **grid)
    return fixed, moving


def _errors(transform):
    points = np.stack(np.meshgrid(*[np.linspace(-20, 20, 5)] * 3, indexing="ij"), -1).reshape(-1, 3)
    found = np.array([transform.TransformPoint(tuple(p)) for p in points])
    truth = points @ MATRIX.T + TRANSLATION
    return np.linalg.norm(found - truth, axis=1), np.linalg.norm(points - truth, axis=1)


@pytest.mark.parametrize("size, spacing", [((36, 36, 36), (2.0, 2.0, 2.0)),  # small: not shrunk
                                           ((100, 90, 80), (0.8, 0.8, 1.0))])  # shrunk 4x per axis
@pytest.mark.parametrize("setting", [{}, {"sampling": 1.0, "affine_min_step": 1e-3}],
                         ids=["default", "affine stage on every voxel"])
def test_affine_prealign_recovers_known_affine_and_repeats(size, spacing, setting):
    fixed, moving = _pair(size, spacing)
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    transform = prealign.affine_prealign(fixed, moving, **setting)
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == threads  # restored after the run
    errors, start = _errors(transform)
    assert start.mean() > 5.0  # the problem is not trivial
    assert errors.mean() < 1.0 and errors.max() < 1.5, (errors.mean(), errors.max())
    again = prealign.affine_prealign(fixed, moving, **setting)  # fixed sampling seed, one thread: the same answer
    np.testing.assert_allclose(again.GetParameters(), transform.GetParameters(), rtol=0, atol=1e-12)


def test_registration_runs_on_a_shrunk_image_of_bounded_size():
    big = sitk.Image([512, 512, 400], sitk.sitkInt16)
    big.SetSpacing((0.7, 0.7, 1.25))
    factors = prealign.shrink_factors(big)
    small_size = [n // f for n, f in zip(big.GetSize(), factors)]
    assert max(small_size) <= prealign.PREALIGN_MAX_SIZE and min(small_size) >= 32
    # about 4 mm where that keeps enough voxels; a small image is left alone
    assert prealign.shrink_factors(sitk.Image([160, 192, 224], sitk.sitkFloat32)) == [4, 4, 4]
    assert prealign.shrink_factors(sitk.Image([40, 40, 40], sitk.sitkFloat32)) == [1, 1, 1]
    fixed, _ = _pair((100, 90, 80), (0.8, 0.8, 1.0))
    small = prealign.downsample(fixed)
    factors = prealign.shrink_factors(fixed)
    assert factors == [3, 2, 2]  # 0.8 mm x 100 -> 33 voxels (not below 32), 1 mm x 80 -> 40
    assert small.GetSize() == tuple(n // f for n, f in zip(fixed.GetSize(), factors))
    # same physical extent (block averages: the corner of the first block is kept)
    corner = lambda img: np.asarray(img.TransformContinuousIndexToPhysicalPoint([-0.5] * 3))  # noqa: E731
    np.testing.assert_allclose(corner(small), corner(fixed), atol=1e-6)
    values = sitk.GetArrayViewFromImage(small)
    assert values.dtype == np.float32 and values.min() >= 0 and values.max() <= 1


def test_cancel_stops_the_optimiser_and_restores_threads():
    fixed, moving = _pair((36, 36, 36), (2.0, 2.0, 2.0))
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    polls = []

    def cancel():
        polls.append(1)
        return len(polls) > 5  # a few iterations in

    with pytest.raises(Cancelled):
        prealign.affine_prealign(fixed, moving, cancel=cancel)
    assert len(polls) == 6  # stopped at the first poll that said so
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == threads


def test_ctrl_c_during_the_optimiser_is_a_keyboard_interrupt():
    fixed, moving = _pair((36, 36, 36), (2.0, 2.0, 2.0))
    polls = []

    def interrupted():  # what Python's SIGINT handler does inside the iteration observer
        polls.append(1)
        if len(polls) == 3:
            raise KeyboardInterrupt
        return False

    with pytest.raises(KeyboardInterrupt):
        prealign.affine_prealign(fixed, moving, cancel=interrupted)
    assert len(polls) == 3


def test_affine_plausibility_guard_rejects_reflections_and_extreme_scaling():
    ok = sitk.AffineTransform(3)
    ok.SetMatrix((1.1, 0.05, 0, 0, 0.95, 0, 0, 0, 1.0))
    reflection = sitk.AffineTransform(3)
    reflection.SetMatrix((1, 0, 0, 0, 1, 0, 0, 0, -1))
    squash = sitk.AffineTransform(3)
    squash.SetMatrix((0.5, 0, 0, 0, 1, 0, 0, 0, 1))
    assert prealign.plausible_affine(ok)
    assert not prealign.plausible_affine(reflection)
    assert not prealign.plausible_affine(squash)


def test_prealign_keeps_the_headers_placement_when_it_cannot_improve_on_it():
    # a pair already aligned: the registration on shrunk images must not make it worse
    from morphseek.prealign import affine_prealign

    rng = np.random.default_rng(3)
    array = rng.random((24, 28, 32)).astype(np.float32)
    image = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(array), 1.5)
    image.SetSpacing((2.0, 2.0, 2.0))
    transform = affine_prealign(image, image)
    np.testing.assert_allclose(np.asarray(transform.GetMatrix()).reshape(3, 3), np.eye(3), atol=1e-3)
    np.testing.assert_allclose(transform.GetTranslation(), 0.0, atol=1e-2)


LINUX_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pre-alignment forks only on Linux")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@LINUX_ONLY
def test_the_pre_alignment_in_a_child_process_gives_the_same_transform():
    fixed, moving = _pair((36, 36, 36), (2.0, 2.0, 2.0))
    fds = _open_fds()
    child = prealign.PrealignInChild(fixed, moving)
    found = child.result()
    here = prealign.affine_prealign(fixed, moving)
    np.testing.assert_array_equal(found.GetParameters(), here.GetParameters())
    np.testing.assert_array_equal(found.GetFixedParameters(), here.GetFixedParameters())
    child.stop()  # idempotent
    assert _open_fds() == fds


@LINUX_ONLY
@pytest.mark.parametrize("how", ["cancel", "stop from another thread", "killed"])
def test_a_child_stopped_mid_run_is_reaped_and_reported(how):
    fixed, moving = _pair((100, 90, 80), (0.8, 0.8, 1.0))
    fds = _open_fds()
    child = prealign.PrealignInChild(fixed, moving)
    pid, start = child._pid, time.perf_counter()
    if how == "cancel":
        with pytest.raises(Cancelled):
            child.result(cancel=lambda: time.perf_counter() - start > 0.3)
    elif how == "stop from another thread":  # the command line's Ctrl-C: main thread stops, worker waits
        threading.Timer(0.3, child.stop).start()
        with pytest.raises(Cancelled):
            child.result()
    else:  # e.g. the kernel's out-of-memory killer
        threading.Timer(0.3, lambda: os.kill(pid, signal.SIGKILL)).start()
        with pytest.raises(MorphSeekError, match="was killed by signal 9"):
            child.result()
    assert time.perf_counter() - start < 5.0
    with pytest.raises(ChildProcessError):  # killed and reaped: nothing left behind
        os.waitpid(pid, os.WNOHANG)
    assert _open_fds() == fds


@LINUX_ONLY
def test_errors_in_the_child_reach_the_parent_as_one_line():
    fixed, moving = _pair((36, 36, 36), (2.0, 2.0, 2.0))
    with pytest.raises(MorphSeekError, match="init must be"):  # ours, as it is
        prealign.PrealignInChild(fixed, moving, init="nonsense").result()
    with pytest.raises(MorphSeekError, match="failed: ValueError"):  # anything else, named
        prealign.PrealignInChild(fixed, moving, iterations="many").result()


@LINUX_ONLY
def test_no_child_is_forked_beside_other_threads_or_when_children_are_reaped_unseen():
    fixed, moving = _pair((36, 36, 36), (2.0, 2.0, 2.0))
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert prealign.PrealignInChild.start(fixed, moving) is None
    finally:
        release.set()
        other.join()
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        assert prealign.PrealignInChild.start(fixed, moving) is None
    finally:
        signal.signal(signal.SIGCHLD, previous)


@pytest.mark.parametrize("size, spacing, rigid, affine", [
    ((100, 90, 80), (0.8, 0.8, 1.0), ([2], 200, 1.0), ([2, 1], 100, 0.25)),  # shrunk to 33x45x40
    ((256, 256, 24), (0.9, 0.9, 5.0), ([1], 100, 0.25), ([1], 100, 0.25)),  # 64x64x24: too thin
])
def test_the_rigid_stage_runs_on_the_coarse_levels_unless_the_image_is_too_thin(monkeypatch, size, spacing,
                                                                                rigid, affine):
    """The rigid stage only starts the affine one: on every voxel of the coarse levels, with twice the
    iterations; an image without a coarse level (a thin stack of slices) keeps the affine stage's
    settings there, since every voxel of its full level would cost four times as much."""
    calls = []
    register = prealign._register

    def recording(fixed, moving, initial, shrink, iterations, seed, cancel, sampling, min_step):
        calls.append((list(shrink), iterations, sampling))
        return register(fixed, moving, initial, shrink, iterations, seed, cancel, sampling, min_step)

    monkeypatch.setattr(prealign, "_register", recording)
    sigma = [n * s / 5 for n, s in zip(size, spacing)]
    fixed = sitk.GaussianSource(sitk.sitkFloat32, list(size), sigma=sigma, mean=[n / 2 for n in size])
    moving = sitk.GaussianSource(sitk.sitkFloat32, list(size), sigma=sigma, mean=[n / 2 + 1 for n in size])
    for image in (fixed, moving):
        image.SetSpacing(spacing)
    prealign.affine_prealign(fixed, moving, iterations=100)
    assert calls == [rigid, affine]
