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
