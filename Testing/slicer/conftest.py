"""Shared set-up for the Slicer tests: real slicer-core (no Qt), offscreen EGL rendering, a fresh
MRML scene per test, and the module's library on the import path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Must be set before VTK creates its first render window (see docs/SLICER.md).
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MorphSeekSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

import pytest  # noqa: E402

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install -r Testing/requirements.txt)")


@pytest.fixture
def scene():
    """An empty MRML scene, also published as slicer.mrmlScene (slicer.util looks it up)."""
    from MorphSeekLib.offscreen import new_scene

    mrml_scene = new_scene()
    yield mrml_scene
    mrml_scene.Clear(True)


# ----------------------------------------------------------------------------------------------
# One registration with the real engine, shared by the registration and the rendering tests.
# ----------------------------------------------------------------------------------------------
import time  # noqa: E402

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

SHAPE = (32, 32, 32)
STEPS = 3
TRAJECTORIES = 2
LABELS = {"ventricle": 1, "cortex": 2, "thalamus": 3, "stem": 4}


def rotation(angle: float) -> list[float]:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).flatten().tolist()


def with_geometry(array: np.ndarray, spacing, origin, angle) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(rotation(angle))
    return image


def tiny_checkpoint(path) -> str:
    """A real MorphSeek checkpoint: the tiny backbone with a perturbed flow layer, so that its
    (untrained) steps deform visibly, as a model early in training does."""
    import torch
    from morphseek.checkpoint import save_checkpoint
    from morphseek.nets.policy import build_model

    torch.manual_seed(0)
    model = build_model({"backbone": "tiny"})
    with torch.no_grad():
        model.backbone.flow.weight.normal_(0.0, 1.0)
    return str(save_checkpoint(path, model, {"grid": list(SHAPE), "similarity": "mse"}))


@pytest.fixture(scope="session")
def case(tmp_path_factory):
    """Fixed and moving volumes on different anisotropic, oblique grids, with segmentations."""
    from morphseek.synth import make_subject
    from MorphSeekLib import mrml
    from MorphSeekLib.offscreen import new_scene

    scene = new_scene()
    fixed_subject = make_subject(SHAPE, seed=1, n_labels=4)
    moving_subject = make_subject(SHAPE, seed=2, n_labels=4)
    fixed = with_geometry(fixed_subject.image, (1.2, 1.0, 1.4), (-18.0, 12.0, 4.0), 0.15)
    moving = with_geometry(moving_subject.image, (1.1, 1.05, 1.3), (-16.0, 10.0, 5.0), 0.05)
    scheme = mrml.LabelScheme(values=dict(LABELS))
    nodes = {
        "fixed": mrml.image_to_volume(fixed, scene, "fixed"),
        "moving": mrml.image_to_volume(moving, scene, "moving"),
        "fixed_seg": mrml.labels_to_segmentation(with_geometry(fixed_subject.labels, (1.2, 1.0, 1.4),
                                                               (-18.0, 12.0, 4.0), 0.15), scene, "fixed seg", scheme),
        "moving_seg": mrml.labels_to_segmentation(with_geometry(moving_subject.labels, (1.1, 1.05, 1.3),
                                                                (-16.0, 10.0, 5.0), 0.05), scene, "moving seg", scheme),
    }
    model = tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")
    return scene, nodes, model


@pytest.fixture(scope="session")
def registered(case):
    from MorphSeekLib.logic import MorphSeekLogic

    scene, nodes, model = case
    before = scene.GetNumberOfNodes()
    events = []
    started = time.perf_counter()
    outputs = MorphSeekLogic(scene).register(
        nodes["fixed"], nodes["moving"], nodes["fixed_seg"], nodes["moving_seg"], model=model,
        steps=STEPS, trajectories=TRAJECTORIES, device="cpu", progress=events.append)
    seconds = time.perf_counter() - started
    return scene, nodes, outputs, events, before, seconds


