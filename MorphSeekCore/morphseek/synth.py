"""SynthMorph-style labelled data made from nothing: label maps, images and smooth deformations.

Everything here is deterministic for a seed (NumPy ``Generator`` for every random draw) and
vectorised (separable Gaussian smoothing with ``torch`` convolutions, warping with
``morphseek.geometry``).

How a dataset is built (``make_dataset``): ONE template label map per dataset seed (argmax of
smoothed Gaussian noise fields inside an ellipsoid-like "head", as SynthMorph draws its shapes);
each subject is that template warped by its own random diffeomorphic deformation (nearest
neighbour), so different subjects have corresponding anatomy and any pair of them is registrable.
Each subject then gets its own image synthesised from its labels: with one shared intensity model
per dataset (``modality="mono"``) or a new random contrast per subject (``modality="multi"``, so
every pair is cross-modal, as SynthMorph trains contrast-agnostic registration).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .data import default_split, ordered_pairs, write_manifest
from .errors import MorphSeekError
from .geometry import blur_axes, compose, gaussian_blur, resize_displacement, warp_labels
from .io import write_image

Shape = tuple[int, int, int]

#: Physical geometry written by ``write_dataset``: deliberately not the identity, so that code
#: reading the dataset must honour spacing and origin (the direction stays the identity).
DEFAULT_SPACING = (1.5, 1.5, 1.5)
DEFAULT_ORIGIN = (-35.25, 20.0, -12.75)


@dataclass
class Subject:
    """One synthetic subject: arrays in (D, H, W) order."""

    id: str
    image: np.ndarray  # float32 in [0, 1]
    labels: np.ndarray  # int16, 0 = background, 1..K structures
    #: displacement (3, D, H, W) in voxels that maps the template onto this subject
    #: (``labels = template o (x + u)``); None for the template itself.
    displacement: np.ndarray | None = None


# ----------------------------------------------------------------------------- smoothing helpers


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _check_shape(shape: Sequence[int]) -> Shape:
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 4:
        raise MorphSeekError(f"synthetic shape must be three sizes of at least 4 voxels, got {shape}")
    return shape  # type: ignore[return-value]


def smooth_noise(
    shape: Sequence[int], channels: int, sigma: float, seed: int | np.random.Generator
) -> torch.Tensor:
    """Gaussian noise smoothed with a Gaussian of ``sigma`` voxels, (1, channels, D, H, W) float32,
    each channel rescaled to zero mean and unit standard deviation.

    The noise is drawn with a margin of 3 sigma and blurred without padding, so its statistics are
    the same everywhere (padding would give the borders a larger variance). Large ``sigma`` is done
    on a coarser grid (blurred with sigma / factor, upsampled trilinearly): the same statistics at a
    fraction of the cost."""
    rng = _rng(seed)
    shape = _check_shape(shape)
    factor = max(1, int(sigma // 2))
    coarse = tuple(max(2, -(-n // factor)) for n in shape)
    fine_sigma = sigma / factor
    radius = max(1, math.ceil(3.0 * fine_sigma))
    noise = rng.standard_normal((1, channels, *(n + 2 * radius for n in coarse)), dtype=np.float32)
    field = blur_axes(torch.from_numpy(noise), [fine_sigma] * 3, [radius] * 3, pad=False)
    if coarse != shape:
        field = F.interpolate(field, size=shape, mode="trilinear", align_corners=True)
    field = field - field.mean(dim=(2, 3, 4), keepdim=True)
    return field / field.flatten(2).std(dim=2).clamp_min(1e-12).view(1, channels, 1, 1, 1)


def _default_smoothness(shape: Shape) -> float:
    return max(2.0, min(shape) / 10.0)


# ----------------------------------------------------------------------------- label maps


def _head_mask(shape: Shape, rng: np.random.Generator, smoothness: float) -> torch.Tensor:
    """Ellipsoid-like body: a random ellipsoid whose surface is perturbed by smooth noise."""
    axes = [torch.linspace(-1.0, 1.0, n) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (3, D, H, W) in [-1, 1]
    radii = torch.from_numpy(rng.uniform(0.76, 0.88, size=3).astype(np.float32)).view(3, 1, 1, 1)
    centre = torch.from_numpy(rng.uniform(-0.04, 0.04, size=3).astype(np.float32)).view(3, 1, 1, 1)
    radius2 = (((grid - centre) / radii) ** 2).sum(dim=0)
    wobble = smooth_noise(shape, 1, 2.0 * smoothness, rng)[0, 0]
    return (radius2 + 0.08 * wobble) < 1.0


def random_label_map(
    shape: Sequence[int],
    n_labels: int = 8,
    seed: int | np.random.Generator = 0,
    smoothness: float | None = None,
    min_fraction: float = 0.02,
) -> np.ndarray:
    """Smooth random label map (D, H, W) int16: 0 outside an ellipsoid-like head, 1..n_labels inside.

    Inside the head each voxel takes the argmax of ``n_labels`` Gaussian noise fields smoothed with
    ``smoothness`` voxels (default: a tenth of the smallest size), as SynthMorph draws its shapes.
    Every label 1..n_labels covers at least ``min_fraction`` of the head: a label that is too small
    has its field raised by just enough (a constant offset, so its shape stays smooth)."""
    shape = _check_shape(shape)
    if n_labels < 1:
        raise MorphSeekError(f"random_label_map needs at least one label, got n_labels={n_labels}")
    if n_labels * min_fraction > 0.9:
        raise MorphSeekError(f"{n_labels} labels cannot each cover {min_fraction:.0%} of the head")
    rng = _rng(seed)
    sigma = _default_smoothness(shape) if smoothness is None else float(smoothness)
    head = _head_mask(shape, rng, sigma)
    fields = smooth_noise(shape, n_labels, sigma, rng)[0][:, head]  # (K, voxels in head)
    n_head = fields.shape[1]
    wanted = int(math.ceil(min_fraction * n_head))
    for _ in range(4 * n_labels):
        winner = fields.argmax(dim=0)
        counts = torch.bincount(winner, minlength=n_labels)
        small = int(counts.argmin())
        if counts[small] >= wanted:
            break
        # Margin by which each voxel's best other field beats this one; raising the field by the
        # wanted-th smallest margin hands exactly those voxels (the closest ones) to this label.
        others = fields.clone()
        others[small] = -torch.inf
        margin = others.max(dim=0).values - fields[small]
        fields[small] += torch.kthvalue(margin, wanted).values + 1e-4
    else:
        raise MorphSeekError(f"could not give all {n_labels} labels a region in a {shape} label map")
    labels = torch.zeros(shape, dtype=torch.int16)
    labels[head] = fields.argmax(dim=0).to(torch.int16) + 1
    return labels.numpy()


# ----------------------------------------------------------------------------- images


def random_label_means(n_labels: int, seed: int | np.random.Generator) -> np.ndarray:
    """One contrast: mean intensity per label value 0..n_labels (background dark, structures in
    [0.1, 1])."""
    rng = _rng(seed)
    return np.concatenate([rng.uniform(0.0, 0.08, 1), rng.uniform(0.1, 1.0, n_labels)]).astype(np.float32)


def synthesise_image(
    labels: np.ndarray,
    seed: int | np.random.Generator = 0,
    label_means: np.ndarray | None = None,
    label_noise: float = 0.05,
    blur_sigma: tuple[float, float] = (0.5, 1.2),
    bias_strength: float = 0.3,
    noise_std: float = 0.02,
    clean: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Image (D, H, W) float32 in [0, 1] from a label map, SynthSeg/SynthMorph style.

    Mean intensity per label (``label_means[label]``; random when None), Gaussian within-label noise
    (std up to ``label_noise``), Gaussian blur (sigma drawn in ``blur_sigma`` voxels), a smooth
    multiplicative bias field exp(b * smooth noise) with |b| up to ``bias_strength``, additive noise
    (std up to ``noise_std``), then min-max normalisation to [0, 1].

    ``clean``: also return the same image without either noise (same means, blur, bias and
    normalisation; the same random draws, so the noisy image is unchanged), as (noisy, clean)."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise MorphSeekError(f"synthesise_image needs a 3D label map, got shape {labels.shape}")
    if labels.size == 0 or labels.min() < 0:
        raise MorphSeekError("synthesise_image needs a non-empty label map of non-negative integers")
    rng = _rng(seed)
    top = int(labels.max())
    if label_means is None:
        means = random_label_means(top, rng)
    else:
        means = np.asarray(label_means, dtype=np.float32)
        if means.shape[0] <= top:
            raise MorphSeekError(f"label_means has {means.shape[0]} values but the map holds label {top}")
    stds = rng.uniform(0.0, label_noise, means.shape[0]).astype(np.float32)
    index = torch.from_numpy(labels.astype(np.int64))
    noise = torch.from_numpy(rng.standard_normal(labels.shape, dtype=np.float32))
    mean_image = torch.from_numpy(means)[index]
    image = mean_image + torch.from_numpy(stds)[index] * noise
    sigma = float(rng.uniform(*blur_sigma))
    image = gaussian_blur(image[None, None], sigma)
    bias = smooth_noise(labels.shape, 1, max(4.0, min(labels.shape) / 4.0), rng)
    bias = torch.exp(float(rng.uniform(0.0, bias_strength)) * bias)
    image = image * bias
    image = image + float(rng.uniform(0.0, noise_std)) * torch.from_numpy(
        rng.standard_normal(labels.shape, dtype=np.float32)
    )
    image = image[0, 0]
    low, high = image.min(), image.max()

    def normalised(volume: torch.Tensor) -> np.ndarray:
        return ((volume - low) / (high - low).clamp_min(1e-12)).clamp(0.0, 1.0).numpy().astype(np.float32)

    if not clean:
        return normalised(image)
    return normalised(image), normalised((gaussian_blur(mean_image[None, None], sigma) * bias)[0, 0])


# ----------------------------------------------------------------------------- deformations


def integrate_velocity(velocity: torch.Tensor, n_squarings: int = 7) -> torch.Tensor:
    """Displacement exp(v) of a stationary velocity field (B, 3, D, H, W) by scaling and squaring:
    u = v / 2^N, then N times u <- u o (x + u) + u (``geometry.compose``)."""
    disp = velocity / (2.0**n_squarings)
    for _ in range(n_squarings):
        disp = compose(disp, disp)
    return disp


def _max_norm(disp: torch.Tensor) -> float:
    return float((disp * disp).sum(dim=1).max().sqrt())


def random_smooth_displacement(
    shape: Sequence[int],
    max_displacement: float = 3.0,
    seed: int | np.random.Generator = 0,
    smoothness: float | None = None,
    diffeomorphic: bool = True,
    n_squarings: int = 7,
) -> torch.Tensor:
    """Random smooth displacement (1, 3, D, H, W) float32 in voxels (pull-back, METHOD.md).

    The largest displacement length over the grid is ``max_displacement`` (exactly, or within 2 %
    below it in the diffeomorphic case; never more). ``smoothness``: Gaussian sigma in voxels
    (default a sixth of the smallest size). With ``diffeomorphic`` the field is the exponential of a
    smooth stationary velocity (scaling and squaring with ``geometry.compose``), so it does not fold
    for moderate amplitudes; otherwise it is the smoothed noise itself, which may fold."""
    shape = _check_shape(shape)
    if max_displacement < 0:
        raise MorphSeekError(f"max_displacement must be >= 0 voxels, got {max_displacement}")
    sigma = max(2.0, min(shape) / 6.0) if smoothness is None else float(smoothness)
    field = smooth_noise(shape, 3, sigma, _rng(seed))
    field = field / max(_max_norm(field), 1e-12)  # unit largest length
    if max_displacement == 0:
        return torch.zeros_like(field)
    if not diffeomorphic:
        return field * max_displacement
    # A velocity this smooth is integrated on a half-resolution grid (8x fewer voxels), as
    # VoxelMorph does; trilinear upsampling keeps both the bound and the smoothness.
    coarse = tuple(max(4, -(-n // 2)) for n in shape) if sigma >= 4 else shape
    unit_velocity = resize_displacement(field, coarse)

    def integrate(scale: float) -> torch.Tensor:
        return resize_displacement(integrate_velocity(unit_velocity * scale, n_squarings), shape)

    # |exp(v)(x) - x| <= max |v|, with equality only for a uniform field: start at the target and
    # rescale the velocity (which keeps the map a diffeomorphism) until the result just fits.
    scale = float(max_displacement)
    disp = integrate(scale)
    for _ in range(6):
        reached = _max_norm(disp)
        if 0.98 * max_displacement <= reached <= max_displacement:
            return disp
        scale *= 0.99 * max_displacement / reached
        disp = integrate(scale)
    while _max_norm(disp) > max_displacement:  # never overshoot the requested bound
        scale *= 0.99 * max_displacement / _max_norm(disp)
        disp = integrate(scale)
    return disp


# ----------------------------------------------------------------------------- subjects, datasets


def _default_max_displacement(shape: Shape) -> float:
    return 0.1 * min(shape)


def make_subject(
    shape: Sequence[int] = (48, 48, 48),
    seed: int = 0,
    n_labels: int = 8,
    *,
    template: np.ndarray | None = None,
    template_seed: int = 0,
    subject_id: str | None = None,
    label_means: np.ndarray | None = None,
    max_displacement: float | None = None,
) -> Subject:
    """One subject: the dataset template (``template``, or ``random_label_map(shape, n_labels,
    template_seed)``) warped by a random diffeomorphic deformation (nearest neighbour) plus an
    image synthesised from the warped labels. ``label_means`` fixes the contrast (mono-modal
    datasets share one); None draws a new one from ``seed``."""
    shape = _check_shape(shape)
    if template is None:
        template = random_label_map(shape, n_labels, template_seed)
    elif tuple(template.shape) != shape:
        raise MorphSeekError(f"template shape {template.shape} differs from the subject shape {shape}")
    rng = np.random.default_rng([int(seed), 0x5EED])
    amplitude = _default_max_displacement(shape) if max_displacement is None else max_displacement
    disp = random_smooth_displacement(shape, amplitude, rng)
    labels = warp_labels(torch.from_numpy(template.astype(np.int64))[None, None], disp)[0, 0]
    labels_np = labels.numpy().astype(np.int16)
    image = synthesise_image(labels_np, rng, label_means=label_means)
    return Subject(subject_id or f"s{seed:02d}", image, labels_np, disp[0].numpy())


def make_dataset(
    n_subjects: int = 12,
    shape: Sequence[int] = (48, 48, 48),
    seed: int = 0,
    n_labels: int = 8,
    modality: str = "mono",
    max_displacement: float | None = None,
) -> list[Subject]:
    """``n_subjects`` subjects sharing one template (anatomy corresponds across subjects).

    ``modality="mono"``: one random contrast for the whole dataset (MSE-comparable pairs);
    ``"multi"``: a new random contrast per subject (every pair is cross-modal)."""
    if modality not in ("mono", "multi"):
        raise MorphSeekError(f"modality must be 'mono' or 'multi', got {modality!r}")
    if n_subjects < 1:
        raise MorphSeekError(f"make_dataset needs at least one subject, got {n_subjects}")
    shape = _check_shape(shape)
    root = np.random.SeedSequence([int(seed), 0xDA7A])
    template_seq, contrast_seq, *subject_seqs = root.spawn(2 + n_subjects)
    template = random_label_map(shape, n_labels, np.random.default_rng(template_seq))
    shared = random_label_means(n_labels, np.random.default_rng(contrast_seq)) if modality == "mono" else None
    return [
        make_subject(
            shape,
            int(subject_seqs[i].generate_state(1)[0]),
            n_labels,
            template=template,
            subject_id=f"s{i + 1:02d}",
            label_means=shared,
            max_displacement=max_displacement,
        )
        for i in range(n_subjects)
    ]


def make_pair(
    shape: Sequence[int] = (32, 32, 32), seed: int = 0, n_labels: int = 8, modality: str = "mono"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One registrable pair as tensors ``(moving, fixed, moving_labels, fixed_labels)``: images
    (1, 1, D, H, W) float32 in [0, 1], labels (1, 1, D, H, W) int64 with values 0..n_labels."""
    moving, fixed = make_dataset(2, shape, seed, n_labels, modality)

    def image(s: Subject) -> torch.Tensor:
        return torch.from_numpy(s.image)[None, None]

    def labels(s: Subject) -> torch.Tensor:
        return torch.from_numpy(s.labels.astype(np.int64))[None, None]

    return image(moving), image(fixed), labels(moving), labels(fixed)


def _with_geometry(array: np.ndarray, spacing: Sequence[float], origin: Sequence[float]) -> sitk.Image:
    image = sitk.GetImageFromArray(array)  # array (D, H, W) -> image size (W, H, D)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    return image


def write_dataset(
    folder: str | Path,
    n_subjects: int = 12,
    shape: Sequence[int] = (48, 48, 48),
    seed: int = 0,
    n_labels: int = 8,
    modality: str = "mono",
    val_subjects: int | None = None,
    spacing: Sequence[float] = DEFAULT_SPACING,
    origin: Sequence[float] = DEFAULT_ORIGIN,
) -> Path:
    """Write a synthetic dataset as ``imgs/sNN.nii.gz`` (float32), ``labels/sNN.nii.gz`` (int16) and a
    ``manifest.json`` (docs/DATA.md) in ``folder``; returns the manifest's path.

    Images carry a real geometry (``spacing`` and ``origin`` in mm, SimpleITK x, y, z order).
    The last ``val_subjects`` subjects are held out (default ``data.default_split``: a quarter, at
    least 2, when there are 6 or more): train pairs are all ordered pairs among the others, val
    pairs all ordered pairs among the held-out ones."""
    if val_subjects is None:
        val_subjects = len(default_split([str(i) for i in range(n_subjects)])[1])
    if val_subjects < 0 or n_subjects - val_subjects < 2:
        raise MorphSeekError(f"cannot hold out {val_subjects} of {n_subjects} subjects and keep two to train on")
    subjects = make_dataset(n_subjects, shape, seed, n_labels, modality)
    folder = Path(folder)
    entries = []
    for subject in subjects:
        image_path = f"imgs/{subject.id}.nii.gz"
        label_path = f"labels/{subject.id}.nii.gz"
        write_image(_with_geometry(subject.image, spacing, origin), folder / image_path)
        write_image(_with_geometry(subject.labels, spacing, origin), folder / label_path)
        entries.append({"id": subject.id, "image": image_path, "labels": label_path})
    ids = [s.id for s in subjects]
    train, val = ids[: len(ids) - val_subjects], ids[len(ids) - val_subjects :]

    return write_manifest(folder, entries, ordered_pairs(train), ordered_pairs(val),
                          f"synthetic SynthMorph-style dataset (seed {seed}, {n_labels} labels, {modality}-modal)",
                          modality=modality, grid=[int(n) for n in shape])
