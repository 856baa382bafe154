"""Brain training pairs synthesised on the fly from real subjects' label maps (SynthMorph style).

The label maps (FreeSurfer ids; extra-cerebral tissue >= 500) are affinely aligned to one common
grid beforehand (``scripts/prepare_brains.py``). Every training pair is two subjects (now and then
the same one), each with its own random affine and smooth deformation, and images synthesised from
the deformed labels with ONE random contrast for the pair (T1-like or arbitrary per structure) and
their own blur, bias field and noise, skull-stripped or whole-head. The network never sees the
same image twice and cannot rely on one MRI contrast; the warm-up stays unsupervised (the labels
only score held-back pairs and feed GRPO).

Images then go through ``io.image_to_model_grid``, the same preparation as in registration.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from . import geometry, io, synth
from .data import PairSample, shared_labels
from .errors import MorphSeekError

#: The 31 structures scored in brain benchmarks (FreeSurfer ids): left and right cerebral white
#: matter, cortex, lateral and inferior lateral ventricle, cerebellum white matter and cortex,
#: thalamus, caudate, putamen, pallidum, hippocampus, amygdala, accumbens, ventral DC; the 3rd and
#: 4th ventricle and the brain stem. CSF (24), vessels and choroid plexus are left out.
EVAL_LABELS = (2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 26, 28,
               41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60)



def evaluation_labels(labels: np.ndarray) -> np.ndarray:
    """``labels`` with every id outside :data:`EVAL_LABELS` set to 0 (same dtype)."""
    return np.where(np.isin(labels, EVAL_LABELS), labels, 0).astype(labels.dtype, copy=False)


_WHITE = (2, 41, 7, 46, 16, 28, 60, 85)
_CSF = (4, 5, 43, 44, 14, 15, 24, 31, 63, 72)
_DEEP_GREY = (10, 49, 11, 50, 12, 51, 13, 52, 26, 58)


def t1_means(max_label: int) -> np.ndarray:
    """A T1-like mean intensity per label id 0..max_label: white matter bright, grey matter mid,
    CSF dark, deep grey between, extra-cerebral tissue (>= 500) mid-dark, background 0."""
    means = np.full(max_label + 1, 0.55, dtype=np.float32)  # cortex, cerebellar cortex, others
    means[0] = 0.0
    means[[v for v in _WHITE if v <= max_label]] = 0.9
    means[[v for v in _CSF if v <= max_label]] = 0.15
    means[[v for v in _DEEP_GREY if v <= max_label]] = 0.68
    if max_label >= 500:
        means[500:] = 0.35
    return means


def t2_means(max_label: int) -> np.ndarray:
    """A T2-like mean intensity per label id: CSF bright, grey matter mid, white matter dark."""
    t1 = t1_means(max_label)
    means = np.full_like(t1, 0.5)  # cortex and the rest
    means[t1 == 0.9] = 0.25  # white matter
    means[t1 == 0.15] = 0.95  # CSF
    means[t1 == 0.68] = 0.4  # deep grey
    means[0] = 0.0
    return means


#: the scans' contrasts by name (``scan_image``'s ``means``)
SCAN_CONTRASTS = {"t1": t1_means, "t2": t2_means}


def scan_image(labels: np.ndarray, rng: np.random.Generator, means: Callable[[int], np.ndarray] = t1_means,
               skull_strip: bool = True, clean: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """An image (float32 [0, 1]) of a label map in the contrast ``means(max_label)`` (one mean per
    label id, T1-like by default), with the held-back scans' own noise, blur and bias. ``clean``:
    (image, the same without noise), as ``synth.synthesise_image``; the image is the same either way."""
    labels = np.where(labels >= 500, 0, labels) if skull_strip else labels
    return synth.synthesise_image(labels, seed=rng, label_means=means(int(labels.max())),
                                  blur_sigma=(0.3, 0.8), bias_strength=0.2, noise_std=0.02, clean=clean)


def t1_image(labels: np.ndarray, rng: np.random.Generator, skull_strip: bool = True,
             clean: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """A T1-like image (float32 [0, 1]) from a label map, with its own noise, blur and bias
    (``clean``: and the same without noise, as :func:`scan_image`)."""
    return scan_image(labels, rng, t1_means, skull_strip, clean)


def random_contrast(max_label: int, rng: np.random.Generator) -> np.ndarray:
    """One contrast for both images of a pair: half the time T1-like with jitter, else arbitrary
    (each label id its own mean in [0.05, 1]; background dark)."""
    if rng.random() < 0.5:
        means = t1_means(max_label) + rng.normal(0.0, 0.06, max_label + 1).astype(np.float32)
    else:
        means = rng.uniform(0.05, 1.0, max_label + 1).astype(np.float32)
    means[0] = rng.uniform(0.0, 0.05)
    return np.clip(means, 0.0, 1.0)


def random_deformation(shape: Sequence[int], rng: np.random.Generator, rotate_deg: float = 2.0,
                       scale: float = 0.02, shift_vox: float = 1.0, elastic_vox: float = 1.5) -> torch.Tensor:
    """A random affine (about the centre) plus a smooth elastic field, (1, 3, D, H, W) voxels, pull-back."""
    shape = tuple(int(n) for n in shape)
    angles = np.deg2rad(rng.uniform(-rotate_deg, rotate_deg, 3))
    rot = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        r = np.eye(3)
        i, j = [a for a in range(3) if a != axis]
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    matrix = rot @ np.diag(1.0 + rng.uniform(-scale, scale, 3))
    axes = [torch.arange(n, dtype=torch.float32) - (n - 1) / 2.0 for n in shape]
    x = torch.stack(torch.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    affine = (torch.from_numpy((matrix - np.eye(3)).astype(np.float32)) @ x).reshape(3, *shape)
    affine += torch.from_numpy(rng.uniform(-shift_vox, shift_vox, 3).astype(np.float32)).view(3, 1, 1, 1)
    elastic = synth.smooth_noise(shape, 3, max(4.0, min(shape) / 10.0), rng)
    elastic = elastic * float(rng.uniform(0.0, elastic_vox)) / max(float(elastic.abs().max()), 1e-6)
    return affine[None] + elastic


def _pair_sample(images: list, pair: tuple[str, str], model_ref: sitk.Image, percentiles: Sequence[float],
                 fine_ref: sitk.Image | None) -> PairSample:
    """A pair's ``PairSample`` on ``model_ref`` (and on ``fine_ref`` as ``.fine`` when given) from
    (image, its noise-free version or None, evaluation labels) for the moving and the fixed subject."""

    def on(ref: sitk.Image) -> PairSample:
        tensors, clean_tensors, label_tensors = [], [], []
        for image, noise_free, brain in images:
            tensors.append(io.image_to_model_grid(image, ref, percentiles=percentiles))
            clean_tensors.append(None if noise_free is None else
                                 io.image_to_model_grid(noise_free, ref, percentiles=percentiles))
            label_tensors.append(io.labels_to_model_grid(brain, ref))
        values = shared_labels(label_tensors[0], label_tensors[1])
        return PairSample(tensors[0], tensors[1], label_tensors[0], label_tensors[1], values, pair,
                          moving_clean=clean_tensors[0], fixed_clean=clean_tensors[1])

    sample = on(model_ref)
    if fine_ref is not None:
        sample.fine, sample.to_fine = on(fine_ref), io.grid_relation(model_ref, fine_ref)
    return sample


@dataclass
class BrainSet:
    """Aligned label maps of a prepared brain folder (``scripts/prepare_brains.py``): on-the-fly
    training pairs (``sample_pair``) and fixed held-back pairs (``val_samples``).

    ``model_ref``: the model grid every sample is prepared on (``io.model_grid_at``)."""

    folder: Path
    train_ids: list[str]
    heldback_ids: list[str]
    reference: sitk.Image  # the common 2 mm grid of the label maps
    labels: dict[str, torch.Tensor]  # id -> (1, 1, D, H, W) int64 on ``reference``
    pairs: list[list[str]] | None = None  # held-back (moving, fixed) pairs, when split.json lists them

    @classmethod
    def open(cls, folder: str | Path) -> "BrainSet":
        folder = Path(folder)
        split_path = folder / "split.json"
        if not split_path.is_file():
            raise MorphSeekError(f"'{folder}' is not a prepared brain folder (no split.json): "
                                 "run scripts/prepare_brains.py first")
        split = json.loads(split_path.read_text())
        reference, labels = None, {}
        for i in split["train"] + split["heldback"]:
            image = io.read_labels(folder / "labels" / f"{i}.nii.gz")
            reference = reference or image
            labels[i] = io.labels_to_tensor(image)
        return cls(folder, list(split["train"]), list(split["heldback"]), reference, labels, split.get("pairs"))

    # the Dataset surface the trainers use
    @property
    def source(self) -> Path:
        return self.folder

    @property
    def train_pairs(self) -> list[tuple[str, str]]:
        return [(m, f) for m in self.train_ids for f in self.train_ids if m != f]

    @property
    def val_pairs(self) -> list[tuple[str, str]]:
        """(moving, fixed) held-back pairs: those ``split.json`` lists, else every ordered pair."""
        if self.pairs:
            return [tuple(p) for p in self.pairs]
        return [(m, f) for m in self.heldback_ids for f in self.heldback_ids if m != f]

    def _on_reference(self, arrays: np.ndarray | tuple[np.ndarray, np.ndarray],
                      clean: bool) -> tuple[sitk.Image, sitk.Image | None]:
        """A synthesis's result (the image, or with ``clean`` the image and its noise-free version)
        as (noisy image, noise-free image or None) on the subjects' grid."""
        noisy, noise_free = arrays if clean else (arrays, None)
        return (io.from_array(noisy, self.reference),
                None if noise_free is None else io.from_array(noise_free, self.reference))

    def synthesised_images(self, labels: np.ndarray, contrast: np.ndarray, rng: np.random.Generator,
                           clean: bool) -> tuple[sitk.Image, sitk.Image | None]:
        """A label map in ``contrast`` with the warm-up's blur, bias and noise, on the subjects' grid:
        (noisy image, the same without noise or None); the same random draws either way."""
        return self._on_reference(synth.synthesise_image(labels, seed=rng, label_means=contrast, blur_sigma=(0.3, 1.0),
                                                         bias_strength=0.3, noise_std=0.03, clean=clean), clean)

    def sample_pair(self, rng: np.random.Generator, model_ref: sitk.Image,
                    percentiles: Sequence[float] = (1.0, 99.0), same_subject: float = 0.1,
                    identical: float = 0.1, clean: bool = False,
                    fine_ref: sitk.Image | None = None, elastic_vox: float = 1.5) -> PairSample:
        """A random training pair on ``model_ref`` (images and labels). With probability
        ``identical`` the fixed image IS the moving one: the loss is then lowest for u = 0, which
        teaches the network to stop moving once a pair is aligned (without such pairs it learns a
        small bias that every refinement step adds again: a self-registration drift).
        ``clean``: also the two images without noise (``moving_clean``, ``fixed_clean``; the noisy
        ones are the same either way). ``fine_ref``: also the same pair on that grid (``io.fine_grid``
        of the subjects' grid and ``model_ref``; ``PairSample.fine``), where fine steps run.
        ``elastic_vox``: the largest elastic displacement of each subject's random deformation
        (voxels of the subjects' grid; :func:`random_deformation`)."""
        moving_id = self.train_ids[rng.integers(len(self.train_ids))]
        others = [i for i in self.train_ids if i != moving_id]
        fixed_id = moving_id if rng.random() < same_subject or not others else others[rng.integers(len(others))]
        strip = rng.random() < 0.8
        shape = self.labels[moving_id].shape[2:]
        warped = []
        for subject in (moving_id, fixed_id):
            disp = random_deformation(shape, rng, elastic_vox=elastic_vox)
            lab = geometry.warp_labels(self.labels[subject], disp)[0, 0].numpy()
            warped.append(np.where(lab >= 500, 0, lab) if strip else lab)
        contrast = random_contrast(int(max(w.max() for w in warped)), rng)
        images = []  # per subject: the image, its noise-free version (or None), its evaluation labels
        for lab in warped:
            noisy, noise_free = self.synthesised_images(lab, contrast, rng, clean)
            brain = evaluation_labels(lab).astype(np.int16)
            images.append((noisy, noise_free, io.from_array(brain, self.reference)))
        if rng.random() < identical:
            images[1], fixed_id = images[0], moving_id
        return _pair_sample(images, (moving_id, fixed_id), model_ref, percentiles, fine_ref)

    def scan_pair(self, moving_id: str, fixed_id: str, rng: np.random.Generator, model_ref: sitk.Image,
                  percentiles: Sequence[float] = (1.0, 99.0), fine_ref: sitk.Image | None = None,
                  clean: bool = False, contrast: str = "t1") -> PairSample:
        """A labelled pair made as the held-back ones are (``scripts/prepare_brains.py``): the two
        subjects' own label maps, undeformed and skull-stripped, as scans (:func:`scan_image`, own
        noise, blur and bias; ``contrast`` one of ``SCAN_CONTRASTS``, T1-like by default) with the
        evaluation labels: what a user's few labelled cases look like, where ``sample_pair`` draws
        the warm-up's random contrasts and deformations. ``clean``: also the noise-free images
        (which a user's pairs do not have; the noisy ones are the same either way), as
        ``sample_pair``. On ``fine_ref`` too when given."""
        if contrast not in SCAN_CONTRASTS:
            raise MorphSeekError(f"unknown scan contrast {contrast!r}: one of {', '.join(SCAN_CONTRASTS)}")
        means = SCAN_CONTRASTS[contrast]
        images = []
        for subject in (moving_id, fixed_id):
            labels = self.labels[subject][0, 0].numpy()
            images.append((*self._on_reference(scan_image(labels, rng, means, clean=clean), clean),
                           io.from_array(evaluation_labels(labels).astype(np.int16), self.reference)))
        return _pair_sample(images, (moving_id, fixed_id), model_ref, percentiles, fine_ref)

    def scan_pairs(self, count: int, model_ref: sitk.Image, percentiles: Sequence[float] = (1.0, 99.0),
                   fine_ref: sitk.Image | None = None, clean: bool = False,
                   contrast: str = "t1") -> list[PairSample]:
        """``count`` distinct ordered pairs of training subjects as :meth:`scan_pair` makes them, in a
        fixed shuffled order with fixed draws (the same pairs on every run: "N labelled cases")."""
        if not 1 <= count <= len(self.train_pairs):
            raise MorphSeekError(f"scan pairs are distinct pairs of the {len(self.train_ids)} training subjects: "
                                 f"ask for 1 to {len(self.train_pairs)}, not {count}")
        order = np.random.default_rng(10_000).permutation(len(self.train_pairs))[:count]
        return [self.scan_pair(*self.train_pairs[k], np.random.default_rng(10_000 + i), model_ref, percentiles,
                               fine_ref, clean=clean, contrast=contrast) for i, k in enumerate(order)]

    def heldback_files(self, subject: str) -> tuple[Path, Path]:
        """(T1-like image, evaluation labels) written for a held-back subject."""
        return (self.folder / "heldback" / f"{subject}_t1.nii.gz", self.folder / "heldback" / f"{subject}_seg.nii.gz")

    def val_samples(self, model_ref: sitk.Image, percentiles: Sequence[float] = (1.0, 99.0),
                    fine_ref: sitk.Image | None = None) -> list[PairSample]:
        """The held-back pairs (fixed T1-like images from the prepared files) on ``model_ref``, and
        on ``fine_ref`` as well when given (``PairSample.fine``)."""
        key = (io.Grid.of(model_ref), tuple(percentiles), io.Grid.of(fine_ref) if fine_ref is not None else None)
        cache = self.__dict__.setdefault("_val_cache", {})
        if key in cache:
            return cache[key]
        if fine_ref is not None:
            samples = [replace(coarse, fine=fine, to_fine=io.grid_relation(model_ref, fine_ref))
                       for coarse, fine in zip(self.val_samples(model_ref, percentiles),
                                               self.val_samples(fine_ref, percentiles))]
            cache[key] = samples
            return samples
        volumes = {}
        for i in self.heldback_ids:
            image_path, seg_path = self.heldback_files(i)
            volumes[i] = (io.image_to_model_grid(io.read_image(image_path), model_ref, percentiles=percentiles, name=str(image_path)),
                          io.labels_to_model_grid(io.read_labels(seg_path), model_ref))
        samples = []
        for m, f in self.val_pairs:
            values = shared_labels(volumes[m][1], volumes[f][1])
            samples.append(PairSample(volumes[m][0], volumes[f][0], volumes[m][1], volumes[f][1], values, (m, f)))
        cache[key] = samples
        return samples
