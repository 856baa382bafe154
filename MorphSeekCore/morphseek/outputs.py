"""Output folders that are whole or absent.

Every command that writes a folder (``register``, ``evaluate``, ``demo``; ``RegistrationResult.save``)
writes it through :func:`staged_folder`: the files go into a hidden temporary folder beside the
target (``.<name>.incomplete-XXXX``), and only when every file has been written and checked is that
folder moved into place with a rename. So:

* a failure, Ctrl-C or full disk leaves the target as it was (absent, or the previous result) and
  removes the temporary folder; a SIGKILL or power cut may leave the hidden ``.incomplete`` folder
  behind (safe to delete), never a half-written result under the target's name;
* a rerun replaces the previous result as a whole (no ``step_03/`` of an older run beside the new
  files), and only when asked (``overwrite=True``, the CLI's ``--overwrite``);
* a folder that MorphSeek did not write (no :data:`MARKER` file, no ``report.json`` /
  ``evaluation.json``) is never replaced, not even with ``--overwrite``: it may hold anything;
* an input that lives inside the target, or the target itself being an input, is refused before any
  work starts: replacing the folder would delete it.

:func:`check_output_folder` runs the same checks without writing, so commands can refuse a bad
``--out`` before hours of work. :func:`verify_written_transform` checks a written ``.h5`` transform
by reading it back (the engine's ``export.write_transform`` and the Slicer module's *Save outputs*).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .atomic import check_writable_folder, give_default_permissions, write_text
from .errors import MorphSeekError

PathLike = str | os.PathLike

#: Written into every output folder; its presence lets a later run replace the folder.
MARKER = ".morphseek-output.json"
#: Files that mark a folder written by an older MorphSeek (before the marker existed).
LEGACY_MARKERS = ("report.json", "evaluation.json")


def _resolved(path: PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def is_morphseek_output(folder: PathLike) -> bool:
    """True when ``folder`` holds a result MorphSeek wrote (the marker or a legacy report)."""
    folder = Path(folder)
    return any((folder / name).is_file() for name in (MARKER, *LEGACY_MARKERS))


def check_output_folder(out: PathLike, overwrite: bool = False, inputs: Iterable[PathLike | None] = (),
                        option: str = "--out") -> Path:
    """Refuse an output folder that cannot be (re)written, before any work starts.

    Raises MorphSeekError naming ``out`` when it is an existing file; when it is an existing non-empty
    folder and ``overwrite`` is False (or it holds files MorphSeek did not write); when one of
    ``inputs`` is ``out`` itself or lies inside it; when its parent folder cannot be created or is not
    writable. Returns the absolute path."""
    target = _resolved(out)
    for item in inputs:
        if item is None or str(item) == "":
            continue
        source = _resolved(item)
        if source == target or target in source.parents:
            raise MorphSeekError(
                f"{option} '{out}' would replace the input '{item}' (it "
                f"{'is' if source == target else 'lies inside'} the output folder, which is replaced "
                f"as a whole); choose another {option}")
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise MorphSeekError(f"{option} '{out}' is an existing file, not a folder; choose a folder name")
        if any(target.iterdir()):
            if not is_morphseek_output(target):
                raise MorphSeekError(
                    f"{option} '{out}' is a folder that holds files MorphSeek did not write; it is never "
                    f"replaced: choose a new or empty folder")
            if not overwrite:
                raise MorphSeekError(
                    f"{option} '{out}' already holds a result; add --overwrite to replace it as a whole, "
                    f"or choose another folder")
    check_writable_folder(target.parent, out, option)
    return target


@contextmanager
def staged_folder(out: PathLike, overwrite: bool = False, inputs: Iterable[PathLike | None] = (),
                  command: str = "morphseek", option: str = "--out") -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; when the block ends normally, it replaces ``out``.

    The checks of :func:`check_output_folder` run first. On any exception (including
    KeyboardInterrupt) the temporary folder is removed and ``out`` is left as it was. The marker file
    is written last, so a folder holding it is complete."""
    target = check_output_folder(out, overwrite, inputs, option)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.incomplete-", dir=target.parent))
    except OSError as error:
        raise MorphSeekError(f"{option} '{out}': cannot create a folder beside it ({error.strerror})") from None
    try:
        give_default_permissions(stage, 0o777)
        yield stage
        marker = {"command": command, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_text(json.dumps(marker) + "\n", stage / MARKER)
        _replace(stage, target, out, option)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _replace(stage: Path, target: Path, out: PathLike, option: str) -> None:
    """Move ``stage`` to ``target``; an existing ``target`` is moved aside first and removed after."""
    old = None
    try:
        if target.exists():
            if target.is_dir() and not any(target.iterdir()):
                target.rmdir()
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, old / target.name)
        os.replace(stage, target)
    except OSError as error:
        if old is not None and not target.exists():  # put the previous result back
            os.replace(old / target.name, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise MorphSeekError(f"{option} '{out}': cannot move the finished result into place "
                             f"({error.strerror or error})") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Checking a written transform file
# --------------------------------------------------------------------------------------------------
#: Probe points of :func:`verify_written_transform`: the corners and the centre of the field's grid,
#: and this many voxels drawn at random (fixed seed) inside it.
VERIFY_RANDOM_POINTS = 24


def probe_points(transform: "sitk.Transform") -> list[tuple[float, float, float]]:
    """Physical points where a written transform is compared with the original: for a displacement
    field, voxel centres of its grid (corners, centre, random voxels), read from the transform's
    fixed parameters (size, origin, spacing, direction) without copying the field; for any other
    transform, a few points around the origin."""
    import numpy as np
    import SimpleITK as sitk

    if transform.GetTransformEnum() == sitk.sitkDisplacementField:
        fixed = np.asarray(transform.GetFixedParameters(), dtype=np.float64)
        size, origin, spacing, direction = fixed[:3], fixed[3:6], fixed[6:9], fixed[9:18].reshape(3, 3)
        last = np.maximum(size - 1, 0)
        corners = np.array([[x, y, z] for x in (0, last[0]) for y in (0, last[1]) for z in (0, last[2])])
        drawn = np.random.default_rng(0).integers(0, np.maximum(size, 1), size=(VERIFY_RANDOM_POINTS, 3))
        index = np.concatenate([corners, [np.round(last / 2)], drawn]).astype(np.float64)
        points = origin + (index * spacing) @ direction.T
    else:
        points = np.array([[0.0, 0.0, 0.0], [100.0, -50.0, 25.0], [-75.0, 60.0, -120.0]])
    return [tuple(float(v) for v in p) for p in points]


def verify_written_transform(transform: "sitk.Transform", written: PathLike, name: PathLike,
                             tolerance_mm: float = 1e-6) -> None:
    """Check that the file ``written`` holds ``transform``: SimpleITK reads it back, and it maps the
    probe points (:func:`probe_points`) where ``transform`` maps them, to ``tolerance_mm`` (the
    ``.h5`` stores the field in float64: the values come back exactly). MorphSeekError naming
    ``name`` otherwise (a file cut short or corrupted by a full disk). Torch-free: the Slicer module
    checks the ``.h5`` that Slicer writes with it too (with a tolerance for Slicer's float32 grid)."""
    import numpy as np
    import SimpleITK as sitk

    try:
        read = sitk.ReadTransform(str(written))
    except RuntimeError:  # ITK's message lists the readers it tried: it says nothing more to a user
        raise MorphSeekError(f"cannot write transform '{name}': the file written is incomplete or unreadable "
                             "(SimpleITK cannot read it back; is the disk full?)") from None
    for point in probe_points(transform):
        expected = np.asarray(transform.TransformPoint(point))
        got = np.asarray(read.TransformPoint(point))
        if not np.all(np.abs(got - expected) <= tolerance_mm * (1.0 + np.abs(expected))):
            raise MorphSeekError(
                f"cannot write transform '{name}': the file written maps {np.round(point, 3).tolist()} mm to "
                f"{np.round(got, 3).tolist()}, not {np.round(expected, 3).tolist()} (is the disk full?)")
