"""Affine pre-alignment with SimpleITK, on a downsampled pair: fast, repeatable, interruptible.

The pre-alignment only has to bring the moving image near the fixed one (the network does the rest),
so it runs on both images shrunk to about ``PREALIGN_SPACING`` mm (block averages by
``sitk.BinShrink``: anti-aliased, one pass, no full-resolution copy), at most ``PREALIGN_MAX_SIZE``
voxels along any axis and never below ``PREALIGN_MIN_SIZE`` voxels through shrinking. Its cost is
then that of a ~50^3 problem whatever the size of the input (a 160x192x224 brain: about 1 s instead
of minutes; a 512x512x400 CT: the same, plus one pass over each image to shrink it).

Determinism: one ITK thread for the registration, a fixed metric sampling seed: the same pair gives
the same transform to 1e-12 on every run.

Cancel and Ctrl-C: an iteration observer polls ``cancel()`` at every optimiser iteration and stops
the optimiser (``StopRegistration``) when it returns True or when Ctrl-C (KeyboardInterrupt) arrives
while it runs; the pre-alignment then raises :class:`~morphseek.errors.Cancelled` (for ``cancel``) or
re-raises KeyboardInterrupt (for Ctrl-C). Nothing is left half-set: the process-wide ITK thread count
is restored in every case.
"""

from __future__ import annotations

import json
import math
import os
import select
import signal
import sys
import threading
import warnings
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .errors import Cancelled, MorphSeekError
from .io import check_volume, normalise_intensities

#: Target voxel size (mm) of the images the affine registration runs on.
PREALIGN_SPACING = 4.0
#: At most this many voxels along any axis after shrinking (very large fields of view).
PREALIGN_MAX_SIZE = 80
#: Shrinking for the target spacing stops at this many voxels along an axis (small images stay as they are).
PREALIGN_MIN_SIZE = 32


def shrink_factors(image: sitk.Image, spacing: float = PREALIGN_SPACING, max_size: int = PREALIGN_MAX_SIZE,
                   min_size: int = PREALIGN_MIN_SIZE) -> list[int]:
    """Integer block-averaging factor per axis (x, y, z): about ``spacing`` mm, keeping at least
    ``min_size`` voxels, and at most ``max_size`` voxels whatever that costs in spacing."""
    factors = []
    for n, s in zip(image.GetSize(), image.GetSpacing()):
        f = max(1, int(spacing / s))  # towards the target spacing...
        f = min(f, max(1, n // min_size))  # ...without making a small image tiny...
        f = max(f, math.ceil(n / max_size))  # ...but never more than max_size voxels
        factors.append(int(f))
    return factors


def downsample(image: sitk.Image, spacing: float = PREALIGN_SPACING, max_size: int = PREALIGN_MAX_SIZE,
               min_size: int = PREALIGN_MIN_SIZE) -> sitk.Image:
    """``image`` block-averaged by :func:`shrink_factors` (geometry kept: same extent, larger voxels),
    as float32 normalised to [0, 1] (1-99 percentiles of the shrunk image)."""
    factors = shrink_factors(image, spacing, max_size, min_size)
    image = sitk.Cast(image, sitk.sitkFloat32) if image.GetPixelID() != sitk.sitkFloat32 else image
    small = sitk.BinShrink(image, factors) if max(factors) > 1 else image
    out = sitk.GetImageFromArray(normalise_intensities(sitk.GetArrayViewFromImage(small)))
    out.CopyInformation(small)
    return out


def affine_prealign(fixed: sitk.Image, moving: sitk.Image, iterations: int = 100, init: str = "moments",
                    seed: int = 1234, spacing: float = PREALIGN_SPACING, max_size: int = PREALIGN_MAX_SIZE,
                    cancel: Callable[[], bool] | None = None, sampling: float = 0.25,
                    min_step: float = 1e-4, affine_min_step: float | None = None) -> sitk.AffineTransform:
    """Affine registration of ``moving`` to ``fixed`` with SimpleITK (works across modalities).

    Both images are shrunk (:func:`downsample`, about ``spacing`` mm, at most ``max_size`` voxels per
    axis) and percentile-normalised. The transform starts from the centres of mass
    (``init="moments"``) or the geometric centres (``"geometry"``); a rigid stage then an affine stage
    started from it (a 12-parameter affine alone stalls in poor local optima) each minimise Mattes
    mutual information (32 bins; one thread, so runs repeat to 1e-12) by regular-step gradient
    descent over a 4-2-1 pyramid (coarse levels dropped for small images), down to ``min_step``
    (``affine_min_step`` for the affine stage; default the same). The affine stage runs on every
    level, on ``sampling`` of the voxels drawn at random with a fixed ``seed`` (1 = every voxel), at
    most ``iterations`` steps per level; the rigid stage on the coarse levels only, on every voxel,
    at most 2 x ``iterations`` steps per level (an image too thin for a coarse level: as the affine
    stage). Every voxel in the affine stage aligns better after the pre-alignment alone but not after
    the network, for up to twice the time (docs/BENCHMARKS.md), so it is not the default.
    ``cancel()`` is polled at every iteration (Cancelled is raised when it returns True; Ctrl-C stops
    it too). Returns a transform that maps FIXED physical points to MOVING physical points
    (SimpleITK's convention): ``resample_to(moving, fixed, T)`` aligns them."""
    mode = {"moments": sitk.CenteredTransformInitializerFilter.MOMENTS,
            "geometry": sitk.CenteredTransformInitializerFilter.GEOMETRY}.get(init)
    if mode is None:
        raise MorphSeekError(f"affine_prealign: init must be 'moments' or 'geometry', got {init!r}")
    fixed = downsample(check_volume(fixed, "fixed", "image"), spacing, max_size)
    _poll(cancel)
    moving = downsample(check_volume(moving, "moving", "image"), spacing, max_size)
    _poll(cancel)
    rigid = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(), mode)
    levels = pyramid(fixed)
    if len(levels) > 1:
        # The rigid stage only starts the affine one, which refines it on every level: it runs on
        # the coarse levels alone, on every voxel there (no sampling noise) and with twice the
        # iterations, which together cost less than one fine level. A fifth to a third less time
        # for the same alignment (docs/BENCHMARKS.md, run 7).
        rigid = _register(fixed, moving, rigid, levels[:-1], 2 * iterations, seed, cancel, 1.0, min_step)
    else:  # too thin for a coarse level (e.g. fewer than 32 slices): every voxel would cost 4x here
        rigid = _register(fixed, moving, rigid, levels, iterations, seed, cancel, sampling, min_step)
    rigid = _unwrap(rigid)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    rigid_as_affine = sitk.AffineTransform(affine)
    affine = sitk.AffineTransform(_unwrap(_register(
        fixed, moving, affine, levels, iterations, seed, cancel, sampling,
        min_step if affine_min_step is None else affine_min_step)))
    # On small or nearly symmetric fields of view the 12-parameter stage can drift into a reflection
    # or an implausible scaling; then the rigid result is the safer pre-alignment.
    found = affine if plausible_affine(affine) else rigid_as_affine
    # Images that the headers already place well (e.g. pairs aligned beforehand) can come out worse
    # from a registration on shrunk images: keep the headers' placement unless the result is better.
    identity = sitk.AffineTransform(3)
    return found if _metric(fixed, moving, found) <= _metric(fixed, moving, identity) else identity


def _metric(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    """Mattes mutual information (as registered, all voxels, one thread) of ``moving`` through
    ``transform`` against ``fixed``; +inf when they do not overlap."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetInitialTransform(transform, inPlace=False)
    reg.SetNumberOfThreads(1)
    try:
        return float(reg.MetricEvaluate(fixed, moving))
    except RuntimeError:
        return float("inf")


def plausible_affine(transform: sitk.AffineTransform, max_scale: float = 1.5) -> bool:
    """True when the linear part keeps orientation (det > 0) and scales each axis by at most
    ``max_scale`` (singular values in [1 / max_scale, max_scale])."""
    matrix = np.asarray(transform.GetMatrix(), dtype=float).reshape(3, 3)
    singular = np.linalg.svd(matrix, compute_uv=False)
    return bool(np.linalg.det(matrix) > 0 and singular.max() <= max_scale and singular.min() >= 1.0 / max_scale)


def _poll(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("affine pre-alignment cancelled by the user")


def pyramid(image: sitk.Image) -> list[int]:
    """Shrink factors of the registration's levels, coarse to fine: 4 and 2 where the smallest side
    keeps at least 16 voxels there, then 1."""
    smallest = min(image.GetSize())
    return [f for f in (4, 2) if smallest / f >= 16] + [1]


def _register(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, shrink: list[int],
              iterations: int, seed: int, cancel: Callable[[], bool] | None = None, sampling: float = 0.25,
              min_step: float = 1e-4) -> sitk.Transform:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    if sampling >= 1.0:
        reg.SetMetricSamplingStrategy(reg.NONE)  # every voxel
    else:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(sampling, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=min_step,
                                                 numberOfIterations=int(iterations), relaxationFactor=0.5,
                                                 gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel([f / 2.0 if f > 1 else 0.0 for f in shrink])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(initial, inPlace=False)
    # Stop on cancel or Ctrl-C: a Python exception cannot cross SimpleITK's C++ loop, so the observer
    # records why it stopped and asks the optimiser to stop; the reason is raised after Execute.
    stopped: list[str] = []

    def on_iteration() -> None:
        try:
            if not stopped and cancel is not None and cancel():
                stopped.append("cancel")
        except KeyboardInterrupt:
            stopped.append("interrupt")
        if stopped:
            reg.StopRegistration()

    reg.AddCommand(sitk.sitkIterationEvent, on_iteration)
    # One thread: multithreaded metric sums are added in a varying order, and the optimiser
    # amplifies those 1e-16 differences; a pre-alignment must give the same answer every run.
    # The method's own setting does not reach every internal stage, so the process-wide ITK default
    # is also set to 1 for the duration (and restored).
    reg.SetNumberOfThreads(1)
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        result = reg.Execute(fixed, moving)
    except RuntimeError as err:
        if "Python Callable" in str(err):  # Ctrl-C landed outside the observer's try
            raise KeyboardInterrupt from None
        raise MorphSeekError(f"affine pre-alignment failed: {str(err).strip().splitlines()[-1]}") from None
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
        reg.RemoveAllCommands()
    if "interrupt" in stopped:
        raise KeyboardInterrupt
    if stopped:
        raise Cancelled("affine pre-alignment cancelled by the user")
    return result


def _unwrap(transform: sitk.Transform) -> sitk.Transform:
    """The registration returns a composite holding the optimised transform; unwrap it."""
    transform = transform.Downcast()
    if isinstance(transform, sitk.CompositeTransform):
        transform = transform.GetNthTransform(transform.GetNumberOfTransforms() - 1).Downcast()
    return transform


class PrealignInChild:
    """:func:`affine_prealign` of a pair in a forked child process, started at once.

    The command line imports torch on a thread while the pre-alignment runs. In one process the two
    share the interpreter lock, and the pre-alignment's many short Python calls wait for the
    import's. In a child they run on the two cores apart: a 2 mm brain pair's transform is back
    about 1 s sooner (docs/BENCHMARKS.md, run 6). The child computes exactly what
    :func:`affine_prealign` computes in-process (a test).

    Forking is offered (:meth:`start`) only on Linux, while no other Python thread runs (numpy's
    and ITK's native threads pause across a fork through their own fork handlers), and when the
    child can be waited for; anywhere else :meth:`start` returns None and the caller runs
    :func:`affine_prealign` itself. The child ignores Ctrl-C and dies with its parent; the parent
    kills it on Cancel, Ctrl-C or any error (:meth:`stop`), so none outlives the command."""

    def __init__(self, fixed: sitk.Image, moving: sitk.Image, **settings) -> None:
        import ctypes  # before the fork: the child should not spend time importing

        sys.stdout.flush()
        sys.stderr.flush()  # nothing buffered may be written twice
        parent = os.getpid()
        read, write = os.pipe()
        try:
            with warnings.catch_warnings():  # Python >= 3.12 warns of any native thread (see above)
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        except BaseException:
            os.close(read)
            os.close(write)
            raise
        if pid == 0:  # the child: never returns, never runs the parent's exit handlers
            status = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                try:
                    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
                except (OSError, AttributeError):
                    pass
                if os.getppid() != parent:  # the parent died before that took effect
                    os._exit(1)
                os.close(read)
                try:
                    found = affine_prealign(fixed, moving, **settings)
                    message = {"parameters": list(found.GetParameters()),
                               "fixed_parameters": list(found.GetFixedParameters())}
                except BaseException as error:  # reported by the parent, whatever it is
                    message = {"error": str(error) or type(error).__name__, "type": type(error).__name__,
                               "morphseek": isinstance(error, MorphSeekError)}
                with os.fdopen(write, "w") as pipe:
                    json.dump(message, pipe)  # floats round-trip exactly
                status = 0
            finally:
                os._exit(status)
        os.close(write)
        self._pid, self._read = pid, read
        self._lock = threading.Lock()  # stop() may come from another thread while result() waits
        self._reading = False

    @classmethod
    def start(cls, fixed: sitk.Image, moving: sitk.Image, **settings) -> "PrealignInChild | None":
        """A child pre-aligning the pair, or None where forking is not safe or not possible (then
        run :func:`affine_prealign` in-process)."""
        if (not sys.platform.startswith("linux") or threading.active_count() > 1
                or signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN):  # children reaped unseen
            return None
        try:
            return cls(fixed, moving, **settings)
        except OSError:  # no process or pipe to spare (a container's limits, memory)
            return None

    def result(self, cancel: Callable[[], bool] | None = None) -> sitk.AffineTransform:
        """Wait for the child's transform, polling ``cancel()`` (then Cancelled; the child is killed).
        Only this method reads and closes the pipe; :meth:`stop` may interrupt it from any thread."""
        with self._lock:
            if self._pid is None or self._reading:
                raise MorphSeekError("affine pre-alignment: its process was already stopped or waited for")
            self._reading = True
        data, status = b"", None
        try:
            while True:
                _poll(cancel)
                if self._pid is None:
                    raise Cancelled("affine pre-alignment cancelled by the user")
                if select.select([self._read], [], [], 0.05)[0]:
                    chunk = os.read(self._read, 1 << 16)
                    if not chunk:
                        break
                    data += chunk
            with self._lock:
                if self._pid is None:  # stopped by another thread: the EOF was its kill
                    raise Cancelled("affine pre-alignment cancelled by the user")
                pid, self._pid = self._pid, None
                status = _reap(pid)
        finally:
            with self._lock:
                self._reading = False
                os.close(self._read)
                self._read = None
            self.stop()
        try:
            message = json.loads(data)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            how = (f"was killed by signal {-status}" + (" (out of memory?)" if -status == signal.SIGKILL else "")
                   if status is not None and status < 0 else f"ended with status {status}")
            raise MorphSeekError(f"affine pre-alignment failed: its process {how} before sending a result")
        if "error" in message:
            if message.get("type") == "MemoryError":
                raise MemoryError(message["error"])
            if message.get("morphseek"):
                raise MorphSeekError(message["error"])
            raise MorphSeekError(f"affine pre-alignment failed: {message['type']}: {message['error']}")
        found = sitk.AffineTransform(3)
        found.SetFixedParameters(message["fixed_parameters"])
        found.SetParameters(message["parameters"])
        return found

    def stop(self) -> None:
        """Kill the child if it still runs and reap it; close the pipe unless :meth:`result` is
        reading it (it closes it itself). Idempotent, from any thread."""
        with self._lock:
            pid, self._pid = self._pid, None
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _reap(pid)
            if not self._reading and self._read is not None:
                os.close(self._read)
                self._read = None


def _reap(pid: int) -> int | None:
    """Wait for child ``pid``: its exit status, minus the signal that killed it, or None when it
    was reaped elsewhere."""
    try:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    except ChildProcessError:
        return None
