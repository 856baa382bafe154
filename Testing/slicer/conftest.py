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


from MorphSeekLib.selftest import LABELS, SHAPE, STEPS, TRAJECTORIES, synthetic_case, tiny_checkpoint  # noqa: E402,F401


@pytest.fixture(scope="session")
def case(tmp_path_factory):
    """Fixed and moving volumes on different anisotropic, oblique grids, with segmentations, and a
    real tiny checkpoint (the scenario of the module's self-test)."""
    from MorphSeekLib.offscreen import new_scene

    scene = new_scene()
    nodes = synthetic_case(scene)
    model = tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")
    return scene, nodes, model


@pytest.fixture(scope="session")
def registered(case):
    from MorphSeekLib.logic import SceneLogic

    scene, nodes, model = case
    before = scene.GetNumberOfNodes()
    events = []
    started = time.perf_counter()
    outputs = SceneLogic(scene).register(
        nodes["fixed"], nodes["moving"], nodes["fixed_seg"], nodes["moving_seg"], model=model,
        steps=STEPS, trajectories=TRAJECTORIES, device="cpu", progress=events.append)
    seconds = time.perf_counter() - started
    return scene, nodes, outputs, events, before, seconds


