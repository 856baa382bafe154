"""Datasets for training and evaluation: a manifest or a folder -> pairs of tensors on the model grid.

The DATA argument of ``morphseek warmup / finetune / evaluate`` (rules and examples: docs/DATA.md):

- a manifest JSON file (or a folder holding ``manifest.json``) listing subjects and, optionally,
  the train/val pairs;
- a folder of images (``*.nii.gz | *.nii | *.nrrd | *.mha``) with label maps found by name;
- a folder in DeepReg's paired layout: ``fixed_images/ moving_images/ [fixed_labels/ moving_labels/]``
  with identical file names (one pair per name).

A pair is ``(moving_id, fixed_id)``. ``Dataset.load_pair`` reads both images with ``morphseek.io``,
normalises intensities, resamples the moving image (and labels) onto the fixed image's physical
space and both onto the model grid that covers the fixed image, and caches the tensors in memory.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from . import geometry, io
from .io import PairImages  # noqa: F401 (read_pair returns it; its home is io)
from .atomic import write_text
from .errors import MorphSeekError
from .runconfig import RunConfig

FORMAT = "morphseek-dataset"
VERSION = 1
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
MANIFEST_NAME = "manifest.json"
DEEPREG_FOLDERS = ("fixed_images", "moving_images", "fixed_labels", "moving_labels")
#: How the moving image is placed relative to the fixed one before resampling.
#: "physical": by the two headers (the normal case). "stretch": the moving image's header is
#: replaced so that its extent is the fixed image's (DeepReg resizes moving images to the fixed
#: image's shape this way; for data whose header spacing cannot be trusted).
MOVING_TO_FIXED = ("physical", "stretch")

Pair = tuple[str, str]


@dataclass(frozen=True)
class SubjectEntry:
    """One image (and optionally its label map) of a dataset."""

    id: str
    image: Path
    labels: Path | None = None


@dataclass
class PairSample:
    """A pair on the model grid: images (1, 1, D, H, W) float32 in [0, 1], labels (1, 1, D, H, W)
    int64 or None. ``label_values``: the non-zero labels present in both label maps (empty when
    either is missing). ``grid``: the model grid's geometry (``io.Grid``, SimpleITK x, y, z order;
    it covers the fixed image)."""

    moving: torch.Tensor
    fixed: torch.Tensor
    moving_labels: torch.Tensor | None
    fixed_labels: torch.Tensor | None
    label_values: list[int]
    pair: Pair = ("", "")
    grid: io.Grid | None = None
    #: the same images without noise (synthesised pairs, ``BrainSet.sample_pair(clean=True)``): what
    #: the warm-up's similarity compares with ``WarmupConfig.clean_similarity``
    moving_clean: torch.Tensor | None = None
    fixed_clean: torch.Tensor | None = None
    #: the same pair on the fine grid (``io.fine_grid``) where a schedule's last steps run (GRPO and
    #: its validation with ``fine_steps``, as registration runs them), and ``to_fine``: how a map
    #: moves onto it (``io.grid_relation(model grid, fine grid)``: scale, offset per array axis)
    fine: "PairSample | None" = None
    to_fine: tuple[list[float], list[float]] | None = None

    @property
    def has_labels(self) -> bool:
        return self.moving_labels is not None and self.fixed_labels is not None

    def to(self, device: torch.device | str) -> "PairSample":
        """The same pair with its tensors on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PairSample(move(self.moving), move(self.fixed), move(self.moving_labels),
                          move(self.fixed_labels), list(self.label_values), self.pair, self.grid,
                          move(self.moving_clean), move(self.fixed_clean),
                          self.fine.to(device) if self.fine is not None else None, self.to_fine)

    def on_grid(self, fine: bool) -> "PairSample":
        """This pair on the fine grid (``fine``) or on the model grid; MorphSeekError when it was
        not prepared on the fine grid."""
        if not fine:
            return self
        if self.fine is None:
            raise MorphSeekError(f"pair {self.pair}: fine steps need the pair prepared on the fine grid as well")
        return self.fine

    def map_to_fine(self, total: torch.Tensor) -> torch.Tensor:
        """A total map on the model grid moved onto this pair's fine grid (``geometry.regrid``)."""
        fine = self.on_grid(True)
        return geometry.regrid(total, tuple(fine.moving.shape[2:]), *self.to_fine)


@dataclass
class _Volume:
    """One subject resampled onto one model grid (cached)."""

    image: torch.Tensor  # (1, 1, D, H, W) float32
    labels: torch.Tensor | None  # (1, 1, D, H, W) int32 (compact; int64 on the way out)
    label_values: frozenset[int]

    @property
    def nbytes(self) -> int:
        size = self.image.numel() * self.image.element_size()
        return size + (0 if self.labels is None else self.labels.numel() * self.labels.element_size())


@dataclass
class Dataset:
    """Subjects and pairs of a dataset; ``load_pair`` gives tensors on a model grid.

    ``source`` is the manifest or folder it came from (named in every error message)."""

    source: Path
    subjects: list[SubjectEntry]
    train_pairs: list[Pair]
    val_pairs: list[Pair]
    grid: tuple[int, int, int] | None = None
    modality: str | None = None
    moving_to_fixed: str = "physical"
    cache_bytes: int = 2 << 30
    _by_id: dict[str, SubjectEntry] = field(default_factory=dict, repr=False)
    _cache: "OrderedDict[tuple, _Volume]" = field(default_factory=OrderedDict, repr=False)
    _grids: dict[str, io.Grid] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_id = {s.id: s for s in self.subjects}

    def subject(self, subject_id: str) -> SubjectEntry:
        """The subject called ``subject_id``; MorphSeekError when there is none."""
        try:
            return self._by_id[subject_id]
        except KeyError:
            raise MorphSeekError(f"dataset '{self.source}' has no subject '{subject_id}'") from None

    def has_labels(self, pair: Sequence[str]) -> bool:
        moving, fixed = self._check_pair(pair)
        return self.subject(moving).labels is not None and self.subject(fixed).labels is not None

    def describe(self) -> str:
        labelled = sum(s.labels is not None for s in self.subjects)
        return (f"{self.source}: {len(self.subjects)} images ({labelled} with labels), "
                f"{len(self.train_pairs)} train pairs, {len(self.val_pairs)} val pairs")

    # ------------------------------------------------------------------------- loading pairs
    def load_pair(self, pair: Sequence[str], grid_shape: Sequence[int] | None = None, *,
                  spacing: float | None = None, direction: Sequence[float] | None = None,
                  divisor: int = 1) -> PairSample:
        """Tensors of ``pair = (moving_id, fixed_id)`` on the model grid of ``grid_shape`` (D, H, W)
        covering the fixed image (default: the manifest's ``grid``, else the fixed image's own size).

        Images are prepared by ``io.image_to_model_grid``, as in registration (normalised per image,
        1st-99th percentile to [0, 1], before resampling; outside is 0); the moving image goes straight from its own grid to the model grid through physical space (one
        interpolation, the same as onto the fixed grid and then onto the model grid, without the
        second blur); labels by nearest neighbour. Results are cached per subject and model grid.

        ``spacing`` (mm): the model grid by voxel size instead (``io.model_grid_at`` of the fixed
        image with ``direction`` and ``divisor``), as ``register_images`` builds it for such models."""
        moving_id, fixed_id = self._check_pair(pair)
        fixed_image = None
        if fixed_id not in self._grids:
            fixed_image = self._read_image(fixed_id)
        fixed_grid = self._grids[fixed_id]
        if spacing is not None:
            reference = io.model_grid_at(_blank(fixed_grid), spacing, divisor, direction)
        else:
            shape = tuple(int(n) for n in (grid_shape or self.grid or fixed_grid.size[::-1]))
            reference = io.model_grid(_blank(fixed_grid), shape)
        model_key = io.Grid.of(reference)
        fixed_volume = self._volume(fixed_id, reference, model_key, None, fixed_image)
        stretch = fixed_grid if self.moving_to_fixed == "stretch" else None
        moving_volume = self._volume(moving_id, reference, model_key, stretch, None)
        both = fixed_volume.labels is not None and moving_volume.labels is not None
        values = shared_labels(fixed_volume.label_values, moving_volume.label_values) if both else []
        as_long = lambda t: None if t is None else t.to(torch.int64)  # noqa: E731
        return PairSample(moving_volume.image, fixed_volume.image, as_long(moving_volume.labels),
                          as_long(fixed_volume.labels), values, (moving_id, fixed_id), model_key)

    def _check_pair(self, pair: Sequence[str]) -> Pair:
        if isinstance(pair, str) or len(pair) != 2:
            raise MorphSeekError(f"dataset '{self.source}': a pair is (moving_id, fixed_id), got {pair!r}")
        moving, fixed = (str(p) for p in pair)
        for subject_id in (moving, fixed):
            self.subject(subject_id)  # raises for an unknown id
        return moving, fixed

    def _read_image(self, subject_id: str) -> sitk.Image:
        entry = self.subject(subject_id)
        image = io.read_image(entry.image, what=f"image of subject '{subject_id}'")
        self._grids[subject_id] = io.Grid.of(image)
        return image

    def _volume(self, subject_id: str, reference: sitk.Image, model_key: io.Grid,
                stretch_to: io.Grid | None, image: sitk.Image | None) -> _Volume:
        key = (subject_id, model_key, stretch_to)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        entry = self.subject(subject_id)
        image = image if image is not None else self._read_image(subject_id)
        labels = None
        if entry.labels is not None:
            labels = io.read_labels(entry.labels, reference=image,
                                    what=f"label map of subject '{subject_id}'")
        if stretch_to is not None:
            image = with_extent_of(image, stretch_to)
            labels = None if labels is None else with_extent_of(labels, stretch_to)
        # the same preparation as registration's (normalise on the image's voxels, then resample)
        volume_image = io.image_to_model_grid(image, reference, name=str(entry.image))
        volume_labels, values = None, frozenset()
        if labels is not None:
            resampled = io.labels_to_model_grid(labels, reference).to(torch.int32)
            volume_labels = resampled
            values = frozenset(int(v) for v in torch.unique(resampled).tolist() if v != 0)
        volume = _Volume(volume_image, volume_labels, values)
        self._cache[key] = volume
        self._evict()
        return volume

    def _evict(self) -> None:
        total = sum(v.nbytes for v in self._cache.values())
        while total > self.cache_bytes and len(self._cache) > 2:  # keep at least the current pair
            _, dropped = self._cache.popitem(last=False)
            total -= dropped.nbytes


def _blank(grid: io.Grid) -> sitk.Image:
    """A small-typed empty image carrying ``grid``'s geometry (for ``io.model_grid``)."""
    image = sitk.Image([int(n) for n in grid.size], sitk.sitkUInt8)
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)
    return image


def with_extent_of(image: sitk.Image, target: io.Grid) -> sitk.Image:
    """``image`` with a new header so that its voxels exactly fill ``target``'s extent (outer voxel
    edges aligned, as a half-pixel-centred resize does), keeping its own size and voxel values."""
    size = np.asarray(image.GetSize(), dtype=np.float64)
    direction = np.asarray(target.direction, dtype=np.float64).reshape(3, 3)
    target_spacing = np.asarray(target.spacing, dtype=np.float64)
    spacing = target_spacing * np.asarray(target.size, dtype=np.float64) / size
    origin = np.asarray(target.origin) + direction @ ((spacing - target_spacing) / 2.0)
    out = sitk.Image(image)
    out.SetSpacing(spacing.tolist())
    out.SetOrigin(origin.tolist())
    out.SetDirection(target.direction)
    return out


def read_pair(dataset: Dataset, pair: Sequence[str]) -> PairImages:
    """Read ``pair = (moving_id, fixed_id)`` of ``dataset`` at full resolution (``io.read_pair``:
    segmentations checked against their images); a segmentation is None when the subject has none."""
    moving_id, fixed_id = dataset._check_pair(pair)
    f_entry, m_entry = dataset.subject(fixed_id), dataset.subject(moving_id)
    return io.read_pair(f_entry.image, m_entry.image, f_entry.labels, m_entry.labels)


def shared_labels(a, b) -> list[int]:
    """THE rule for the labels a Dice is taken over: the non-zero labels present in both label maps
    (tensors, arrays or sets of label values), sorted."""
    def present(labels) -> set[int]:
        if isinstance(labels, torch.Tensor):
            return set(torch.unique(labels).tolist())
        if isinstance(labels, np.ndarray):
            return set(np.unique(labels).tolist())
        return {int(v) for v in labels}
    return sorted((present(a) & present(b)) - {0})


def load_samples(dataset: Dataset, pairs: Sequence[Sequence[str]], run_config: RunConfig | None, device,
                 divisor: int = 1, grid: Sequence[int] | None = None) -> list[PairSample]:
    """Pairs loaded onto a model's grid as its run configuration says: by voxel size when it has
    ``spacing`` (as ``register_images`` builds it), else onto ``grid`` (default: the configuration's
    ``grid``, else the dataset's); tensors on ``device``."""
    run_config = run_config if run_config is not None else RunConfig()
    if run_config.spacing:
        return [dataset.load_pair(pair, spacing=run_config.spacing, direction=run_config.direction,
                                  divisor=divisor).to(device) for pair in pairs]
    grid = grid if grid is not None else run_config.grid
    return [dataset.load_pair(pair, grid).to(device) for pair in pairs]


# ----------------------------------------------------------------------------- splits


def held_out_count(n_subjects: int, from_subjects: int = 6, minimum: int = 2) -> int:
    """THE train/val split rule: how many of ``n_subjects`` (the last ones, in the given order) are
    held out for validation: none below ``from_subjects`` (every subject is needed to train), then a
    quarter, at least ``minimum``. Datasets use the defaults; the Slicer module's scene cases hold
    out from 4 cases on, at least one (``MorphSeekLib.training.held_back_count``)."""
    return max(minimum, round(n_subjects / 4)) if n_subjects >= from_subjects else 0


def default_split(ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """Held-out split used when a dataset names no pairs (:func:`held_out_count`): with 6 or more
    subjects the last quarter (at least 2, in the given order) are validation subjects, the rest
    train; below 6, all train."""
    ids = list(ids)
    n_val = held_out_count(len(ids))
    return ids[: len(ids) - n_val], ids[len(ids) - n_val :]


def ordered_pairs(ids: Iterable[str]) -> list[Pair]:
    """All ordered pairs (moving, fixed) of distinct subjects."""
    ids = list(ids)
    return [(m, f) for m in ids for f in ids if m != f]


def write_manifest(folder: str | Path, subjects: Sequence[dict], train_pairs: Sequence[Sequence[str]],
                   val_pairs: Sequence[Sequence[str]], description: str, **fields) -> Path:
    """THE manifest writer (docs/DATA.md): ``folder/manifest.json`` with ``subjects`` (dicts with
    ``id``, ``image`` and optionally ``labels``, paths relative to ``folder``), the pairs and any
    other top-level ``fields`` (``modality``, ``grid``, ``labels``...), written atomically and
    readably (one subject, one pair per line). Returns its path."""
    manifest = {"format": FORMAT, "version": VERSION, "description": description, **fields,
                "subjects": list(subjects),
                "pairs": {"train": [list(p) for p in train_pairs], "val": [list(p) for p in val_pairs]}}
    text = json.dumps(manifest, indent=1)
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
    text = re.sub(r"\{\s+(\"id\"[^{}]*?)\s+\}", lambda m: "{" + re.sub(r",\s+", ", ", m.group(1)) + "}", text)
    return write_text(text + "\n", Path(folder) / MANIFEST_NAME)


# ----------------------------------------------------------------------------- loading


def load_dataset(path: str | Path, require_labels: bool = False, cache_bytes: int = 2 << 30) -> Dataset:
    """Open the DATA argument: a manifest JSON, a folder holding ``manifest.json``, a folder of
    images with label maps matched by name, or a DeepReg paired folder (docs/DATA.md).

    Every file named must exist. ``require_labels``: every subject used by a pair must have a
    label map. Raises MorphSeekError naming the manifest or folder and the problem."""
    path = Path(path)
    if not path.exists():
        raise MorphSeekError(f"dataset not found: '{path}' (a manifest .json or a folder of images)")
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            dataset = _from_manifest(path / MANIFEST_NAME)
        elif all((path / name).is_dir() for name in DEEPREG_FOLDERS[:2]):
            dataset = _from_deepreg_folder(path)
        else:
            dataset = _from_image_folder(path)
    else:
        dataset = _from_manifest(path)
    dataset.cache_bytes = int(cache_bytes)
    _validate(dataset, require_labels)
    return dataset


def _validate(dataset: Dataset, require_labels: bool) -> None:
    if not dataset.subjects:
        raise MorphSeekError(f"dataset '{dataset.source}' is empty: it lists no images")
    if not dataset.train_pairs and not dataset.val_pairs:
        raise MorphSeekError(f"dataset '{dataset.source}' has no pairs (at least two images are needed)")
    for entry in dataset.subjects:
        for what, file in (("image", entry.image), ("label map", entry.labels)):
            if file is not None and not file.is_file():
                raise MorphSeekError(f"dataset '{dataset.source}': {what} of subject '{entry.id}' not found: '{file}'")
    for split, pairs in (("train", dataset.train_pairs), ("val", dataset.val_pairs)):
        for moving, fixed in pairs:
            for subject_id in (moving, fixed):
                if subject_id not in dataset._by_id:
                    raise MorphSeekError(f"dataset '{dataset.source}': {split} pair ({moving!r}, {fixed!r}) "
                                         f"names unknown subject {subject_id!r}")
            if moving == fixed:
                raise MorphSeekError(f"dataset '{dataset.source}': {split} pair pairs subject {moving!r} with itself")
    if require_labels:
        used = {s for pairs in (dataset.train_pairs, dataset.val_pairs) for pair in pairs for s in pair}
        missing = sorted(s.id for s in dataset.subjects if s.id in used and s.labels is None)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise MorphSeekError(f"dataset '{dataset.source}': label maps are required but subjects "
                                 f"{shown} have none")


def _from_manifest(path: Path) -> Dataset:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise MorphSeekError(f"cannot read dataset manifest '{path}': {err}") from None
    except json.JSONDecodeError as err:
        raise MorphSeekError(f"dataset manifest '{path}' is not valid JSON: {err}") from None

    def fail(problem: str) -> MorphSeekError:
        return MorphSeekError(f"dataset manifest '{path}': {problem}")

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise fail(f'not a MorphSeek dataset (it needs "format": "{FORMAT}")')
    if manifest.get("version", VERSION) != VERSION:
        raise fail(f"version {manifest.get('version')!r} is not supported (this MorphSeek reads version {VERSION})")
    raw_subjects = manifest.get("subjects")
    if not isinstance(raw_subjects, list):
        raise fail('"subjects" must be a list of {"id", "image", "labels"} objects')
    root = path.parent
    subjects, splits = [], {}
    for i, raw in enumerate(raw_subjects):
        if not isinstance(raw, dict) or not isinstance(raw.get("image"), str):
            raise fail(f'subject #{i + 1} needs at least an "image" path')
        subject_id = str(raw.get("id") or _stem(Path(raw["image"])))
        labels = raw.get("labels")
        if labels is not None and not isinstance(labels, str):
            raise fail(f'"labels" of subject {subject_id!r} must be a path')
        subjects.append(SubjectEntry(subject_id, root / raw["image"], None if labels is None else root / labels))
        if "split" in raw:
            if raw["split"] not in ("train", "val"):
                raise fail(f'"split" of subject {subject_id!r} must be "train" or "val", got {raw["split"]!r}')
            splits[subject_id] = raw["split"]
    ids = [s.id for s in subjects]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise fail(f"subject ids must be unique; repeated: {', '.join(duplicates)}")

    pairs = manifest.get("pairs", {})
    if not isinstance(pairs, dict):
        raise fail('"pairs" must be an object {"train": [[moving, fixed], ...], "val": [...]}')
    train = _parse_pairs(pairs.get("train"), "train", fail)
    val = _parse_pairs(pairs.get("val"), "val", fail)
    if train is None:
        if splits:
            train_ids = [i for i in ids if splits.get(i, "train") == "train"]
            val_ids = [i for i in ids if splits.get(i) == "val"]
        elif val is not None:
            held_out = {s for pair in val for s in pair}
            train_ids, val_ids = [i for i in ids if i not in held_out], []
        else:
            train_ids, val_ids = default_split(ids)
        train = ordered_pairs(train_ids)
        val = val if val is not None else ordered_pairs(val_ids)
    val = val or []

    grid = manifest.get("grid")
    if grid is not None:
        if not (isinstance(grid, list) and len(grid) == 3 and all(isinstance(n, int) and n >= 2 for n in grid)):
            raise fail(f'"grid" must be three integers >= 2 (D, H, W), got {grid!r}')
        grid = tuple(grid)
    moving_to_fixed = manifest.get("moving_to_fixed", "physical")
    if moving_to_fixed not in MOVING_TO_FIXED:
        raise fail(f'"moving_to_fixed" must be one of {MOVING_TO_FIXED}, got {moving_to_fixed!r}')
    modality = manifest.get("modality")
    if modality not in (None, "mono", "multi"):
        raise fail(f'"modality" must be "mono" or "multi", got {modality!r}')
    return Dataset(path, subjects, train, val, grid, modality, moving_to_fixed)


def _parse_pairs(raw, split: str, fail) -> list[Pair] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise fail(f'"pairs.{split}" must be a list of [moving_id, fixed_id]')
    pairs = []
    for item in raw:
        if not (isinstance(item, (list, tuple)) and len(item) == 2):
            raise fail(f'"pairs.{split}" holds {item!r}; each pair is [moving_id, fixed_id]')
        pairs.append((str(item[0]), str(item[1])))
    return pairs


def _stem(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES) and not p.name.startswith("."))


_LABEL_NAME = re.compile(r"(_seg|_label[^/]*)$", re.IGNORECASE)


def _from_image_folder(folder: Path) -> Dataset:
    """Images at the top of ``folder`` (or in ``images/`` / ``imgs/`` when the top holds none); the
    label map of image ``X`` is ``X_seg.*``, ``X_label*.*`` next to it, or ``labels/X.*``."""
    image_dir = folder
    files = [p for p in _image_files(folder) if not _LABEL_NAME.search(_stem(p))]
    if not files:
        for name in ("images", "imgs"):
            candidates = [p for p in _image_files(folder / name) if not _LABEL_NAME.search(_stem(p))]
            if candidates:
                image_dir, files = folder / name, candidates
                break
    if not files:
        raise MorphSeekError(f"dataset folder '{folder}' is empty: no images ({', '.join(IMAGE_SUFFIXES)}), "
                             f"no {MANIFEST_NAME} and no DeepReg fixed_images/ moving_images/ folders")
    siblings = _image_files(image_dir)
    in_labels_dir = _image_files(folder / "labels")
    subjects = []
    for file in files:
        stem = _stem(file)
        matches = [p for p in siblings if p != file and re.fullmatch(
            re.escape(stem) + r"(_seg|_label[^/]*)", _stem(p), re.IGNORECASE)]
        matches += [p for p in in_labels_dir if _stem(p) == stem]
        if len(matches) > 1:
            raise MorphSeekError(f"dataset folder '{folder}': image '{file.name}' has several label maps: "
                                 + ", ".join(str(p.relative_to(folder)) for p in matches))
        subjects.append(SubjectEntry(stem, file, matches[0] if matches else None))
    train_ids, val_ids = default_split([s.id for s in subjects])
    return Dataset(folder, subjects, ordered_pairs(train_ids), ordered_pairs(val_ids))


def _from_deepreg_folder(folder: Path) -> Dataset:
    """DeepReg's paired layout: ``moving_images/X`` is registered to ``fixed_images/X``; labels in
    ``moving_labels/X`` and ``fixed_labels/X`` when those folders exist. The moving image is
    stretched onto the fixed image's extent (``moving_to_fixed="stretch"``), as DeepReg does."""
    names = {role: {p.name: p for p in _image_files(folder / f"{role}_images")} for role in ("moving", "fixed")}
    if names["moving"].keys() != names["fixed"].keys():
        unmatched = sorted(names["moving"].keys() ^ names["fixed"].keys())
        raise MorphSeekError(f"dataset folder '{folder}': fixed_images/ and moving_images/ must hold the same "
                             f"file names; unmatched: {', '.join(unmatched[:5])}")
    cases = sorted(names["fixed"])
    if not cases:
        raise MorphSeekError(f"dataset folder '{folder}' is empty: fixed_images/ holds no images")
    subjects, pairs = [], []
    for name in cases:
        case = _stem(Path(name))
        for role in ("moving", "fixed"):
            labels_dir = folder / f"{role}_labels"
            labels = labels_dir / name if labels_dir.is_dir() else None
            if labels is not None and not labels.is_file():
                raise MorphSeekError(f"dataset folder '{folder}': '{role}_labels/{name}' is missing "
                                     f"(every image in {role}_images/ needs its label map there)")
            subjects.append(SubjectEntry(f"{case}/{role}", names[role][name], labels))
        pairs.append((f"{case}/moving", f"{case}/fixed"))
    train_cases, val_cases = default_split(cases)
    val_set = set(val_cases)
    train = [p for p, name in zip(pairs, cases) if name not in val_set]
    val = [p for p, name in zip(pairs, cases) if name in val_set]
    return Dataset(folder, subjects, train, val, modality=None, moving_to_fixed="stretch")
